"""The synthetic video VSC (Linux drivers/video/fbdev/hyperv_fb.c ``hvfb_probe``).

The version handshake offers the versions ``synthvid_connect_vsp`` picks for the negotiated VMBus version;
then, as ``hvfb_getmem`` and ``synthvid_send_config`` do, the driver takes the offer's ``mmio_megabytes`` (8 MiB)
of guest memory as its VRAM, shares it with a GPADL, and runs ``vmbus_proto.devices.video.guest.SynthvidGuest``:
the modes, VRAM_LOCATION and its ACK, the pointer, the screen. The rest of the guest draws through a
:class:`~.framebuffer.Framebuffer`; damage leaves as DIRT at most every 50 ms, with the pixels of its
rectangles riding along over the stream (docs/protocol.md §10.3). Removal is Linux's: CLOSECHANNEL, then the
VRAM GPADL torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.base import Handshake, HandshakeTrace
from vmbus_proto.devices.video import guest as vguest
from vmbus_proto.devices.video import synthvid
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PAGE_SIZE, Packet

from ...guest_memory import OutOfGuestMemory
from ...vsc import HANDSHAKE_TIMEOUT, HandshakeVsc
from .framebuffer import Framebuffer
from .service import VideoService


class VideoVsc(HandshakeVsc):
    module = synthvid
    Service = VideoService

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.guest: vguest.SynthvidGuest | None = None
        self.framebuffer: Framebuffer | None = None
        self.vram_pfns: list[int] = []
        self.vram_gpadl: int | None = None
        self._trace: HandshakeTrace | None = None
        self._send_lock = asyncio.Lock()
        self._sending: asyncio.Task[None] | None = None
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0
        self._syncs: list[asyncio.Future[None]] = []
        self.on_sent: Callable[[list[Packet]], None] | None = None  # told of packets the channel took, in order

    def new_handshake(self) -> Handshake:
        return synthvid.VscHandshake.for_vmbus(self.bus.core.version)

    @property
    def vram_size(self) -> int:
        return (self.offer.mmio_megabytes or synthvid.SPEC.mmio_megabytes) << 20

    async def handshake(self, channel: Channel) -> None:
        await super().handshake(channel)  # VERSION_REQUEST / RESPONSE
        assert self.version is not None
        self._trace = HandshakeTrace(synthvid.describe) if self.bus.trace else None
        try:
            self.vram_pfns = self.memory.alloc(self.vram_size // PAGE_SIZE)
        except OutOfGuestMemory as exc:  # the device fails its probe; the others carry on
            raise DeviceProtocolError(f"no guest memory for the {self.vram_size >> 20} MiB VRAM: {exc}") from None
        self.vram_gpadl = await self.bus.create_gpadl(self.relid, self.vram_pfns)
        base = self.memory.offset_of(self.vram_pfns[0])
        hs = self.hs
        first = getattr(hs, "_next_trans_id", 1)
        guest = vguest.SynthvidGuest(self.version, self.vram_pfns[0] * PAGE_SIZE,
                                     self.memory.view[base:base + self.vram_size], first_trans_id=first,
                                     in_memory=channel.shared)
        self.guest = guest
        guest.start()
        await self._send_pending(channel)
        while not guest.ready:  # hyperv_fb waits up to 10 s for each answer
            pkt = await asyncio.wait_for(channel.recv(), HANDSHAKE_TIMEOUT)
            await self._receive(channel, pkt)
        self.framebuffer = Framebuffer(self, guest)
        self.log.info("screen set", width=guest.width, height=guest.height, vram=f"{guest.vram_gpa:#x}")

    async def run(self, channel: Channel) -> None:
        while True:
            await self._receive(channel, await channel.recv())

    async def _receive(self, channel: Channel, pkt: Packet) -> None:
        guest = self.guest
        assert guest is not None
        if self._trace is not None and synthvid.traced(pkt.payload):
            self.log.info(self._trace.line("H>G", pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload))
        for event in guest.receive(pkt):
            if isinstance(event, vguest.DirtChanged):
                self.log.info("host DIRT requests", enabled=event.enabled)
            elif isinstance(event, vguest.BiosInfo) and self._syncs:
                fut = self._syncs.pop(0)
                if not fut.done():
                    fut.set_result(None)
        self._arm()
        await self._send_pending(channel)

    # ---- sending: one ordered path for the state machine's packets ---------------------------------------------

    async def _send_pending(self, channel: Channel) -> None:
        guest = self.guest
        assert guest is not None
        async with self._send_lock:
            out = guest.data_to_send()
            for pkt in out:
                if self._trace is not None and synthvid.traced(pkt.payload):
                    self.log.info(self._trace.line("G>H", pkt.type, pkt.trans_id, False, pkt.payload))
                if not channel.try_send(pkt):
                    await channel.send(pkt)
            if out and self.on_sent is not None:
                self.on_sent(out)

    def schedule(self) -> None:
        """The framebuffer changed something: send what the state machine has queued, arm the DIRT timer."""
        self._arm()
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send_soon())

    async def _send_soon(self) -> None:
        channel = self.channel
        if channel is not None and self.guest is not None:
            with contextlib.suppress(ChannelClosed, ConnectionError):
                await self._send_pending(channel)

    def _arm(self) -> None:
        guest = self.guest
        when = guest.get_timer() if guest is not None else None
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if when is not None and self._timer_at <= max(when, loop.time()):
                return  # already due by then
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer_at = max(when, loop.time())
            self._timer = loop.call_at(self._timer_at, self._on_timer)  # uvloop's handle has no when()

    def _on_timer(self) -> None:
        self._timer = None
        guest = self.guest
        if guest is not None:
            guest.handle_timer(asyncio.get_running_loop().time())
            self.schedule()

    async def flush_now(self) -> None:
        guest, channel = self.guest, self.channel
        if guest is None or channel is None:
            raise ChannelClosed("the video channel is closed")
        guest.flush(asyncio.get_running_loop().time())
        await self._send_pending(channel)

    async def sync(self) -> None:
        """Wait until the host has handled everything sent so far (a BIOS_INFO_REQUEST round trip)."""
        guest, channel = self.guest, self.channel
        if guest is None or channel is None:
            raise ChannelClosed("the video channel is closed")
        fut = asyncio.get_running_loop().create_future()
        self._syncs.append(fut)
        guest.query_bios_info()
        await self._send_pending(channel)
        await asyncio.wait_for(fut, HANDSHAKE_TIMEOUT)

    # ---- removal ---------------------------------------------------------------------------------------------

    def _stop(self) -> None:
        self.framebuffer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sending is not None:
            self._sending.cancel()
            self._sending = None
        for fut in self._syncs:
            fut.cancel()
        self._syncs.clear()

    async def detach(self, rescinded: bool = False) -> None:
        """hvfb_remove: CLOSECHANNEL, then the VRAM's GPADL torn down and its pages freed."""
        self._stop()
        await super().detach(rescinded)
        gpadl, self.vram_gpadl = self.vram_gpadl, None
        if gpadl is not None and not rescinded:
            with contextlib.suppress(ChannelClosed, ConnectionError, DeviceProtocolError):
                await self.bus.teardown_gpadl(self.relid, gpadl)
        self._free_vram()

    def forget(self) -> None:
        self._stop()
        self._free_vram()
        super().forget()

    def _free_vram(self) -> None:
        guest, self.guest = self.guest, None
        if guest is not None:
            with contextlib.suppress(BufferError):
                guest.vram.release()  # guest memory can close once no view of it is left
        if self.vram_pfns:
            self.memory.free(self.vram_pfns)
            self.vram_pfns = []

