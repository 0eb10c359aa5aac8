"""Tier 3: the parent's JSON API and /metrics over real HTTP on loopback, with a real child partition process.

The daemon and its WebServer run in this test's event loop (so the test can also look at the daemon directly);
the child is ``child-partition run`` over a Unix socket. Typed text is checked where the child logs it ("line
typed" at debug), a hot remove and hot add where the child logs it ("offer rescinded", "device ready").
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon, StartupError
from parent_partition.devices.input.vsp import KeyboardVsp
from parent_partition.web.server import MAX_BODY, WebServer
from parent_partition.web.settings import HttpSettings
from vmbus_proto.aio import logs
from vmbus_proto.devices.registry import ALL as OFFERED

from ..shell.waits import until
from .conftest import Proc, child

pytestmark = pytest.mark.integration


class Api:
    """A real HTTP client on the daemon's web server."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"json": body} if raw is None else {"data": raw}
        headers = headers or ({"Content-Type": "application/json"} if raw is not None else {})
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def get(self, path: str) -> Any:
        status, answer = await self.call("GET", path)
        assert status == 200, f"GET {path}: {status} {answer}"
        return answer

    async def error(self, method: str, path: str, status: int, needle: str, **kw: Any) -> None:
        got, answer = await self.call(method, path, **kw)
        assert got == status and isinstance(answer, dict) and needle in answer["error"], \
            f"{method} {path}: expected {status} with {needle!r}, got {got} {answer}"


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[ParentDaemon, Api, Proc]]:
    logs.setup("warning", json=True)
    cfg = Config(listen=[f"unix:{tmp_path}/vmbus.sock"], data_dir=str(tmp_path / "var"))
    daemon = ParentDaemon(cfg)
    await daemon.start()
    web = WebServer(daemon, HttpSettings(listen="127.0.0.1:0", explicit=True))
    url = await web.start()
    assert url is not None and url.startswith("http://127.0.0.1:")
    vm = child(tmp_path, f"unix:{tmp_path}/vmbus.sock", "vm1", "--log-level", "debug")
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.to_thread(vm.wait_event, "all offered channels open")
            kbd = daemon.device("keyboard")
            assert isinstance(kbd, KeyboardVsp)
            await until(lambda: "vm1" in kbd.sessions and kbd.sessions["vm1"].host.active, "the keyboard is active")
            yield daemon, Api(session, url), vm
            # The child's clean shutdown needs this loop's daemon to answer: stop it from a thread.
            assert await asyncio.to_thread(vm.stop) == 0, "the child did not shut down cleanly"
    finally:
        await asyncio.to_thread(vm.stop)
        await web.stop()
        await daemon.shutdown()


async def test_partitions_channels_gpadls_and_devices(running: tuple[ParentDaemon, Api, Proc]) -> None:
    daemon, api, _ = running
    index = await api.get("/api/")
    assert index["partitions"] == ["vm1"] and "/api/partitions/{name}/input/text" in index["routes"], index
    [summary] = await api.get("/api/partitions")
    assert summary["name"] == "vm1" and summary["transport"] == "unix" and summary["connected_since"], summary
    assert summary["vmbus"]["state"] == "connected" and summary["vmbus"]["version"], summary
    detail = await api.get("/api/partitions/vm1")
    channels = {c["device"]: c for c in detail["channels"]}
    assert set(channels) == {e.name for e in OFFERED}, channels.keys()
    storage = channels["storage"]
    assert storage["state"] == "open" and storage["sub_channel_index"] == 0, storage
    assert storage["ring"]["in_size"] > 0 and storage["ring"]["out_size"] > 0, storage["ring"]
    assert storage["counters"]["packets_in"] > 0 and storage["counters"]["bytes_out"] > 0, storage["counters"]
    # The same channels, less what moves between the two reads (the guest's NIC is live: counters, ring indices).
    def settled(chs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in c.items() if k not in ("counters", "ring")} for c in chs]
    listed = await api.get("/api/partitions/vm1/channels")
    assert settled(listed) == settled(detail["channels"])
    assert [c["ring"]["gpadl"] for c in listed] == [c["ring"]["gpadl"] for c in detail["channels"]]
    gpadls = await api.get("/api/partitions/vm1/gpadls")
    rings = {g["relid"]: g for g in gpadls if g["ring"]}
    assert set(rings) == {c["relid"] for c in detail["channels"]}, gpadls
    assert all(g["pages"] > 0 and g["state"] == "accepted" and g["device"] for g in gpadls), gpadls
    devices = {d["name"]: d for d in await api.get("/api/devices")}
    assert set(devices) == {v.name for v in daemon.vsps}
    assert devices["storage"]["counters"]["requests_total"] > 0, devices["storage"]
    assert devices["storage"]["traffic"]["packets_in"] > 0, devices["storage"]
    net = await api.get("/api/devices/network")
    assert net["counters"]["switch_frames_total"] >= 0 and "vm1" in net["partitions"], net
    assert "port_frames_total{direction=in}" in net["partitions"]["vm1"], net["partitions"]
    kbd = await api.get("/api/devices/keyboard")
    assert [s["partition"] for s in kbd["sessions"]] == ["vm1"], kbd


