"""The JSON API under ``/api/``: partitions, their channels and GPADLs, device counters, hot remove and hot add
of a device, and keyboard and mouse input.

What Hyper-V's PowerShell module shows and does for a VM (``Get-VM``, ``Get-VMNetworkAdapter``,
``Remove-VMNetworkAdapter`` / ``Add-VMNetworkAdapter``: a rescind and a new offer on VMBus), and what Linux shows
per channel in sysfs (``/sys/bus/vmbus/devices/*/channels/*/``: ring sizes and fill, interrupts, events). Every
handler reads the daemon's live state in its event loop; nothing is cached. Errors are JSON
``{"error": message, "status": code}``: 404 for an unknown partition or device, 400 for a bad body, 409 for
something the partition cannot do now.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from vmbus_proto.devices.input.host import InputNotReady
from vmbus_proto.errors import LocalProtocolError
from vmbus_proto.ioport import Direction
from vmbus_proto.server import HostChannel
from vmbus_proto.versions import version_text

from ..connection import PartitionConnection
from ..counters import Traffic, counters_json, ring_fill
from ..daemon import ParentDaemon
from ..devices.input.vsp import to_absolute
from ..devices.video.screen import Screen, encode_png
from ..vsp import Vsp
from .metrics import process_status

DAEMON = web.AppKey("daemon", ParentDaemon)
MAX_TEXT = 16 * 1024  # characters typed by one request


class ApiError(Exception):
    """An answer other than 2xx, with its status and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def _when(t: float | None) -> str | None:
    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


# ---- lookups ------------------------------------------------------------------------------------------------

def _daemon(request: web.Request) -> ParentDaemon:
    return request.app[DAEMON]


def partition(request: web.Request) -> PartitionConnection:
    """The connected partition named in the URL, or 404."""
    name = request.match_info["name"]
    conn = _daemon(request).partitions.get(name)
    if conn is None:
        raise ApiError(404, f"no partition named {name!r} is connected")
    return conn


def _device(daemon: ParentDaemon, name: str) -> Vsp:
    vsp = daemon.device(name)
    if vsp is None:
        raise ApiError(404, f"no device named {name!r} on this parent; devices: "
                            f"{', '.join(v.name for v in daemon.vsps)}")
    return vsp


# ---- views --------------------------------------------------------------------------------------------------

def channel_json(conn: PartitionConnection, hc: HostChannel) -> dict[str, Any]:
    """One channel as the host's state machine and its rings see it."""
    out: dict[str, Any] = {
        "relid": hc.relid, "device": hc.offer.name, "state": hc.kind.value,
        "sub_channel_index": hc.offer.sub_channel_index, "primary_relid": hc.primary,
        "class_id": str(hc.offer.if_type), "instance_id": str(hc.offer.if_instance),
        "pipe_mode": hc.offer.pipe_mode, "target_vp": hc.target_vp, "ring": None, "counters": None}
    params = hc.params
    if params is not None:
        out["ring"] = {"gpadl": params.gpadl.gpadl, "in_size": params.guest_to_host_data,
                       "out_size": params.host_to_guest_data}
    ch = conn.channels.get(hc.relid)
    if ch is not None:
        out["ring"] = {**(out["ring"] or {}), **ring_fill(ch)}
        out["counters"] = Traffic.of(ch).as_dict()
    return out


def partition_json(conn: PartitionConnection, detail: bool) -> dict[str, Any]:
    core = conn.core
    channels = [] if core is None else [channel_json(conn, hc) for hc in sorted(core.channels.values(),
                                                                                 key=lambda c: c.relid)]
    return {
        "name": conn.partition, "transport": conn.transport_name, "peer": conn.peer,
        "connected_since": _when(conn.connected_at),
        "vmbus": {"state": core.state.value if core else "disconnected",
                  "version": version_text(core.version) if core and core.version else None,
                  "connected_since": _when(conn.vmbus_connected_at)},
        "bytes_in": conn.bytes_in, "bytes_out": conn.bytes_out, "dropped_messages": conn.dropped_messages,
        "gpadls": len(core.gpadls) if core else 0, "gpadl_pages": core.gpadl_pages if core else 0,
        "limit_refusals": conn.limit_refusals, "bytes_held": bytes_held(conn), "emulated": emulated_json(conn),
        "channels": channels if detail else [{k: c[k] for k in ("relid", "device", "state", "sub_channel_index")}
                                             for c in channels]}


