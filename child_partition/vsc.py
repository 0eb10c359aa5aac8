"""VSC drivers: the guest half of each device, bound to an offer by its class GUID.

Each VSC does what its Linux driver's probe does (drivers/scsi/storvsc_drv.c ``storvsc_probe``,
drivers/net/hyperv/netvsc.c ``netvsc_device_add``, drivers/video/fbdev/hyperv_fb.c ``hvfb_probe``,
drivers/hid/hid-hyperv.c ``mousevsc_probe``, drivers/input/serio/hyperv-keyboard.c ``hv_kbd_probe``):
allocate ring pages, share them with a GPADL, open the channel with the send ring first and the
receive ring at the downstream offset, then run the device's protocol-version handshake. Teardown is
the real order: CLOSECHANNEL, then GPADL_TEARDOWN (skipped when rescinded).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import ModuleType
from typing import Any

from vmbus_proto import messages as m
from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.base import DeviceSpec, Handshake, HandshakeTrace, Incoming
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PAGE_SIZE

from .bus import GuestBus
from .guest_memory import GuestMemory

HANDSHAKE_TIMEOUT = 10.0  # Linux waits 5-10 s for these answers (hid-hyperv, hyperv_fb, hyperv-keyboard)


class Vsc:
    """One device's guest half on one channel."""

    spec: DeviceSpec

    def __init__(self, bus: GuestBus, memory: GuestMemory, offer: m.OfferChannel, log: Any) -> None:
        self.bus = bus
        self.memory = memory
        self.offer = offer
        self.relid = offer.child_relid
        self.log = log.bind(relid=self.relid, device=self.spec.name)
        self.channel: Channel | None = None
        self.gpadl: int | None = None
        self.ring_pfns: list[int] = []
        self.version: int | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def ring_pages(self) -> int:
        """Pages of each ring, its header page included: the spec's per-direction ``ring_bytes`` as the Linux
        driver passes them to ``vmbus_open`` (already page-aligned, ``VMBUS_RING_SIZE`` applied)."""
        if self.spec.ring_bytes % PAGE_SIZE or self.spec.ring_bytes < 2 * PAGE_SIZE:
            raise ValueError(f"{self.spec.name}: ring of {self.spec.ring_bytes} bytes is not 2 or more whole pages")
        return self.spec.ring_bytes // PAGE_SIZE

    def open_userdata(self) -> bytes:
        return b""

    async def attach(self) -> None:
        """Ring GPADL, OPENCHANNEL, device handshake."""
        pages = self.ring_pages
        self.ring_pfns = self.memory.alloc(2 * pages)
        self.gpadl = await self.bus.create_gpadl(self.relid, self.ring_pfns)
        self.channel = await self.bus.open_channel(self.relid, self.gpadl, 2 * pages, pages,
                                                   self.open_userdata(), name=self.spec.name)
        await asyncio.wait_for(self.handshake(self.channel), HANDSHAKE_TIMEOUT)
        self._reader = asyncio.get_running_loop().create_task(self._run(self.channel))

    async def _run(self, channel: Channel) -> None:
        with contextlib.suppress(ChannelClosed):
            await self.run(channel)

    async def handshake(self, channel: Channel) -> None:
        pass

    async def run(self, channel: Channel) -> None:
        """The device's steady state after its handshake."""

    async def detach(self, rescinded: bool = False) -> None:
        """CLOSECHANNEL, then GPADL_TEARDOWN unless rescinded; frees the ring pages."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self.channel is not None:
            self.bus.close_channel(self.relid)
            self.channel = None
        if self.gpadl is not None:
            gid, self.gpadl = self.gpadl, None
            if not rescinded:
                await self.bus.teardown_gpadl(self.relid, gid)
        self.forget()

    def forget(self) -> None:
        """Return this driver's guest pages (after a detach, or when the connection was lost)."""
        if self.ring_pfns:
            self.memory.free(self.ring_pfns)
            self.ring_pfns = []


class HandshakeVsc(Vsc):
    """A VSC whose handshake is its device module's ``VscHandshake``."""

    module: ModuleType

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "module" in cls.__dict__:
            cls.spec = cls.module.SPEC

    def __init__(self, bus: GuestBus, memory: GuestMemory, offer: m.OfferChannel, log: Any) -> None:
        super().__init__(bus, memory, offer, log)
        self.hs: Handshake | None = None

    def new_handshake(self) -> Handshake:
        """The device module's VSC handshake for this channel (a VSC whose versions depend on the bus overrides it)."""
        hs: Handshake = self.module.VscHandshake()
        return hs

    async def handshake(self, channel: Channel) -> None:
        hs = self.new_handshake()
        self.hs = hs
        trace = HandshakeTrace(self.module.describe) if self.bus.trace else None
        outs = hs.start()
        while True:
            for out in outs:
                if trace is not None:
                    self.log.info(trace.sent("G>H", out))
                await channel.send(out.to_packet())
            if hs.done:
                break
            if hs.failed:
                raise DeviceProtocolError(f"{self.spec.name}: {hs.failed}")
            pkt = await channel.recv()
            got = Incoming(pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload)
            if trace is not None:
                self.log.info(trace.received("H>G", got))
            outs = hs.receive(got)
        self.version = hs.negotiated_version

    async def run(self, channel: Channel) -> None:
        while True:
            pkt = await channel.recv()
            self.log.debug("device packet", type=pkt.type, length=len(pkt.payload))