async def test_input_reaches_the_child(running: tuple[ParentDaemon, Api, Proc]) -> None:
    _, api, vm = running
    status, answer = await api.call("POST", "/api/partitions/vm1/input/text", {"text": "hello from the API\n"})
    assert status == 200 and answer["events"] > 0, answer
    rec = await asyncio.to_thread(vm.wait_event, "line typed", 30.0)
    assert rec["text"] == "hello from the API", rec
    mark = vm.mark()
    status, _ = await api.call("POST", "/api/partitions/vm1/input/text", {"text": "ab"})
    assert status == 200
    status, answer = await api.call("POST", "/api/partitions/vm1/input/keys", {"keys": "BackSpace Enter"})
    assert status == 200, answer
    rec = await asyncio.to_thread(vm.wait_event, "line typed", 30.0, mark)
    assert rec["text"] == "a", rec
    status, answer = await api.call("POST", "/api/partitions/vm1/input/key", {"make_code": 0x1C})
    assert status == 200 and answer["events"] == 1, answer
    status, answer = await api.call("POST", "/api/partitions/vm1/input/mouse",
                                    {"x": 1023, "y": 0, "width": 1024, "height": 768, "buttons": 1})
    assert status == 200 and answer["reports"] == 1, answer
    await asyncio.to_thread(vm.wait_event, "mouse report", 30.0, 0, x=32767, y=0, buttons=1)


async def test_bad_requests_get_clear_errors_and_the_daemon_goes_on(running: tuple[ParentDaemon, Api, Proc]) -> None:
    daemon, api, vm = running
    await api.error("GET", "/api/partitions/vm9", 404, "no partition named 'vm9'")
    await api.error("GET", "/api/partitions/vm9/channels", 404, "no partition named 'vm9'")
    await api.error("POST", "/api/partitions/vm9/input/text", 404, "no partition named 'vm9'", body={"text": "x"})
    await api.error("GET", "/api/devices/floppy", 404, "no device named 'floppy'")
    await api.error("DELETE", "/api/partitions/vm1/devices/floppy", 404, "no device named 'floppy'")
    await api.error("GET", "/api/nothing-here", 404, "no such resource")
    await api.error("PUT", "/api/partitions", 405, "PUT is not allowed")
    text = "/api/partitions/vm1/input/text"
    await api.error("POST", text, 400, "must be a JSON object", raw=b"{not json")
    await api.error("POST", text, 400, "must be a JSON object", raw=b"\xff\xfe")
    await api.error("POST", text, 400, "not list", body=[1, 2])
    await api.error("POST", text, 400, "needs 'text'", body={})
    await api.error("POST", text, 400, "'text' must be str, not int", body={"text": 5})
    await api.error("POST", text, 413, "too large", raw=b"x" * (MAX_BODY + 1))
    await api.error("POST", text, 415, "Content-Type: application/json, not text/plain", raw=b'{"text": "x"}',
                    headers={"Content-Type": "text/plain"})
    await api.error("POST", text, 403, "cross-origin request from http://evil.example refused", body={"text": "x"},
                    headers={"Origin": "http://evil.example", "Content-Type": "application/json"})
    await api.error("DELETE", "/api/partitions/vm1/devices/keyboard", 403, "cross-origin",
                    headers={"Origin": "http://evil.example"})
    await api.error("GET", "/api/partitions", 403, "Host 'evil.example:80' is not a loopback address",
                    headers={"Host": "evil.example:80"})
    same_origin = {"Origin": api.url, "Content-Type": "application/json"}
    status, _ = await api.call("POST", text, {"text": ""}, headers=same_origin)
    assert status == 200, "a same-origin request (the web console's) was refused"
    await api.error("POST", "/api/partitions/vm1/input/keys", 400, "unknown key", body={"keys": "ctrl+nokey"})
    await api.error("POST", "/api/partitions/vm1/input/keys", 400, "names no key", body={"keys": " "})
    await api.error("POST", "/api/partitions/vm1/input/key", 400, "make code", body={"make_code": 300})
    await api.error("POST", "/api/partitions/vm1/input/key", 400, "must be int", body={"make_code": True})
    mouse = "/api/partitions/vm1/input/mouse"
    await api.error("POST", mouse, 400, "outside a 10x10 screen", body={"x": 10, "y": 0, "width": 10, "height": 10})
    await api.error("POST", mouse, 400, "both 'width' and 'height'", body={"x": 1, "y": 0, "width": 10})
    await api.error("POST", mouse, 400, "", body={"x": 40000, "y": 0})
    await api.error("GET", "/api/partitions/vm9/screen.png", 404, "no partition named 'vm9'")
    # After all that the daemon still serves the partition and the API.
    assert (await api.get("/api/partitions/vm1"))["vmbus"]["state"] == "connected"
    assert not vm.events("session with the parent ended")
    assert daemon.partitions["vm1"].dropped_messages == 0