def emulated_json(conn: PartitionConnection) -> dict[str, Any] | None:
    """The partition's I/O-port space: its VM exits and IOPORT frame bytes, and each emulated device's counters
    for it (the ATA disk's commands, errors, bytes, and exits by port and direction); None before it is
    accepted or with no emulated device."""
    ports = conn.ports
    if ports is None:
        return None
    out: dict[str, Any] = {"exits_in": ports.exits[Direction.IN], "exits_out": ports.exits[Direction.OUT],
                           "frame_bytes_in": ports.bytes_in, "frame_bytes_out": ports.bytes_out,
                           "unclaimed": ports.bus.unclaimed}
    for dev in conn.daemon.emulated:
        out[dev.name] = counters_json(dev.samples())["partitions"].get(conn.partition or "", {})
    return out


def bytes_held(conn: PartitionConnection) -> dict[str, int]:
    """What the parent holds for the partition, charged to ``[limits] partition_bytes`` (``cap``) and the
    memory budget by kind, and the inline data its channels hold now (bounded by their data windows)."""
    acc = conn.account
    return {"total": acc.used, "cap": acc.cap, **acc.by_kind,
            "inline_data": sum(ch.rings.data_reader.used for ch in conn.channels.values())}


def gpadls_json(conn: PartitionConnection) -> list[dict[str, Any]]:
    core = conn.core
    if core is None:
        return []
    out = []
    for (gid, relid), hg in sorted(core.gpadls.items()):
        owner = core.channels.get(relid)
        out.append({"id": gid, "relid": relid, "device": owner.offer.name if owner else None,
                    "pages": hg.gpadl.page_count, "bytes": sum(length for length, _ in hg.gpadl.ranges),
                    "state": hg.state.value, "ring": hg.ring_users > 0, "held_by_device": conn.gpadl_held(relid, gid)})
    for gid, asm in sorted(core.in_progress.items()):
        owner = core.channels.get(asm.relid)
        out.append({"id": gid, "relid": asm.relid, "device": owner.offer.name if owner else None,
                    "pages": asm.expected_pfns, "bytes": sum(length for length, _ in asm.ranges),
                    "state": "in_progress", "ring": False, "held_by_device": False})
    return out


def device_json(daemon: ParentDaemon, vsp: Vsp, detail: bool) -> dict[str, Any]:
    traffic = Traffic()
    traffic.add(daemon.totals.retired.get(vsp.name, Traffic()))
    open_now = 0
    for conn in daemon.partitions.values():
        for ch in conn.channels.values():
            if ch.name == vsp.name:
                traffic.add(Traffic.of(ch))
                open_now += 1
    counters = counters_json(vsp.samples())
    out: dict[str, Any] = {"name": vsp.name, "class_id": str(vsp.spec.class_id), "channels_open": open_now,
                           "traffic": traffic.as_dict(), "counters": counters["totals"]}
    if detail:
        out["partitions"] = counters["partitions"]
        states = getattr(vsp, "states", None)  # the input devices' sessions
        if callable(states):
            out["sessions"] = states()
    return out


# ---- request bodies -----------------------------------------------------------------------------------------

