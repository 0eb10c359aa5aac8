"""VSC drivers: the guest half of each device, bound to an offer by its class GUID.

Each VSC does what its Linux driver's probe does (drivers/scsi/storvsc_drv.c ``storvsc_probe``,
drivers/net/hyperv/netvsc.c ``netvsc_device_add``, drivers/video/fbdev/hyperv_fb.c ``hvfb_probe``,
drivers/hid/hid-hyperv.c ``mousevsc_probe``, drivers/input/serio/hyperv-keyboard.c ``hv_kbd_probe``):
allocate ring pages, share them with a GPADL, open the channel with the send ring first and the
receive ring at the downstream offset, then run the device's protocol-version handshake. Teardown is
the real order: CLOSECHANNEL, then GPADL_TEARDOWN (skipped when rescinded).

The plug-in contract, guest side: a VSC class names its device ``spec`` and, if the device serves the rest
of the guest (a disk and its NBD export, a NIC, a console), its ``Service``: one object per child process,
kept across reconnects, told ``on_ready``/``on_lost`` as its VSCs come and go, so the runner holds no
device code. Sub-channel offers (``sub_channel_index`` > 0) go to the primary's VSC, which opens them as
Linux's ``vmbus_set_sc_create_callback`` drivers do (storvsc ``storvsc_sc_created``).
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from vmbus_proto import messages as m
from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.base import DeviceSpec, Handshake, HandshakeModule, HandshakeTrace, Incoming
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PAGE_SIZE, Packet

from .bus import GuestBus
from .guest_memory import GuestMemory

if TYPE_CHECKING:
    from .runner import ChildPartition

HANDSHAKE_TIMEOUT = 10.0  # Linux waits 5-10 s for these answers (hid-hyperv, hyperv_fb, hyperv-keyboard)


@dataclass(slots=True)
class GuestContext:
    """What a guest service gets from the child partition it serves."""

    name: str  # the partition's name
    log: Any
    options: dict[str, Any] = field(default_factory=dict)  # the service's command-line options
    partition: ChildPartition | None = None  # the partition itself: its bus, channels and other services


class GuestServiceError(Exception):
    """A guest service cannot start (its message is the one line the command prints)."""


class GuestService:
    """A device's service to the rest of the guest, one per child process, kept across reconnects."""

    def __init__(self, ctx: GuestContext) -> None:
        self.ctx = ctx
        self.log = ctx.log

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this service's options to ``child-partition run``."""

    async def start(self) -> None:
        """Before the first connection (bind what must be bound); GuestServiceError ends the run."""

    async def on_ready(self, vsc: Vsc) -> None:
        """``vsc`` attached: its channel is open and its handshake done."""

    def on_lost(self, vsc: Vsc) -> None:
        """``vsc`` went (rescinded, shut down, or the connection was lost)."""

    async def session_ready(self) -> None:
        """Every offered channel of this session is open (or failed)."""

    async def close(self) -> None:
        """The child is stopping: end the service (in-flight work finishes on the channels first)."""


class Vsc:
    """One device's guest half on one channel."""

    spec: ClassVar[DeviceSpec]
    Service: ClassVar[type[GuestService] | None] = None

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
        self.subchannels: dict[int, SubChannel] = {}  # by relid, open
        self.service: GuestService | None = None  # this device's guest service (its options), set before attach

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
        try:
            await self.run(channel)
        except ChannelClosed:
            pass
        except Exception as exc:  # a driver's bug (a plug-in's, say) stops its device, never the partition
            self.log.error("device driver failed; the device has stopped", error=f"{type(exc).__name__}: {exc}",
                           exc_info=True)

    async def handshake(self, channel: Channel) -> None:
        pass

    async def run(self, channel: Channel) -> None:
        """The device's steady state after its handshake."""

    async def on_subchannel_offer(self, offer: m.OfferChannel) -> None:
        """A sub-channel of this device was offered. Drivers that use sub-channels open them here
        (``open_subchannel``); the others leave the offer alone, as a Linux driver without an
        ``sc_creation_callback`` does."""

    async def open_subchannel(self, offer: m.OfferChannel) -> SubChannel:
        """Ring GPADL and OPENCHANNEL for a sub-channel, the same ring size as the primary (storvsc opens
        sub-channels with ``storvsc_ringbuffer_size``, netvsc with its own)."""
        sc = SubChannel(self, offer)
        await sc.open()
        self.subchannels[sc.relid] = sc
        return sc

    async def on_subchannel_rescind(self, relid: int) -> None:
        """A sub-channel was rescinded: close it (no teardown; the runner releases the relid)."""
        sc = self.subchannels.pop(relid, None)
        if sc is not None:
            await sc.close(rescinded=True)

    async def detach(self, rescinded: bool = False) -> None:
        """Sub-channels first, then CLOSECHANNEL, then GPADL_TEARDOWN unless rescinded; frees the ring
        pages (Linux ``vmbus_close`` closes the sub-channels before the primary)."""
        subs, self.subchannels = list(self.subchannels.values()), {}
        await asyncio.gather(*(sc.close(rescinded=rescinded) for sc in subs))
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
        for sc in self.subchannels.values():
            sc.forget()
        self.subchannels.clear()
        if self.ring_pfns:
            self.memory.free(self.ring_pfns)
            self.ring_pfns = []


class SubChannel:
    """One open sub-channel of a VSC: its own rings and GPADL, the primary's device protocol."""

    def __init__(self, primary: Vsc, offer: m.OfferChannel) -> None:
        self.primary = primary
        self.offer = offer
        self.relid = offer.child_relid
        self.channel: Channel | None = None
        self.gpadl: int | None = None
        self.ring_pfns: list[int] = []

    async def open(self) -> None:
        vsc, pages = self.primary, self.primary.ring_pages
        self.ring_pfns = vsc.memory.alloc(2 * pages)
        self.gpadl = await vsc.bus.create_gpadl(self.relid, self.ring_pfns)
        self.channel = await vsc.bus.open_channel(self.relid, self.gpadl, 2 * pages, pages, vsc.open_userdata(),
                                                  name=vsc.spec.name)

    async def close(self, rescinded: bool = False) -> None:
        bus = self.primary.bus
        if self.channel is not None:
            bus.close_channel(self.relid)
            self.channel = None
        if self.gpadl is not None:
            gid, self.gpadl = self.gpadl, None
            if not rescinded:
                await bus.teardown_gpadl(self.relid, gid)
        self.forget()

    def forget(self) -> None:
        if self.ring_pfns:
            self.primary.memory.free(self.ring_pfns)
            self.ring_pfns = []


class HandshakeVsc(Vsc):
    """A VSC whose handshake is its device module's ``VscHandshake``."""

    module: HandshakeModule

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
            got = self._incoming(await channel.recv())
            if trace is not None:
                self.log.info(trace.received("H>G", got))
            outs = hs.receive(got)
        self.version = hs.negotiated_version

    @staticmethod
    def _incoming(pkt: Packet) -> Incoming:
        return Incoming(pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload)

    async def run(self, channel: Channel) -> None:
        while True:
            pkt = await channel.recv()
            self.log.debug("device packet", type=pkt.type, length=len(pkt.payload))
