"""The storage device's service to the rest of the guest: its disks, and their NBD export.

What Linux's SCSI midlayer and block layer do above storvsc, in the small: every LUN the StorVSC finds becomes
a ``GuestDisk`` that outlives the channel (I/O waits while the channel is down and resumes on the new one,
like a SCSI disk across a host adapter reset). With ``--nbd`` every LUN is exported over NBD: LUN 0 as the
partition's name (and as the default export), LUN n as ``<name>-lun<n>``. The NBD address is bound before
the VM is brought up, so a busy port ends the run before any VMBus traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import TYPE_CHECKING

from vmbus_proto.aio.cli import checked_url

from ...vsc import GuestContext, GuestService, GuestServiceError, Vsc
from .disk import GuestDisk
from .nbd import NbdServer, parse_listen

if TYPE_CHECKING:
    from .vsc import StorageVsc


class StorageService(GuestService):
    def __init__(self, ctx: GuestContext) -> None:
        super().__init__(ctx)
        self.disks: dict[int, GuestDisk] = {}  # by LUN, kept across reconnects
        self.nbd_url: str | None = ctx.options.get("nbd")
        self.nbd: NbdServer | None = None
        self._session_up = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--nbd", metavar="URL", type=checked_url(parse_listen),
                            help="export the VM's disks over NBD at HOST:PORT, tcp://HOST:PORT or unix:PATH (LUN 0 "
                                 "as NAME, LUN n as NAME-lunN), so qemu-img, qemu-io and nbdcopy can use them "
                                 "(default: not exported)")

    @property
    def disk(self) -> GuestDisk:
        """LUN 0."""
        return self.disks.setdefault(0, GuestDisk(0))

    def export_name(self, lun: int) -> str:
        """The NBD export name of a LUN."""
        return self.ctx.name if lun == 0 else f"{self.ctx.name}-lun{lun}"

    async def start(self) -> None:
        if self.nbd_url is None:
            return
        self.nbd = NbdServer(log=self.log.bind(component="nbd"))
        try:
            await self.nbd.start(self.nbd_url, serving=False)
        except OSError as exc:
            self.nbd = None
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise GuestServiceError(f"cannot listen for NBD on {self.nbd_url}: {reason}") from exc

    async def on_ready(self, vsc: Vsc) -> None:
        storage: StorageVsc = vsc  # type: ignore[assignment]  # this service's VSC is the StorVSC
        for lun in sorted(storage.disks):
            self.disks.setdefault(lun, GuestDisk(lun)).attach(storage)
        storage.on_luns_changed = lambda added, removed: self.luns_changed(storage, added, removed)

    def luns_changed(self, vsc: StorageVsc, added: list[int], removed: list[int]) -> None:
        """After a rescan (the host's ENUMERATE_BUS): a new LUN becomes a disk (and an NBD export once the
        session is up); a LUN that went makes its disk wait for it, as a Linux sd device whose LUN vanished
        fails its I/O after the timeout."""
        for lun in removed:
            disk = self.disks.get(lun)
            if disk is not None and disk.vsc is vsc:
                disk.detach()
        for lun in added:
            self.disks.setdefault(lun, GuestDisk(lun)).attach(vsc)
        self.log.info("storage LUNs changed", added=added, removed=removed)
        if added and self.nbd is not None and self._session_up:
            task = asyncio.get_running_loop().create_task(self._export_quietly())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _export_quietly(self) -> None:
        try:
            await self.session_ready()
        except GuestServiceError as exc:
            self.log.error("cannot export a new LUN over NBD", error=str(exc))

    def on_lost(self, vsc: Vsc) -> None:
        self._session_up = False
        for disk in self.disks.values():
            if disk.vsc is vsc:
                disk.detach()

    async def session_ready(self) -> None:
        """Serve every LUN over NBD once attached (exports are kept across reconnects; a LUN that appears
        later is added). A failure is a GuestServiceError: the VM is unloaded and the run ends with status 1."""
        self._session_up = True
        if self.nbd is None:
            return
        try:
            added = []
            for lun, disk in sorted(self.disks.items()):
                name = self.export_name(lun)
                if name in self.nbd.exports or not disk.size:
                    continue
                self.nbd.add_export(disk, name, f"{self.ctx.name} LUN {lun}: {disk.vendor} {disk.product}".strip())
                added.append((lun, name, disk))
            if self.nbd.exports:
                await self.nbd.serve()
            for lun, name, disk in added:  # said once clients can connect
                self.log.info("disk exported over NBD", lun=lun, uri=self.nbd.uri_for(name), size=disk.size,
                              read_only=disk.read_only)
        except (OSError, ValueError) as exc:
            raise GuestServiceError(f"cannot export the disks over NBD: {exc}") from exc

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.nbd is not None:
            await self.nbd.close()  # in-flight NBD requests finish on the channel first
            self.nbd = None
        for disk in self.disks.values():
            disk.detach()
