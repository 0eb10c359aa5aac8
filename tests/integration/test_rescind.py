"""Hot remove and re-add: the parent daemon runs in this test's event loop, the child is a real process."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from parent_partition.config import Config
from parent_partition.daemon import ParentDaemon
from vmbus_proto.aio import logs
from vmbus_proto.devices.registry import ALL as OFFERED

from .conftest import child

pytestmark = pytest.mark.integration


async def _until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


async def test_rescind_then_reoffer_with_a_live_child(tmp_path: Path) -> None:
    logs.setup("warning", json=True)
    cfg = Config(listen=[f"unix:{tmp_path}/vmbus.sock"], data_dir=str(tmp_path / "var"))
    cfg.section("network").subchannels = 0  # one channel per device: the counts below are of devices
    daemon = ParentDaemon(cfg)
    await daemon.start()
    vm = child(tmp_path, f"unix:{tmp_path}/vmbus.sock", "vm1", "--trace")
    try:
        await asyncio.to_thread(vm.wait_event, "all offered channels open")
        conn = daemon.partitions["vm1"]
        assert conn.core is not None and len(conn.channels) == len(OFFERED)
        relid = conn.rescind("storage")
        assert relid is not None
        # The guest closes the rescinded channel, skips the GPADL teardown and releases the relid.
        await asyncio.to_thread(vm.wait_event, f"G>H CHANNELMSG_RELID_RELEASED(13) child_relid={relid}")
        await _until(lambda: relid not in conn.core.channels)  # type: ignore[union-attr]
        trace = [r["event"] for r in vm.lines if r["event"].startswith(("G>H", "H>G"))]
        i = trace.index(f"H>G CHANNELMSG_RESCIND_CHANNELOFFER(2) child_relid={relid}")
        after = trace[i + 1:]
        assert f"G>H CHANNELMSG_CLOSECHANNEL(7) child_relid={relid}" in after
        assert not [t for t in after if "GPADL_TEARDOWN" in t and f"child_relid={relid}" in t]
        assert len(conn.channels) == len(OFFERED) - 1
        # Hot add: the same device is offered again and the guest binds its driver to it.
        mark = vm.mark()
        new_relid = conn.reoffer("storage")
        await asyncio.to_thread(vm.wait_event, "device ready", 10.0, mark, device="storage")
        await _until(lambda: len(conn.channels) == len(OFFERED))
        assert new_relid == relid  # the freed relid is reused
        assert await asyncio.to_thread(vm.stop, signal.SIGINT) == 0
        await _until(lambda: not daemon.partitions)
    finally:
        vm.stop()
        await daemon.shutdown()
