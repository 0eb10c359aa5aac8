"""Network sub-channels and RSS end to end: a real parent with ``[network] subchannels = 3``, a real child
process and a child partition run in the test's process (over the same Unix socket), TCP flows between them
spread over the NIC's channels both ways (the receiver's queue by the guest's RSS table, the sender's by
the send indirection table), ping through it, and the queues cleaned up on a rescind and a shutdown;
``subchannels = 0`` keeps the single channel."""

from __future__ import annotations

import asyncio
import signal
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from child_partition.devices.network.service import NetworkService
from child_partition.devices.network.stack import address_for_name
from child_partition.devices.network.vsc import NetworkVsc
from child_partition.runner import ChildPartition
from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon
from parent_partition.devices.network.switch import mac_for
from parent_partition.devices.network.vsp import NetworkVsp
from vmbus_proto.aio import logs

from .conftest import BIN, child

pytestmark = pytest.mark.integration
FLOWS = 64


def tcp_frame(src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    tcp = struct.pack(">HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    return dst_mac + src_mac + b"\x08\x00" + ip + tcp


async def until(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def nics_of(vsp: NetworkVsp, partition: str) -> list[Any]:
    return [nic for (name, _), nic in vsp.nics.items() if name == partition]


@pytest.mark.parametrize("subchannels", [3, 0])
async def test_flows_spread_over_subchannels_both_ways_and_queues_go_with_the_nic(
        tmp_path: Path, subchannels: int) -> None:
    logs.setup("warning", json=True)
    url = f"unix:{tmp_path}/vmbus.sock"
    cfg = Config(listen=[url], data_dir=str(tmp_path / "var"))
    cfg.section("network").subchannels = subchannels
    daemon = ParentDaemon(cfg)
    await daemon.start()
    vsp = next(v for v in daemon.vsps if isinstance(v, NetworkVsp))
    vm2 = child(tmp_path, url, "vm2")
    stop = asyncio.Event()
    vm1 = ChildPartition(url, "vm1", reconnect=False, guest_stack=False)
    running = asyncio.get_running_loop().create_task(vm1.run(stop))
    try:
        await asyncio.to_thread(vm2.wait_event, "guest network stack up", 60.0)
        net = vm1.service(NetworkService)
        await asyncio.wait_for(net.nic_ready.wait(), 60.0)
        vsc = next(v for v in vm1.vscs.values() if isinstance(v, NetworkVsc))
        if subchannels:
            await until(lambda: vsc.spreading and len(vsc.queues) == subchannels, "vm1's sub-channels")
            await until(lambda: [n.host.rss is not None and len(n.queues) for n in nics_of(vsp, "vm2")] == [3],
                        "vm2's RSS table and sub-channels at the parent")
            opened = await asyncio.to_thread(vm2.wait_for, lambda r: len(vm2.events("sub-channel open")) == 3)
            assert opened, "vm2 did not open its 3 sub-channels"
        (nic2,) = nics_of(vsp, "vm2")
        assert nic2.host.max_subchannels == subchannels
        # Many flows from vm1 to vm2: TCP SYNs from different source ports.
        nic = net.nic
        assert nic is not None
        src, dst = address_for_name("vm1").ip.packed, address_for_name("vm2").ip.packed
        for i in range(FLOWS):
            await nic.send(tcp_frame(nic.mac, mac_for("vm2", "local"), src, dst, 33000 + i, 5201))
        host2 = nic2.host
        try:
            await until(lambda: host2.counters.rx_frames >= FLOWS, f"{FLOWS} frames delivered to vm2")
        except AssertionError as exc:  # where the others went: the NICs' and the switch's counters
            ports = [p.counters for p in vsp.switch.ports.values()]
            (nic1,) = nics_of(vsp, "vm1")
            ch = vsc.channel
            rings = ""
            if ch is not None and getattr(ch, "shared", False):
                out = ch.out_ring.mem.words  # type: ignore[attr-defined]
                rings = (f" ring out w={out[0]} r={out[1]} mask={out[2]} pending={out[3]} blocked="
                         f"{ch._blocked_writers} events_out={ch.events_out}")  # type: ignore[attr-defined]
            flight = vsc.guest.tx_in_flight if vsc.guest else "?"
            raise AssertionError(f"{exc}: vm2 {host2.counters}, vm1 {vsc.queue_counters()} host {nic1.host.counters}"
                                 f" backlog={len(vsc._backlog)} in_flight={flight}{rings}, switch "
                                 f"{vsp.switch.counters}, ports {ports}") from None
        if subchannels:
            used = {q: n for q, n in nic2.rx_by_queue.items() if n}
            assert len(used) > 1 and sum(used.values()) >= FLOWS, f"vm2's receives were not spread: {used}"
            sent = {q: n for q, n in vsc.queue_counters()["tx_by_queue"].items() if n}
            assert len(sent) > 1, f"vm1's transmits were not spread over its channels: {sent}"
            (nic1,) = nics_of(vsp, "vm1")
            assert len(nic1.queues) == 3 and nic1.host.counters.tx_frames >= FLOWS
        else:
            assert not vsc.queues and not nic2.queues and not vm2.events("sub-channel open")
        # The kernel-style ping through the switch still works.
        cmd = [str(BIN / "child-partition"), "ping", "--connect", url, "--name", "vm3", "-c", "3", "-i", "0.2",
               "vm2"]
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120,
                                       check=False)
        assert done.returncode == 0 and "3 received" in done.stdout, done.stdout + done.stderr
        # A rescind of vm1's NIC takes its sub-channels first; nothing of it stays at the parent.
        conn = daemon.partitions["vm1"]
        assert conn.rescind("network") is not None
        await until(lambda: not nics_of(vsp, "vm1") and "vm1" not in vsp.hosts and not vsc.queues,
                    "vm1's NIC and queues gone after the rescind")
        conn.reoffer("network")
        await until(lambda: any(isinstance(v, NetworkVsc) and len(v.queues) == subchannels and
                                (v.spreading or not subchannels) for v in vm1.vscs.values()),
                    "vm1's NIC back with its sub-channels after the reoffer")
        # vm2 shuts down: its queues close before the primary, and the parent keeps nothing of them.
        assert await asyncio.to_thread(vm2.stop, signal.SIGINT) == 0
        await until(lambda: not nics_of(vsp, "vm2") and "vm2" not in vsp.hosts, "vm2's NIC gone")
        off = [e for e in vm2.lines if e.get("level") in ("error", "warning")]
        assert not off, f"vm2 complained: {off}"
        if subchannels:
            (closing,) = vm2.events("NIC queues closing")
            assert sum(1 for n in closing["rx_by_queue"].values() if n) > 1, closing
    finally:
        stop.set()
        await asyncio.wait_for(running, 60.0)
        vm2.stop()
        await daemon.shutdown()