async def test_rescind_and_reoffer_through_the_api(running: tuple[ParentDaemon, Api, Proc]) -> None:
    daemon, api, vm = running
    relid = next(c["relid"] for c in (await api.get("/api/partitions/vm1/channels")) if c["device"] == "keyboard")
    status, _ = await api.call("POST", "/api/partitions/vm1/input/text", {"text": "before\n"})
    assert status == 200
    sent_before = await _keyboard_packets_out(api)
    assert sent_before > 0
    status, answer = await api.call("DELETE", "/api/partitions/vm1/devices/keyboard")
    assert status == 202 and answer["relid"] == relid and answer["state"] == "revoked", answer
    await asyncio.to_thread(vm.wait_event, "offer rescinded", 30.0, 0, relid=relid, device="keyboard")

    async def keyboard_channel() -> dict[str, Any] | None:
        return next((c for c in await api.get("/api/partitions/vm1/channels") if c["device"] == "keyboard"), None)

    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while await keyboard_channel() is not None:  # the guest released the relid
        assert loop.time() < end, "the child never released the rescinded keyboard channel"
        await asyncio.sleep(0.02)
    await api.error("POST", "/api/partitions/vm1/input/text", 409, "has no open keyboard channel", body={"text": "x"})
    assert await _keyboard_packets_out(api) >= sent_before, "a closed channel's packets left the _total counter"
    await api.error("DELETE", "/api/partitions/vm1/devices/keyboard", 409, "no offered keyboard channel")
    mark = vm.mark()
    status, answer = await api.call("POST", "/api/partitions/vm1/devices/keyboard")
    assert status == 202 and answer["state"] == "closed", answer
    await asyncio.to_thread(vm.wait_event, "device ready", 30.0, mark, device="keyboard")
    await api.error("POST", "/api/partitions/vm1/devices/keyboard", 409, "rescind it first")
    while (ch := await keyboard_channel()) is None or ch["state"] != "open":
        assert loop.time() < end + 30, f"the re-offered keyboard never opened: {ch}"
        await asyncio.sleep(0.02)
    kbd = daemon.device("keyboard")
    assert isinstance(kbd, KeyboardVsp)
    await until(lambda: "vm1" in kbd.sessions and kbd.sessions["vm1"].host.active, "the new keyboard is active")
    status, _ = await api.call("POST", "/api/partitions/vm1/input/text", {"text": "after hot add\n"})
    assert status == 200
    rec = await asyncio.to_thread(vm.wait_event, "line typed", 30.0, mark)
    assert rec["text"] == "after hot add", rec


