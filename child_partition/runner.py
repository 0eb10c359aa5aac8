"""One child partition's life: connect, negotiate, bind a VSC to every offer, run, and shut down cleanly.

The guest-side order is Linux's: vmbus_connect (INITIATE_CONTACT, newest version first), REQUESTOFFERS,
probe a driver per offer (GPADL for the ring, OPENCHANNEL, device handshake); on rescind the driver is
removed (CLOSECHANNEL, no teardown, RELID_RELEASED); on shutdown every channel is closed and its GPADL
torn down, then UNLOAD waits for UNLOAD_RESPONSE (drivers/hv/vmbus_drv.c ``hv_kexec_handler`` /
``vmbus_initiate_unload``). A lost connection is retried with exponential backoff and renegotiated.

With ``--nbd`` every LUN the StorVSC finds is exported over NBD: LUN 0 as the partition's name (and as the
default export), LUN n as ``<name>-lun<n>``. The NBD address is bound before the VM is brought up, so a busy
port ends the run before any VMBus traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from typing import Any

from vmbus_proto import messages as m
from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import ChannelClosed
from vmbus_proto.aio.endpoint import parse_endpoint
from vmbus_proto.errors import ProtocolError
from vmbus_proto.versions import version_text

from .bus import BusError, GuestBus
from .guest_memory import GuestMemory
from .nbd import NbdServer
from .storvsc import GuestDisk, StorageVsc
from .vsc import EchoVsc, KeyboardVsc, MouseVsc, NetworkVsc, VideoVsc, Vsc

# The guest's drivers, bound to offers by class GUID (Linux's hv_vmbus_device_id tables).
VSC_BY_CLASS: dict[uuid.UUID, type[Vsc]] = {
    cls.spec.class_id: cls for cls in (StorageVsc, NetworkVsc, VideoVsc, KeyboardVsc, MouseVsc, EchoVsc)}

NEGOTIATE_TIMEOUT = 30.0


async def open_bus(url: str, name: str, **kw: Any) -> GuestBus:
    loop = asyncio.get_running_loop()
    kind, where, port = parse_endpoint(url)
    bus: GuestBus
    if kind == "tcp":
        _, bus = await loop.create_connection(lambda: GuestBus(name, **kw), where, port)
    else:
        _, bus = await loop.create_unix_connection(lambda: GuestBus(name, **kw), where)
    return bus


class ChildPartition:
    def __init__(self, url: str, name: str, *, trace: bool = False, memory: int = 512 * 1024 * 1024,
                 versions: list[int] | None = None, reconnect: bool = True, nbd: str | None = None,
                 log: Any = None) -> None:
        self.url = url
        self.name = name
        self.trace = trace
        self.versions = versions
        self.reconnect = reconnect
        self.log = log if log is not None else logs.get(partition=name)
        self.memory = GuestMemory(memory)
        self.vscs: dict[int, Vsc] = {}
        self.bus: GuestBus | None = None
        self.version = 0
        self.ready = asyncio.Event()
        self.sessions = 0
        self.nbd_url = nbd
        self.nbd: NbdServer | None = None
        self.disks: dict[int, GuestDisk] = {}  # by LUN, kept across reconnects
        self.exit_status = 0
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def disk(self) -> GuestDisk:
        """LUN 0."""
        return self.disks.setdefault(0, GuestDisk(0))

    def export_name(self, lun: int) -> str:
        """The NBD export name of a LUN."""
        return self.name if lun == 0 else f"{self.name}-lun{lun}"

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the exit status (0 after a clean unload). Raises NbdListenError,
        before connecting to the parent, if the NBD address cannot be bound."""
        self._stop = stop
        try:
            if self.nbd_url is not None:
                self.nbd = NbdServer(log=self.log.bind(component="nbd"))
                try:
                    await self.nbd.start(self.nbd_url, serving=False)
                except OSError as exc:
                    self.nbd = None
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                    raise NbdListenError(f"cannot listen for NBD on {self.nbd_url}: {reason}") from exc
            status = await self._run(stop)
            return status or self.exit_status
        finally:
            if self.nbd is not None:
                await self.nbd.close()
                self.nbd = None

    async def _run(self, stop: asyncio.Event) -> int:
        backoff = 0.1
        while not stop.is_set():
            try:
                self.bus = await open_bus(self.url, self.name, trace=self.trace, versions=self.versions,
                                          log=self.log)
            except OSError as exc:
                self.log.warning("cannot reach the parent", url=self.url, error=str(exc), retry_in=round(backoff, 2))
                if not self.reconnect or await _wait(stop, backoff):
                    return 0 if stop.is_set() else 1
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                await self._session(self.bus, stop)
                backoff = 0.1
            except (ConnectionError, BusError, TimeoutError, ChannelClosed, ProtocolError) as exc:
                self.log.warning("session with the parent ended", error=str(exc) or type(exc).__name__)
                await self._forget(self.bus)
                if not self.reconnect:
                    return 1
                delay = backoff * (0.5 + random.random())
                self.log.info("reconnecting", retry_in=round(delay, 2))
                if await _wait(stop, delay):
                    break
                backoff = min(backoff * 2, 5.0)
        return 0

    async def _session(self, bus: GuestBus, stop: asyncio.Event) -> None:
        self.sessions += 1
        offers = await asyncio.wait_for(bus.negotiate(), NEGOTIATE_TIMEOUT)
        self.version = bus.core.version
        self.log.info("VMBus negotiated", version=version_text(bus.core.version), offers=len(offers))
        bus.on_rescind = lambda relid: self._spawn(self._rescinded(relid))
        bus.on_offer = lambda offer: self._spawn(self._attach(offer))
        await asyncio.gather(*(self._attach(o) for o in sorted(offers.values(), key=lambda o: o.child_relid)))
        self.log.info("all offered channels open", channels=len(self.vscs),
                      devices=sorted(v.spec.name for v in self.vscs.values()),
                      versions={v.spec.name: v.spec.version_text(v.version)
                                for v in self.vscs.values() if v.version is not None})
        await self._export_disk()
        self.ready.set()
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        lost: asyncio.Future[Any] = bus.closed_future
        await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if bus.closed_future.done():
            self.ready.clear()
            raise ConnectionResetError(getattr(bus, "close_reason", None) or "connection to the parent lost")
        await self.shutdown(bus)

    async def _attach(self, offer: m.OfferChannel) -> None:
        cls = VSC_BY_CLASS.get(offer.if_type)
        if cls is None:
            self.log.info("no driver for offer", relid=offer.child_relid, class_id=str(offer.if_type))
            return
        assert self.bus is not None
        vsc = cls(self.bus, self.memory, offer, self.log)
        self.vscs[offer.child_relid] = vsc
        await vsc.attach()
        vsc.log.info("device ready", version=vsc.spec.version_text(vsc.version) if vsc.version is not None else None)
        if isinstance(vsc, StorageVsc):
            for lun in sorted(vsc.disks):
                self.disks.setdefault(lun, GuestDisk(lun)).attach(vsc)

    async def _export_disk(self) -> None:
        """Serve every LUN over NBD once attached (exports are kept across reconnects; a LUN that appears
        later is added). If that fails the VM is unloaded cleanly and the run ends with status 1."""
        if self.nbd is None:
            return
        try:
            added = []
            for lun, disk in sorted(self.disks.items()):
                name = self.export_name(lun)
                if name in self.nbd.exports or not disk.size:
                    continue
                self.nbd.add_export(disk, name, f"{self.name} LUN {lun}: {disk.vendor} {disk.product}".strip())
                added.append((lun, name, disk))
            if self.nbd.exports:
                await self.nbd.serve()
            for lun, name, disk in added:  # said once clients can connect
                self.log.info("disk exported over NBD", lun=lun, uri=self.nbd.uri_for(name), size=disk.size,
                              read_only=disk.read_only)
        except (OSError, ValueError) as exc:
            self.log.error("cannot export the disks over NBD; shutting the VM down", error=str(exc))
            self.exit_status = 1
            if self._stop is not None:
                self._stop.set()

    async def _rescinded(self, relid: int) -> None:
        vsc = self.vscs.pop(relid, None)
        self.log.info("offer rescinded", relid=relid, device=vsc.spec.name if vsc else None)
        for disk in self.disks.values():
            if vsc is not None and vsc is disk.vsc:
                disk.detach()
        if vsc is not None:
            await vsc.detach(rescinded=True)
        if self.bus is not None:
            self.bus.release_relid(relid)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, bus: GuestBus) -> None:
        """Close every channel, tear down its GPADL, then UNLOAD."""
        for task in list(self._tasks):
            task.cancel()
        if self.nbd is not None:
            await self.nbd.close()  # in-flight NBD requests finish on the channel first
            self.nbd = None
        for disk in self.disks.values():
            disk.detach()
        await asyncio.gather(*(v.detach() for v in list(self.vscs.values())))
        self.vscs.clear()
        await asyncio.wait_for(bus.unload(), NEGOTIATE_TIMEOUT)
        self.log.info("unloaded cleanly")
        bus.close()
        await asyncio.shield(bus.closed_future)

    async def _forget(self, bus: GuestBus | None) -> None:
        """After a lost connection: guest-side state goes; pages are returned."""
        for disk in self.disks.values():
            disk.detach()
        for vsc in self.vscs.values():
            vsc.forget()
        self.vscs.clear()
        if bus is not None:
            bus.close()


class NbdListenError(Exception):
    """The NBD address given with ``--nbd`` cannot be bound (e.g. the port is in use)."""


async def _wait(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` unless ``stop`` is set first; returns whether it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()
