"""The storage guest service: disks that outlive the channel, and LUNs the host adds or removes later
(ENUMERATE_BUS → rescan → ``on_luns_changed``) becoming disks and NBD exports, or going."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import structlog

from child_partition.devices.storage.service import StorageService
from child_partition.vsc import GuestContext


def lun(size: int) -> Any:
    return SimpleNamespace(size=size, block_size=512, read_only=False, max_transfer=1 << 18, supports_discard=False,
                           vendor="Msft", product="Virtual Disk")


def storvsc(**disks: Any) -> Any:
    return SimpleNamespace(disks={int(k[1:]): v for k, v in disks.items()}, log=structlog.get_logger(),
                           on_luns_changed=None)


async def test_a_lun_added_by_a_rescan_becomes_a_disk_and_an_nbd_export(tmp_path: Path) -> None:
    svc = StorageService(GuestContext("vm1", structlog.get_logger(), {"nbd": f"unix:{tmp_path}/vm1.nbd"}))
    await svc.start()
    try:
        vsc = storvsc(l0=lun(1 << 20))
        await svc.on_ready(cast(Any, vsc))
        await svc.session_ready()
        assert svc.nbd is not None and set(svc.nbd.exports) == {"vm1"}
        vsc.disks = {0: vsc.disks[0], 3: lun(2 << 20)}
        assert vsc.on_luns_changed is not None, "the service did not hook the StorVSC's rescan"
        vsc.on_luns_changed([3], [])
        assert svc.disks[3].size == 2 << 20 and svc.disks[3].vsc is vsc
        await asyncio.wait_for(_until(lambda: "vm1-lun3" in svc.nbd.exports), 10)  # type: ignore[union-attr]
        vsc.on_luns_changed([], [0])
        assert svc.disks[0].vsc is None, "a removed LUN's disk still points at the channel"
    finally:
        await svc.close()


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.01)
