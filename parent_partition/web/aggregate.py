"""The HTTP side of a parent with worker processes: one API, /metrics and web console over every worker.

Each worker serves the ordinary app (``build_app``: the JSON API, /metrics and the console) on a private Unix
socket; the supervisor's server, on ``[http] listen`` with the same token and guards, asks them: lists are
merged (each partition says which ``worker`` has it), device counters and /metrics samples are summed, and
whatever names a partition (its channels, input, screen, console socket) goes to the worker that has it. The
front end of a pre-fork server's status page (nginx's per-worker counters summed by its exporter).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from ..counters import LatencyHistogram
from .metrics import process_status
from .server import WebServer, _errors, build_app, check_origin
from .settings import HttpSettings, is_loopback, split_address

if TYPE_CHECKING:
    from ..workers import Supervisor, Worker, WorkerDaemon

SUP = web.AppKey("supervisor", object)
SESSIONS = web.AppKey("sessions", dict)
#: Families every worker reports for the whole parent (not its share): shown once, not summed.
GLOBAL = {"vmbus_memory_budget_bytes", "vmbus_memory_budget_used_bytes"}
#: Families whose samples are the most (a limit, a start time would be the least) over the workers.
MAXIMUM = {"process_max_fds", "python_info", "python_gc_objects_collected", "process_virtual_memory_bytes"}
MINIMUM = {"process_start_time_seconds"}


# ---- a worker's API, on its private socket --------------------------------------------------------------

async def worker_api(daemon: WorkerDaemon, path: str) -> web.AppRunner:
    """Serve ``build_app``'s API and console for this worker on Unix socket ``path`` (the supervisor's only)."""
    from .console import setup  # noqa: PLC0415

    settings = HttpSettings(listen="127.0.0.1:0", partition_labels=daemon.config.http.partition_labels)
    runner = web.AppRunner(build_app(daemon, settings, plugins=[setup]), access_log=None, handle_signals=False,
                           shutdown_timeout=daemon.config.shutdown_timeout)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return runner


# ---- the supervisor's server ------------------------------------------------------------------------------

async def start_web(sup: Supervisor) -> WebServer:
    settings = sup.config.http
    app = web.Application(middlewares=[_errors(sup.log, defaultdict(LatencyHistogram),
                                                is_loopback(split_address(settings.listen)[0]), settings.token,
                                                settings.client_certs)],
                          client_max_size=256 * 1024)
    app[SUP] = sup
    app[SESSIONS] = {}
    r = app.router
    r.add_get("/api/", index)
    r.add_get("/api/partitions", partitions)
    r.add_route("*", "/api/partitions/{name}", to_owner)
    r.add_route("*", "/api/partitions/{name}/{rest:.*}", to_owner)
    r.add_get("/api/devices", devices)
    r.add_get("/api/devices/{device}", devices)
    r.add_get("/metrics", metrics)
    r.add_get("/ws/partitions", overview_socket)
    r.add_get("/ws/partitions/{name}", to_owner_socket)
    r.add_get("/partitions/{name}", to_any)
    r.add_get("/", to_any)
    r.add_get("/static/{rest:.*}", to_any)
    app.on_cleanup.append(_close_sessions)
    server = WebServer(sup, settings, app=app)
    await server.start()
    return server


def _sup(request: web.Request) -> Supervisor:
    return request.app[SUP]  # type: ignore[return-value]


def _session(request: web.Request, w: Worker) -> aiohttp.ClientSession:
    sessions: dict[int, aiohttp.ClientSession] = request.app[SESSIONS]
    s = sessions.get(w.index)
    if s is None:  # no pooled connections: a restarted worker listens on a new socket at the same path
        s = sessions[w.index] = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(w.http_path), force_close=True),
            timeout=aiohttp.ClientTimeout(total=60))
    return s


async def _close_sessions(app: web.Application) -> None:
    for s in app[SESSIONS].values():
        await s.close()


def _ready(sup: Supervisor) -> list[Worker]:
    return [w for w in sup.workers if w.alive and w.ready.is_set()]


def _unavailable(w: Worker) -> web.Response:
    return web.json_response({"error": f"worker process {w.index} is not answering (it is restarting?)",
                              "status": 503}, status=503)


async def forward(request: web.Request, w: Worker) -> web.Response:
    """``request`` as the worker answers it."""
    headers = {k: request.headers[k] for k in ("Content-Type", "Accept") if k in request.headers}
    try:
        async with _session(request, w).request(request.method, f"http://127.0.0.1{request.path_qs}",
                                                data=await request.read(), headers=headers) as got:
            body = await got.read()
            keep = {k: got.headers[k] for k in ("Content-Type", "Cache-Control", "Location") if k in got.headers}
            return web.Response(body=body, status=got.status, headers=keep)
    except (aiohttp.ClientError, OSError):
        return _unavailable(w)


async def _json_all(request: web.Request, path: str) -> list[tuple[Worker, Any]]:
    """``path``'s JSON from every worker that answers."""
    ready = _ready(_sup(request))

    async def one(w: Worker) -> Any:
        async with _session(request, w).get(f"http://127.0.0.1{path}") as got:
            return got.status, await got.json(content_type=None)

    answers = await asyncio.gather(*(one(w) for w in ready), return_exceptions=True)
    return [(w, a[1]) for w, a in zip(ready, answers, strict=True)
            if not isinstance(a, BaseException) and a[0] == 200]