async def _keyboard_packets_out(api: Api) -> float:
    status, text = await api.call("GET", "/metrics")
    assert status == 200, text
    family = _families(text)["vmbus_channel_packets"]
    return float(next(s.value for s in family.samples
                      if s.labels == {"device": "keyboard", "direction": "out"} and s.name.endswith("_total")))


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_metrics_parse_and_carry_the_expected_families(running: tuple[ParentDaemon, Api, Proc]) -> None:
    daemon, api, _ = running
    status, _ = await api.call("POST", "/api/partitions/vm1/input/text", {"text": "metrics\n"})
    assert status == 200
    status, text = await api.call("GET", "/metrics")
    assert status == 200, text
    fams = _families(text)
    expected = {"vmbus_partitions_connected": "gauge", "vmbus_partition_connections": "counter",
                "vmbus_transport_bytes": "counter", "vmbus_channel_packets": "counter",
                "vmbus_channel_ring_bytes": "counter", "vmbus_ring_used_bytes": "gauge",
                "vmbus_channels_opened": "counter", "vmbus_channel_open_duration_seconds": "histogram",
                "vmbus_event_loop_lag_seconds": "histogram", "vmbus_http_request_duration_seconds": "histogram",
                "vmbus_storage_requests": "counter", "vmbus_keyboard_events_sent": "counter",
                "vmbus_network_switch_frames": "counter", "vmbus_gpadls": "gauge"}
    for name, kind in expected.items():
        assert name in fams and fams[name].type == kind, f"{name} ({kind}) missing: {sorted(fams)}"
    samples = [s for f in fams.values() if f.name.startswith("vmbus_") for s in f.samples]
    assert not [s for s in samples if "partition" in s.labels], "a partition label without the opt-in"
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    assert value[("vmbus_partitions_connected", ())] == 1
    assert value[("vmbus_keyboard_events_sent_total", ())] > 0
    assert value[("vmbus_channel_packets_total", (("device", "storage"), ("direction", "in")))] > 0
    buckets = [s.labels["le"] for s in fams["vmbus_channel_open_duration_seconds"].samples if "le" in s.labels]
    assert "5e-06" in buckets and "+Inf" in buckets, buckets
    # The opt-in: a second server on the same daemon labels per-partition series.
    web = WebServer(daemon, HttpSettings(listen="127.0.0.1:0", partition_labels=True))
    url = await web.start()
    try:
        async with api.session.get(f"{url}/metrics") as resp:
            labelled = _families(await resp.text())
    finally:
        await web.stop()
    parts = {s.labels.get("partition") for f in labelled.values() if f.name.startswith("vmbus_") for s in f.samples}
    assert "vm1" in parts, parts
    assert "vmbus_network_port_frames" in labelled, sorted(labelled)


async def test_screen_png_hook_and_root_and_garbage(running: tuple[ParentDaemon, Api, Proc]) -> None:
    """The hook the video device fills (``VideoVsp.screens[name].png()``), ``/`` and bytes that are not HTTP."""
    daemon, api, _ = running
    video = daemon.device("video")
    assert video is not None

    screens = video.screens  # type: ignore[attr-defined]
    await until(lambda: "vm1" in screens and screens["vm1"].active, "vm1 has an active screen at the parent")
    async with api.session.get(f"{api.url}/api/partitions/vm1/screen.png") as resp:
        assert resp.status == 200 and resp.content_type == "image/png", resp
        image = Image.open(io.BytesIO(await resp.read()))
    screen = screens["vm1"]
    assert image.format == "PNG" and image.size == (screen.width, screen.height), (image.format, image.size)
    held = screens.pop("vm1")
    try:
        await api.error("GET", "/api/partitions/vm1/screen.png", 404, "has no screen yet")
    finally:
        screens["vm1"] = held
    async with api.session.get(f"{api.url}/", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "/api/", resp
    host, port = api.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x00\x01garbage that is not HTTP\r\n\r\n" * 10)
    await writer.drain()
    answer = await reader.read(4096)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400", answer[:80]
    assert (await api.get("/api/partitions/vm1"))["name"] == "vm1"


async def test_a_non_loopback_address_needs_a_token(tmp_path: Path) -> None:
    """Off loopback the API does not start without a token; with one, a request without it is a 401 (the full
    token, cookie and send-keys story with a real parent process is in test_auth.py)."""
    cfg = Config(listen=[f"unix:{tmp_path}/vmbus.sock"], data_dir=str(tmp_path / "var"))
    daemon = ParentDaemon(cfg)
    with pytest.raises(StartupError, match="reachable from other hosts with no authentication"):
        await WebServer(daemon, HttpSettings(listen="0.0.0.0:0", explicit=True)).start()
    web = WebServer(daemon, HttpSettings(listen="0.0.0.0:0", explicit=True, token="t" * 40))
    url = await web.start()
    try:
        assert url is not None
        local = url.replace("0.0.0.0", "127.0.0.1")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{local}/api/partitions") as resp:
                assert resp.status == 401, resp
            async with session.get(f"{local}/api/partitions", headers={"Authorization": "Bearer " + "t" * 40}) as resp:
                assert resp.status == 200, resp
    finally:
        await web.stop()
