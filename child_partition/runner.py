"""One child partition's life: connect, negotiate, bind a VSC to every offer, run, and shut down cleanly.

The guest-side order is Linux's: vmbus_connect (INITIATE_CONTACT, newest version first), REQUESTOFFERS,
probe a driver per offer (GPADL for the ring, OPENCHANNEL, device handshake); on rescind the driver is
removed (CLOSECHANNEL, no teardown, RELID_RELEASED); on shutdown every channel is closed and its GPADL
torn down, then UNLOAD waits for UNLOAD_RESPONSE (drivers/hv/vmbus_drv.c ``hv_kexec_handler`` /
``vmbus_initiate_unload``). A lost connection is retried with exponential backoff and renegotiated.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self.disk = GuestDisk()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the exit status (0 after a clean unload)."""
        try:
            return await self._run(stop)
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
            self.disk.attach(vsc)

    async def _export_disk(self) -> None:
        """Serve the guest's disk over NBD once it has been attached (kept across reconnects)."""
        if self.nbd_url is None or self.nbd is not None or not self.disk.size:
            return
        self.nbd = NbdServer(self.disk, export_name=self.name, log=self.log.bind(component="nbd"))
        await self.nbd.start(self.nbd_url)
        self.log.info("disk exported over NBD", uri=self.nbd.uri, size=self.disk.size,
                      read_only=self.disk.read_only)

    async def _rescinded(self, relid: int) -> None:
        vsc = self.vscs.pop(relid, None)
        self.log.info("offer rescinded", relid=relid, device=vsc.spec.name if vsc else None)
        if vsc is not None and vsc is self.disk.vsc:
            self.disk.detach()
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
        self.disk.detach()
        await asyncio.gather(*(v.detach() for v in list(self.vscs.values())))
        self.vscs.clear()
        await asyncio.wait_for(bus.unload(), NEGOTIATE_TIMEOUT)
        self.log.info("unloaded cleanly")
        bus.close()
        await asyncio.shield(bus.closed_future)

    async def _forget(self, bus: GuestBus | None) -> None:
        """After a lost connection: guest-side state goes; pages are returned."""
        self.disk.detach()
        for vsc in self.vscs.values():
            vsc.forget()
        self.vscs.clear()
        if bus is not None:
            bus.close()


async def _wait(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` unless ``stop`` is set first; returns whether it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()