async def index(request: web.Request) -> web.Response:
    sup = _sup(request)
    answers = await _json_all(request, "/api/")
    out: dict[str, Any] = dict(answers[0][1]) if answers else {"devices": sup.devices, "routes": []}
    out.update({"parent": sup.name, "listen": sup.endpoints,
                "partitions": sorted(p for _, a in answers for p in a.get("partitions", [])),
                "process": process_status(),
                "workers": [{"worker": w.index, "pid": w.pid, "ready": w.ready.is_set() and w.alive,
                             "started": w.started,
                             "partitions": next((len(a.get("partitions", [])) for x, a in answers if x is w), None),
                             "process": next((a.get("process") for x, a in answers if x is w), None)}
                            for w in sup.workers]})
    return web.json_response(out)


async def partitions(request: web.Request) -> web.Response:
    rows = [{**p, "worker": w.index} for w, ps in await _json_all(request, "/api/partitions") for p in ps]
    return web.json_response(sorted(rows, key=lambda p: str(p.get("name"))))


async def to_owner(request: web.Request) -> web.Response:
    """A partition's resource, from the worker that has it."""
    sup = _sup(request)
    name = request.match_info["name"]
    w = sup.worker_of(name)
    if w is None:
        return web.json_response({"error": f"no partition named {name!r} is connected", "status": 404}, status=404)
    response = await forward(request, w)
    if request.method == "GET" and request.path.rstrip("/").endswith(f"/partitions/{name}") \
            and response.status == 200 and response.body:
        obj = json.loads(bytes(response.body))  # type: ignore[arg-type]
        return web.json_response({**obj, "worker": w.index})
    return response


async def to_any(request: web.Request) -> web.Response:
    """The console's pages and files: any worker has them."""
    ready = _ready(_sup(request))
    if not ready:
        raise web.HTTPServiceUnavailable(text="no worker process is ready")
    return await forward(request, ready[0])


async def devices(request: web.Request) -> web.Response:
    answers = [a for _, a in await _json_all(request, request.path_qs)]
    if not answers:
        device = request.match_info.get("device")
        if device is not None:
            return web.json_response({"error": f"no device named {device!r} on this parent", "status": 404},
                                     status=404)
        return web.json_response([])
    out = answers[0]
    for more in answers[1:]:
        out = merge(out, more)
    return web.json_response(out)