async def body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or 400 saying what is wrong with it. Only ``application/json``: a browser
    cannot send that cross-origin without a preflight, which this API never grants."""
    if request.content_type != "application/json":
        raise ApiError(415, f"send the body as Content-Type: application/json, not {request.content_type}")
    try:
        raw = await request.read()
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(value).__name__}")
    return value


def field(obj: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    """``obj[key]`` of type ``kind`` (bool is not an int here), or 400 naming the key."""
    if key not in obj:
        if default is ...:
            raise ApiError(400, f"the body needs {key!r} ({kind.__name__})")
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{key!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


# ---- handlers -----------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def index(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    return web.json_response({
        "parent": daemon.name, "partitions": sorted(daemon.partitions), "devices": [v.name for v in daemon.vsps],
        "listen": daemon.endpoints,
        "memory_budget": {"bytes": daemon.budget.capacity, "used_bytes": daemon.budget.used},
        "process": process_status(),
        "routes": sorted({str(r.resource.canonical) for r in request.app.router.routes() if r.resource})})


async def list_partitions(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    return web.json_response([partition_json(c, detail=False) for _, c in sorted(daemon.partitions.items())])


async def get_partition(request: web.Request) -> web.Response:
    return web.json_response(partition_json(partition(request), detail=True))


async def list_channels(request: web.Request) -> web.Response:
    return web.json_response(partition_json(partition(request), detail=True)["channels"])


async def list_gpadls(request: web.Request) -> web.Response:
    return web.json_response(gpadls_json(partition(request)))


async def list_devices(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    return web.json_response([device_json(daemon, v, detail=False) for v in daemon.vsps])


async def get_device(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    return web.json_response(device_json(daemon, _device(daemon, request.match_info["device"]), detail=True))


def _partition_device(request: web.Request) -> tuple[PartitionConnection, str]:
    conn = partition(request)
    name = request.match_info["device"]
    _device(_daemon(request), name)
    return conn, name


def _channel_answer(conn: PartitionConnection, device: str, relid: int, status: int) -> web.Response:
    hc = conn.core.channels.get(relid) if conn.core else None
    return web.json_response({"partition": conn.partition, "device": device, "relid": relid,
                              "state": hc.kind.value if hc else "released"}, status=status)


async def rescind(request: web.Request) -> web.Response:
    """Hot remove (``Remove-VMNetworkAdapter``): RESCIND_CHANNELOFFER; the guest closes and releases the relid."""
    conn, device = _partition_device(request)
    relid = conn.rescind(device)
    if relid is None:
        raise ApiError(409, f"partition {conn.partition!r} has no offered {device} channel to rescind")
    request.app[DAEMON].log.info("device rescinded through the API", partition=conn.partition, device=device,
                                 relid=relid, client=request.remote)
    return _channel_answer(conn, device, relid, 202)


async def offer(request: web.Request) -> web.Response:
    """Hot add (``Add-VMNetworkAdapter``): a new OFFERCHANNEL (after the guest released a rescinded one)."""
    conn, device = _partition_device(request)
    if conn.core is None:
        raise ApiError(409, f"partition {conn.partition!r} has not started VMBus")
    try:
        relid = conn.reoffer(device)
    except ValueError as exc:
        raise ApiError(409, f"partition {conn.partition!r}: {exc} (rescind it first)") from None
    assert relid is not None
    request.app[DAEMON].log.info("device offered through the API", partition=conn.partition, device=device,
                                 relid=relid, client=request.remote)
    return _channel_answer(conn, device, relid, 202)


def _input_device(request: web.Request, name: str) -> Any:
    vsp = _daemon(request).device(name)
    if vsp is None:
        raise ApiError(409, f"this parent offers no {name} (enable it under [devices])")
    return vsp


async def _input(request: web.Request, device: str, send: Callable[[Any, str, dict[str, Any]], Awaitable[int]],
                 unit: str) -> web.Response:
    conn = partition(request)
    obj = await body(request)
    vsp = _input_device(request, device)
    name = conn.partition or "?"
    try:
        sent = await send(vsp, name, obj)
    except InputNotReady as exc:  # a LocalProtocolError too: first
        raise ApiError(409, str(exc)) from None
    except LocalProtocolError as exc:  # an unknown key name
        raise ApiError(400, str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return web.json_response({"partition": name, unit: sent})


async def _text(vsp: Any, name: str, obj: dict[str, Any]) -> int:
    text = field(obj, "text", str)
    if len(text) > MAX_TEXT:
        raise ApiError(400, f"'text' is {len(text)} characters; at most {MAX_TEXT} per request")
    return int(await vsp.type_text(name, text))


async def _keys(vsp: Any, name: str, obj: dict[str, Any]) -> int:
    keys = field(obj, "keys", str)
    if not keys.strip():
        raise ApiError(400, "'keys' names no key (as in \"ctrl+alt+del\" or \"Escape\")")
    return int(await vsp.send_keys(name, keys))


async def _key(vsp: Any, name: str, obj: dict[str, Any]) -> int:
    code = field(obj, "make_code", int)
    if not 0 <= code <= 0x7F:
        raise ApiError(400, f"'make_code' must be a set-1 make code 0..127, not {code}")
    return int(await vsp.send_key(name, code, release=field(obj, "release", bool, False),
                                  e0=field(obj, "e0", bool, False), e1=field(obj, "e1", bool, False)))


async def _mouse(vsp: Any, name: str, obj: dict[str, Any]) -> int:
    x, y = field(obj, "x", int), field(obj, "y", int)
    width, height = field(obj, "width", int, None), field(obj, "height", int, None)
    if (width is None) != (height is None):
        raise ApiError(400, "give both 'width' and 'height' (pixel coordinates) or neither (absolute 0..32767)")
    if width is not None and height is not None:
        if not (0 <= x < width and 0 <= y < height):
            raise ApiError(400, f"pixel ({x}, {y}) is outside a {width}x{height} screen")
        x, y = to_absolute(x, width), to_absolute(y, height)
    return int(await vsp.send_mouse(name, x, y, field(obj, "buttons", int, 0), field(obj, "wheel", int, 0)))


async def input_text(request: web.Request) -> web.Response:
    return await _input(request, "keyboard", _text, "events")


async def input_keys(request: web.Request) -> web.Response:
    return await _input(request, "keyboard", _keys, "events")


async def input_key(request: web.Request) -> web.Response:
    return await _input(request, "keyboard", _key, "events")


async def input_mouse(request: web.Request) -> web.Response:
    return await _input(request, "mouse", _mouse, "reports")


def screen_of(request: web.Request, conn: PartitionConnection) -> Screen:
    """The partition's screen, from the video VSP's ``screens[name]``, or 404."""
    screens = getattr(_daemon(request).device("video"), "screens", None)
    if screens is None:
        raise ApiError(404, "this parent keeps no screens (its video device has no framebuffer)")
    screen: Screen | None = screens.get(conn.partition)
    if screen is None:
        raise ApiError(404, f"partition {conn.partition!r} has no screen yet (its video channel is not open)")
    return screen


async def screen_png(request: web.Request) -> web.Response:
    """The partition's current screen as PNG; ``?scale=0.25`` for a thumbnail (0.05..1). The picture is taken in
    the event loop, the encoding (CPU work) done in a thread."""
    screen = screen_of(request, partition(request))
    scale = None
    if "scale" in request.query:
        try:
            scale = float(request.query["scale"])
        except ValueError:
            scale = -1.0
        if not 0.05 <= scale <= 1:
            raise ApiError(400, f"'scale' must be a number from 0.05 to 1, not {request.query['scale']!r}")
    png = await asyncio.to_thread(encode_png, screen.image(), scale)
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/", index)
    r.add_get("/api/partitions", list_partitions)
    r.add_get("/api/partitions/{name}", get_partition)
    r.add_get("/api/partitions/{name}/channels", list_channels)
    r.add_get("/api/partitions/{name}/gpadls", list_gpadls)
    r.add_get("/api/partitions/{name}/screen.png", screen_png)
    r.add_delete("/api/partitions/{name}/devices/{device}", rescind)
    r.add_post("/api/partitions/{name}/devices/{device}", offer)
    r.add_post("/api/partitions/{name}/input/text", input_text)
    r.add_post("/api/partitions/{name}/input/keys", input_keys)
    r.add_post("/api/partitions/{name}/input/key", input_key)
    r.add_post("/api/partitions/{name}/input/mouse", input_mouse)
    r.add_get("/api/devices", list_devices)
    r.add_get("/api/devices/{device}", get_device)
