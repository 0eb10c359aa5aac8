"""Storage sub-channels end to end: ``[storage] subchannels = N`` announced in QUERY_PROPERTIES, asked for by
the StorVSC with CREATE_SUB_CHANNELS, offered, opened, and carrying a real tool's I/O; a rescind of the
primary takes its sub-channels with it (theirs first), and a reoffer brings them back."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon
from vmbus_proto.aio import logs
from vmbus_proto.devices import registry

from .conftest import Parent, child

pytestmark = pytest.mark.integration
CHANNELS = len(registry.ALL)


def qemu_io(sock: Path, name: str, *commands: str) -> None:
    cmd = ["qemu-io", "-f", "raw", f"nbd+unix:///{name}?socket={sock}"]
    for c in commands:
        cmd += ["-c", c]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "failed" not in proc.stdout, f"qemu-io: {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("subchannels", [0, 4])
def test_subchannels_are_offered_opened_and_carry_io(tmp_path: Path, subchannels: int) -> None:
    assert shutil.which("qemu-io"), "qemu-io missing: apt-get install -y qemu-utils (make test does)"
    # The network device's sub-channels are off: every sub-channel here is storage's.
    parent = Parent(tmp_path, f"[storage]\nsubchannels = {subchannels}\n[network]\nsubchannels = 0\n")
    sock = tmp_path / "vm1.nbd"
    vm = child(tmp_path, parent.unix, "vm1", "--nbd", f"unix:{sock}")
    try:
        vm.wait_event("disk exported over NBD")
        opened = vm.events("sub-channel open")
        assert len(opened) == subchannels, opened
        # (the parent's lines may come after the child's)
        parent.wait_for(lambda r: r.get("event") == "channel open"
                        and len(parent.events("channel open")) >= CHANNELS + subchannels)
        assert len(parent.events("channel open")) == CHANNELS + subchannels
        if subchannels:
            assert vm.events("sub-channels requested")[0]["count"] == subchannels
            assert parent.events("sub-channels offered")[0]["count"] == subchannels
            assert sorted(e["index"] for e in opened) == list(range(1, subchannels + 1))
        else:
            assert not vm.events("sub-channels requested") and not parent.events("sub-channels offered")
        # A real tool's writes and reads, many at once, spread over every channel.
        qemu_io(sock, "vm1", *[f"aio_write -P 0x{i + 1:02x} {i * 64}k 64k" for i in range(40)], "aio_flush",
                *[f"aio_read -P 0x{i + 1:02x} {i * 64}k 64k" for i in range(40)], "aio_flush")
        assert vm.stop(signal.SIGINT) == 0
        done = parent.wait_for(lambda r: r.get("event") == "storage channel done"
                               and len(parent.events("storage channel done")) == 1 + subchannels)
        assert done
        served = {e["sub_channel"]: e["requests"] for e in parent.events("storage channel done")}
        assert sorted(served) == list(range(subchannels + 1))
        assert all(n > 0 for n in served.values()), f"a channel carried no I/O: {served}"
    finally:
        vm.stop()
        parent.stop()


async def test_rescinding_the_primary_takes_its_subchannels_first_and_a_reoffer_brings_them_back(
        tmp_path: Path) -> None:
    logs.setup("warning", json=True)
    cfg = Config(listen=[f"unix:{tmp_path}/vmbus.sock"], data_dir=str(tmp_path / "var"))
    cfg.section("storage").subchannels = 2
    cfg.section("network").subchannels = 0
    daemon = ParentDaemon(cfg)
    await daemon.start()
    vm = child(tmp_path, f"unix:{tmp_path}/vmbus.sock", "vm1", "--trace")
    try:
        await asyncio.to_thread(vm.wait_for, lambda r: len(vm.events("sub-channel open")) == 2)
        conn = daemon.partitions["vm1"]
        await _until(lambda: len(conn.channels) == CHANNELS + 2)
        subs = sorted(e["subchannel"] for e in vm.events("sub-channel open"))
        primary = conn.rescind("storage")
        assert primary is not None
        for relid in (*subs, primary):
            await asyncio.to_thread(vm.wait_event, f"G>H CHANNELMSG_RELID_RELEASED(13) child_relid={relid}")
        trace = [r["event"] for r in vm.lines if r["event"].startswith("H>G CHANNELMSG_RESCIND")]
        order = [int(t.rsplit("=", 1)[1]) for t in trace]
        assert order == [*subs, primary], f"sub-channels are rescinded before their primary: {order}"
        await _until(lambda: len(conn.channels) == CHANNELS - 1)
        # Hot add: the StorVSC binds again and asks for its sub-channels again.
        mark = vm.mark()
        conn.reoffer("storage")
        await asyncio.to_thread(vm.wait_for, lambda r: len(vm.events("sub-channel open")) == 4, 30.0, mark)
        await _until(lambda: len(conn.channels) == CHANNELS + 2)
        assert await asyncio.to_thread(vm.stop, signal.SIGINT) == 0
    finally:
        vm.stop()
        await daemon.shutdown()


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(poll(), timeout)