def merge(a: Any, b: Any) -> Any:
    """Two workers' JSON as one: numbers add up, objects merge key by key, lists of devices pair up by name
    (others join), and anything else is the first's."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {**b, **{k: merge(v, b[k]) if k in b else v for k, v in a.items()}}
    if isinstance(a, list) and isinstance(b, list):
        if all(isinstance(x, dict) and "name" in x for x in [*a, *b]):
            by_b = {x["name"]: x for x in b}
            return [merge(x, by_b.pop(x["name"])) if x["name"] in by_b else x for x in a] + list(by_b.values())
        return a + b
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return a + b
    return a


# ---- /metrics ------------------------------------------------------------------------------------------------

async def metrics(request: web.Request) -> web.Response:
    """Every worker's samples, summed by name and labels; ``vmbus_worker_partitions`` per worker."""
    sup = _sup(request)
    ready = _ready(sup)

    async def one(w: Worker) -> str:
        async with _session(request, w).get("http://127.0.0.1/metrics") as got:
            return await got.text()

    texts = await asyncio.gather(*(one(w) for w in ready), return_exceptions=True)
    families: dict[str, tuple[str, str]] = {}  # name -> (type, help)
    samples: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for text in texts:
        if isinstance(text, BaseException):
            continue
        for fam in text_string_to_metric_families(text):
            families.setdefault(fam.name, (fam.type, fam.documentation))
            for s in fam.samples:
                key = (fam.name, s.name, tuple(sorted(s.labels.items())))
                if key not in samples:
                    samples[key] = s.value
                elif fam.name in GLOBAL:
                    continue
                elif fam.name in MAXIMUM:
                    samples[key] = max(samples[key], s.value)
                elif fam.name in MINIMUM:
                    samples[key] = min(samples[key], s.value)
                else:
                    samples[key] += s.value
    lines: list[str] = []
    by_family: dict[str, list[str]] = defaultdict(list)
    for (fam_name, name, labels), value in samples.items():
        by_family[fam_name].append(f"{name}{_labels(labels)} {_number(value)}")
    for fam_name, (kind, help_) in families.items():
        lines += [f"# HELP {fam_name} {_escape_help(help_)}", f"# TYPE {fam_name} {kind}", *by_family[fam_name]]
    lines += ["# HELP vmbus_worker_up whether each worker process answers (1) or not (0)",
              "# TYPE vmbus_worker_up gauge"]
    answered = {w.index for w, t in zip(ready, texts, strict=True) if not isinstance(t, BaseException)}
    lines += [f'vmbus_worker_up{{worker="{w.index}"}} {int(w.index in answered)}' for w in sup.workers]
    lines += ["# HELP vmbus_worker_partitions partitions connected to each worker process",
              "# TYPE vmbus_worker_partitions gauge"]
    counts: dict[int, int] = defaultdict(int)
    for i in sup.names.values():
        counts[i] += 1
    lines += [f'vmbus_worker_partitions{{worker="{w.index}"}} {counts[w.index]}' for w in sup.workers]
    return web.Response(body=("\n".join(lines) + "\n").encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    esc = (f'{k}="{_escape_help(v).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + ",".join(esc) + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1 << 53:
        return str(int(value))
    return repr(value)


# ---- the console's websockets ----------------------------------------------------------------------------------

async def _pump(src: Any, dst: Any) -> None:
    """Text and binary messages from one websocket to the other until either closes."""
    async for msg in src:
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        else:
            break


async def to_owner_socket(request: web.Request) -> web.StreamResponse:
    """A partition's live screen and input: a websocket to the worker that has it (or any, to wait for it)."""
    check_origin(request)
    sup = _sup(request)
    ready = _ready(sup)
    w = sup.worker_of(request.match_info["name"]) or (ready[0] if ready else None)
    if w is None:
        raise web.HTTPServiceUnavailable(text="no worker process is ready")
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1 << 20)
    try:
        upstream = await _session(request, w).ws_connect(f"http://127.0.0.1{request.path_qs}", max_msg_size=0)
    except (aiohttp.ClientError, OSError):
        return _unavailable(w)
    await ws.prepare(request)
    async with upstream:
        tasks = [asyncio.create_task(_pump(ws, upstream)), asyncio.create_task(_pump(upstream, ws))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await ws.close()
    return ws


async def overview_socket(request: web.Request) -> web.StreamResponse:
    """The index's live list: every worker's, merged, sent again whenever one of them changes."""
    check_origin(request)
    sup = _sup(request)
    ws = web.WebSocketResponse(heartbeat=20.0)
    await ws.prepare(request)
    lists: dict[int, list[Any]] = {}
    last: str | None = None

    async def follow(w: Worker) -> None:
        nonlocal last
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with _session(request, w).ws_connect("http://127.0.0.1/ws/partitions") as upstream:
                async for msg in upstream:
                    if msg.type != WSMsgType.TEXT:
                        break
                    data = json.loads(msg.data)
                    lists[w.index] = [{**p, "worker": w.index} for p in data.get("partitions", [])]
                    rows = sorted((p for ps in lists.values() for p in ps), key=lambda p: str(p.get("name")))
                    now = json.dumps({"t": "partitions", "parent": sup.name, "partitions": rows})
                    if now != last and not ws.closed:
                        await ws.send_str(now)
                        last = now
        lists.pop(w.index, None)

    tasks = [asyncio.create_task(follow(w)) for w in _ready(sup)]
    try:
        async for _ in ws:  # nothing is expected from the browser; the loop sees the close
            pass
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return ws


