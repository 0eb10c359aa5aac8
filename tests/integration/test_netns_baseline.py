"""The kernel's own ping and iperf3 between network namespaces: over a plain veth pair (proving the fixtures and
the tools), and over two TAP devices joined by the parent's virtual switch (``switch.TapUplink`` on
``vmbus_proto/aio/tap.py``, virtio-net headers on, so large segments cross the switch as they will over VMBus).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from parent_partition.devices.network.switch import Switch, TapUplink
from vmbus_proto.aio.tap import Tap

from .netns import Netns, iperf3, iperf3_server, ping, tap_name, veth

A_IP, B_IP = "169.254.77.1", "169.254.77.2"


def check_ping(src: Netns, target: str) -> None:
    res = ping(src, target, count=20)
    assert res["sent"] == 20 and res["loss_pct"] == 0.0, f"ping {target} from {src.name}: {res['output'].strip()}"


def check_iperf(client: Netns, server: Netns, on_start: Callable[[Any], None] | None = None) -> list[dict[str, Any]]:
    runs = []
    with iperf3_server(server, B_IP):
        for reverse in (False, True):
            r = iperf3(client, B_IP, seconds=2, reverse=reverse, on_start=on_start)
            assert r["received_bps"] > 0, f"iperf3 {'-R ' if reverse else ''}moved no data: {r}"
            runs.append(r)
    return runs


def describe(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{'B->A' if r['reverse'] else 'A->B'} {r['received_bps'] / 1e9:.2f} Gbit/s" for r in runs)


def test_veth_ping_and_iperf3(netns_factory: Callable[[], Netns], record_property: Any) -> None:
    a, b = netns_factory(), netns_factory()
    veth(a, b, f"{A_IP}/24", f"{B_IP}/24")
    check_ping(a, B_IP)
    runs = check_iperf(a, b)
    record_property("veth_iperf3", runs)
    print(f"veth iperf3: {describe(runs)}")


class Forwarder:
    """The parent's switch with two TAP uplinks, on an event loop in its own thread (the test body blocks)."""

    def __init__(self, taps: list[Tap]) -> None:
        self.loop = asyncio.new_event_loop()
        self.switch = Switch()
        self.uplinks: list[TapUplink] = []
        self.cpu_s = 0.0
        self._thread = threading.Thread(target=self._run, name="tap-forwarder", daemon=True)
        self._thread.start()

        async def attach() -> None:
            self.uplinks = [TapUplink(self.switch, t) for t in taps]

        asyncio.run_coroutine_threadsafe(attach(), self.loop).result(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        t0 = time.thread_time()
        self.loop.run_forever()
        self.cpu_s = time.thread_time() - t0

    def stop(self) -> None:
        async def detach() -> None:
            for u in self.uplinks:
                u.close()

        asyncio.run_coroutine_threadsafe(detach(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


@pytest.fixture(params=["vnet-both", "vnet-a-only"])
def tap_pair(request: pytest.FixtureRequest, netns_factory: Callable[[], Netns],
             tap_allowed: None) -> Iterator[tuple[Netns, Netns, Forwarder]]:
    """Two namespaces, a TAP in each, joined by the switch. "vnet-a-only": B's TAP has no virtio-net header, so
    A's large TCP segments are cut in software (``vnet.segment_tcp``) and checksums filled for B."""
    a, b = netns_factory(), netns_factory()
    taps: list[Tap] = []
    fwd = None
    try:
        for ns, ip in ((a, A_IP), (b, B_IP)):
            tap = Tap.open(tap_name(), netns=ns.name, vnet_hdr=ns is a or request.param == "vnet-both")
            taps.append(tap)
            ns.address(tap.name, f"{ip}/24")
        fwd = Forwarder(taps)
        yield a, b, fwd
    finally:
        if fwd is not None:
            fwd.stop()
        for t in taps:
            t.close()


def test_tap_switch_ping_and_iperf3(tap_pair: tuple[Netns, Netns, Forwarder], record_property: Any) -> None:
    a, b, fwd = tap_pair
    check_ping(a, B_IP)
    check_ping(b, A_IP)
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    t0 = time.monotonic()
    runs = check_iperf(a, b)
    cpu = (sum(me.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    stats = fwd.switch.stats()
    record_property("tap_switch_iperf3", runs)
    record_property("switch_stats", stats)
    ports = stats["ports"]
    assert isinstance(ports, dict) and all(p["drops"].get("too_big", 0) == 0 for p in ports.values()), stats
    if not fwd.uplinks[1].tap.vnet_hdr:
        assert fwd.switch.counters.segmented > 0, f"no large segment was cut for the plain TAP: {stats}"
    # Average frame size the kernel handed the TAPs: above 1514 means GSO segments crossed the switch whole.
    avg = [round(u.tap.counters.rx_bytes / max(1, u.tap.counters.rx_frames)) for u in fwd.uplinks]
    record_property("tap_avg_frame_bytes", avg)
    print(f"TAP + switch iperf3: {describe(runs)}; forwarder process {cpu:.2f} cores; average frame read from "
          f"each TAP {avg} bytes; switch {stats['switch']}")
