"""NetVSC: the guest half of the synthetic network adapter (Linux drivers/net/hyperv/netvsc.c,
rndis_filter.c, netvsc_drv.c).

The NVSP/RNDIS state machine is ``vmbus_proto.devices.network.guest.NvspGuest``, driven in Linux's order:
after NVSP INIT, NDIS_CONFIG and SEND_NDIS_VER, the receive buffer (16 MiB of guest pages shared by a GPADL,
SEND_RECV_BUF) and the send buffer (1 MiB, SEND_SEND_BUF), then RNDIS INITIALIZE and the queries and sets
Linux makes, until the NIC is up. This driver owns those pages and the GPADLs, moves packets, and gives the
rest of the guest a :class:`~.nic.Nic`. Removal is Linux's ``netvsc_device_remove``: RNDIS HALT, REVOKE of
both buffers, CLOSECHANNEL, then the buffer GPADLs torn down.

Sub-channels (Linux ``rndis_set_subchannel``, ``netvsc_sc_open``): when the host's RSS capabilities report
several queues the NetVSC asks for ``min(--net-queues, host queues) - 1`` sub-channels with NVSP SUBCHANNEL,
opens each offered one, receives on all of them (transfer-page packets may come on any, and are completed
on the channel they came on), and once all are open sets the send table and RSS for them. A frame is sent
on the queue the send indirection table picks for its flow hash (``netvsc_pick_tx``); the host's
SEND_INDIRECTION_TABLE replaces the table.

Over a stream a transfer-page packet brings the bytes of the ranges it names, which are copied into the
receive buffer before they are read; a frame copied into a send-buffer section travels with its
SEND_RNDIS_PKT (docs/protocol.md §7.4).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from vmbus_proto import messages as m
from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.network import guest as netguest
from vmbus_proto.devices.network import nvsp, offload, rndis, rss, vnet
from vmbus_proto.devices.network.buffers import DEFAULT_RECEIVE_BUFFER, DEFAULT_SEND_BUFFER
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PAGE_SIZE, GpaRange, Packet, PacketType, pages_spanned

from ...guest_memory import GuestMemory
from ...vsc import HandshakeVsc
from .nic import Nic
from .service import NetworkService

# Transmits awaiting their completion (a NIC's TX ring: a full one says busy). Each GPA-direct one holds its own
# pages until then, up to 17 of them for a 64 KiB GSO frame and its RNDIS header.
MAX_TX_IN_FLIGHT = 256

SETUP_TIMEOUT = 10.0  # Linux netvsc waits this long for each setup answer
DEFAULT_QUEUES = 8  # Linux VRSS_CHANNEL_DEFAULT (and at most VRSS_CHANNEL_MAX = 64)
RX_POLL = 64  # packets taken off the channel per wake-up before the flush (Linux's NAPI weight)


class PageView:
    """A buffer of contiguous guest pages as offsets (the receive or send buffer the GPADL shares)."""

    def __init__(self, memory: GuestMemory, pfns: list[int]) -> None:
        self.base = memory.offset_of(pfns[0])
        self.size = len(pfns) * PAGE_SIZE
        self.view = memory.view

    @property
    def mapping(self) -> memoryview:
        """The buffer's pages in place (``BufferView.mapping``)."""
        return self.view[self.base:self.base + self.size]

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise nvsp.NvspError(f"bytes {offset}..{offset + length} are outside a {self.size}-byte buffer")
        return bytes(self.view[self.base + offset:self.base + offset + length])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise nvsp.NvspError(f"bytes {offset}..{offset + len(data)} are outside a {self.size}-byte buffer")
        self.view[self.base + offset:self.base + offset + len(data)] = data


class NetworkVsc(HandshakeVsc):
    module = nvsp
    Service = NetworkService

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.guest: netguest.NvspGuest | None = None
        self.recv_pages: PageView | None = None
        self.nic: NetVscNic | None = None
        self.buffers: dict[str, tuple[int, list[int]]] = {}  # "receive"/"send" -> (GPADL id, pages)
        self._ready = asyncio.Event()
        self._torn_down = asyncio.Event()
        self._failed: str | None = None
        self._backlog: list[Packet] = []
        self._flushing: asyncio.Task[None] | None = None
        self.queues: dict[int, _Queue] = {}  # open sub-channels by index
        self.spreading = False  # every granted sub-channel is open and RSS was set for them
        self._tx_hash: rss.Toeplitz | None = None
        self._tx_blocks: list[list[int]] = []  # guest pages GPA-direct transmits name (their skbs' pages, in Linux)
        self._tx_free: dict[int, list[list[int]]] = {}  # blocks of completed direct transmits, by page count

    async def handshake(self, channel: Channel) -> None:
        await super().handshake(channel)  # NVSP INIT, newest first
        recv_gpadl, recv = await self._share("receive", DEFAULT_RECEIVE_BUFFER)
        self.recv_pages = recv
        send_gpadl, send = await self._share("send", DEFAULT_SEND_BUFFER)
        self._tx_blocks, self._tx_free = [], {}
        self.guest = netguest.NvspGuest(recv_gpadl=recv_gpadl, recv_view=recv, recv_size=recv.size,
                                        send_gpadl=send_gpadl, send_view=send, send_size=send.size,
                                        version=self.version, queues=self._wanted_queues(),
                                        direct_ranges=self._direct_ranges, direct_done=self._direct_done)
        self.guest.start()
        await self.flush(channel)
        while not self._ready.is_set():  # Linux's probe: every setup answer, then the NIC is up
            pkt = await asyncio.wait_for(channel.recv(), SETUP_TIMEOUT)
            await self._receive(channel, pkt)
            if self._failed:
                raise DeviceProtocolError(f"network setup failed: {self._failed}")

    def _direct_ranges(self, length: int) -> tuple[GpaRange, ...]:
        """A frame too large for a send section goes GPA-direct, naming pages of this guest's own memory (the
        parent refuses pages outside it, as Hyper-V does), its own until the send completes (Linux maps the
        skb's pages): over a stream its bytes travel with the packet, in shared memory the host reads them."""
        count = pages_spanned(0, length)
        free = self._tx_free.get(count)
        if free:
            pfns = free.pop()
        else:
            pfns = self.memory.alloc(count)
            self._tx_blocks.append(pfns)
        return (GpaRange(length, 0, tuple(pfns)),)

    def _direct_done(self, ranges: tuple[GpaRange, ...]) -> None:
        """A GPA-direct transmit completed: its pages take the next one."""
        for rng in ranges:
            self._tx_free.setdefault(len(rng.pfns), []).append(list(rng.pfns))

    async def _share(self, which: str, size: int) -> tuple[int, PageView]:
        pfns = self.memory.alloc(size // PAGE_SIZE)
        gpadl = await self.bus.create_gpadl(self.relid, pfns)
        self.buffers[which] = (gpadl, pfns)
        return gpadl, PageView(self.memory, pfns)

    async def run(self, channel: Channel) -> None:
        while True:
            await self._receive(channel, await channel.recv())

    async def _receive(self, channel: Channel, pkt: Packet | None) -> None:
        """``pkt`` and what else the channel already holds (up to ``RX_POLL`` packets, as NAPI polls), then
        one flush: their completions and answers leave together."""
        guest = self.guest
        assert guest is not None
        budget = RX_POLL
        while pkt is not None:
            if pkt.type == PacketType.DATA_USING_XFER_PAGES and pkt.data:
                self._absorb(pkt)
            try:
                events = guest.receive(pkt)
            except (nvsp.NvspError, rndis.RndisError) as exc:
                raise DeviceProtocolError(str(exc)) from None
            for event in events:
                self._event(event)
            budget -= 1
            # (a packet is taken off the channel only when it will be served in this batch)
            pkt = channel.recv_nowait() if budget and self._ready.is_set() else None
        await self.flush(channel)

    def _absorb(self, pkt: Packet) -> None:
        """The host's writes into our receive buffer, which travelled with the packet: copy them in."""
        pages = self.recv_pages
        assert pages is not None
        data, pos, end = memoryview(pkt.data), 0, len(pkt.data)
        view, base, size = pages.view, pages.base, pages.size
        for length, offset in pkt.xfer_ranges:  # vmtransfer_page_range: byte_count, byte_offset
            if offset >= 0 and length >= 0 and offset + length <= size and pos + length <= end:
                view[base + offset:base + offset + length] = data[pos:pos + length]  # PageView.write, inline
            pos += length

    def _event(self, event: netguest.Event) -> None:
        match event:
            case netguest.Ready():
                guest = self.guest
                assert guest is not None
                self.nic = NetVscNic(self, guest.mac, guest.mtu)
                self.nic.set_link(guest.connected)
                self._ready.set()
                self.log.info("NIC up", mac=":".join(f"{b:02x}" for b in guest.mac), mtu=guest.mtu,
                              link_speed=guest.link_speed)
            case netguest.Failed(reason=reason):
                self._failed = reason
            case netguest.FramesReceived(frames=frames):
                nic = self.nic
                if nic is not None:
                    # In shared memory a frame is a view of the receive buffer, which the host writes again as
                    # soon as our completion reaches it: copy it out first (netvsc copies into an skb, too).
                    copy = self.channel is not None and self.channel.shared
                    for frame, info in frames:  # checksum-OK PPI and RSC frames as receive offload metadata
                        nic.deliver(*offload.from_rx_info(bytes(frame) if copy else frame, info, nic.mtu))
            case netguest.LinkChanged(connected=up):
                if self.nic is not None:
                    self.nic.set_link(up)
            case netguest.TornDown():
                self._torn_down.set()
            case netguest.SubchannelsGranted(count=count):
                self.log.info("sub-channels granted", count=count)
                self._all_open()
            case netguest.SendTableChanged():
                pass  # transmit reads guest.send_table

    def packets(self) -> list[Packet]:
        """What the state machine wants sent, each send-buffer section's bytes riding with its packet."""
        guest = self.guest
        assert guest is not None
        out = guest.data_to_send()
        read = guest.send_view.read
        for pkt in out:
            if pkt.type == _INBAND and not pkt.data:
                fields = nvsp.unpack_rndis_packet(pkt.payload)
                if fields is not None and fields[1] != nvsp.NO_SECTION:
                    pkt.data = read(fields[1] * nvsp.SEND_SECTION_SIZE, fields[2])
        return out

    async def flush(self, channel: Channel) -> None:
        backlog = self._backlog
        backlog += self.packets()
        while backlog:
            pkt = backlog.pop(0)
            if not channel.try_send(pkt):
                await channel.send(pkt)
        if self.nic is not None:
            self.nic.tx_room()

    def transmit(self, frame: bytes, info: rndis.PacketInfo = rndis.NO_INFO) -> bool:
        """The NIC's transmit (with its per-packet info): into the state machine now, onto the ring now or by
        the flusher."""
        if self.spreading and (queue := self._tx_queue(frame)) is not None:
            return queue.transmit(frame, info)
        guest, channel = self.guest, self.channel
        if guest is None or channel is None or self._backlog or guest.tx_in_flight >= MAX_TX_IN_FLIGHT:
            return False
        guest.send_frame(frame, info)
        for pkt in self.packets():
            if self._backlog or not channel.try_send(pkt):
                self._backlog.append(pkt)
        if self._backlog and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self.flush(channel))
        return True

    async def detach(self, rescinded: bool = False) -> None:
        """netvsc_device_remove: HALT, the buffers revoked, CLOSECHANNEL, then the buffer GPADLs torn down."""
        guest, channel = self.guest, self.channel
        if self.nic is not None:
            self.nic.close()
        if guest is not None and channel is not None and not rescinded and guest.ready:
            with contextlib.suppress(ChannelClosed, TimeoutError, DeviceProtocolError):
                guest.close()
                await self.flush(channel)
                await asyncio.wait_for(self._torn_down.wait(), SETUP_TIMEOUT)
        if self.queues:
            self.log.info("NIC queues closing", **self.queue_counters())
        self._stop_queues()
        buffers, self.buffers = list(self.buffers.values()), {}  # taken before detach's forget() frees them
        await super().detach(rescinded)
        for gpadl, pfns in buffers:
            if not rescinded:
                with contextlib.suppress(ChannelClosed, ConnectionError):
                    await self.bus.teardown_gpadl(self.relid, gpadl)
            self.memory.free(pfns)
        self._free_tx_pages()

    def _free_tx_pages(self) -> None:
        for block in self._tx_blocks:
            self.memory.free(block)
        self._tx_blocks, self._tx_free = [], {}

    def forget(self) -> None:
        self._stop_queues()
        if self.nic is not None:
            self.nic.close()
        for _, pfns in self.buffers.values():
            self.memory.free(pfns)
        self.buffers.clear()
        self._free_tx_pages()
        super().forget()

    # ---- sub-channels ------------------------------------------------------------------------------------

    def _wanted_queues(self) -> int:
        """How many queues to ask for: ``--net-queues`` (as ``ethtool -L``), else Linux's default of 8."""
        queues = self.service.ctx.options.get("net_queues") if self.service is not None else None
        return int(queues) if queues else DEFAULT_QUEUES

    async def on_subchannel_offer(self, offer: m.OfferChannel) -> None:
        """``netvsc_sc_open``: open each sub-channel asked for (the offer may come before the SUBCHANNEL
        completion is read); once all granted are open the send table and RSS spread over them."""
        guest = self.guest
        index = offer.sub_channel_index
        if guest is None or not 0 < index <= guest.requested_subchannels or index in self.queues:
            return  # not ours to open (Linux leaves such an offer alone)
        sc = await self.open_subchannel(offer)
        assert sc.channel is not None
        queue = _Queue(self, index, sc.channel, sc.relid)
        self.queues[index] = queue
        queue.reader = asyncio.get_running_loop().create_task(queue.read())
        self.log.info("sub-channel open", subchannel=sc.relid, index=index, channels=len(self.queues) + 1)
        self._all_open()

    def _all_open(self) -> None:
        """rndis_set_subchannel once ``open_chn == num_chn``: the send table, then RSS, for every channel."""
        guest, channel = self.guest, self.channel
        if guest is None or channel is None or self.spreading or not guest.subchannels \
                or len(self.queues) < guest.subchannels:
            return
        self.spreading = True
        self._tx_hash = rss.Toeplitz(guest.rss_key)
        for event in guest.subchannels_opened(len(self.queues)):
            self._event(event)
        self._backlog += self.packets()
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self.flush(channel))
        self.log.info("NIC queues", channels=len(self.queues) + 1, send_table=list(guest.send_table))

    def _tx_queue(self, frame: bytes) -> _Queue | None:
        """netvsc_pick_tx: the send table's queue for the frame's flow hash (None: the primary)."""
        guest, hasher = self.guest, self._tx_hash
        if guest is None or hasher is None:
            return None
        data = rss.hash_input(frame)
        index = rss.send_queue(guest.send_table, None if data is None else hasher.hash(data))
        return self.queues.get(index) if index else None

    async def on_subchannel_rescind(self, relid: int) -> None:
        for index, queue in list(self.queues.items()):
            if queue.relid == relid:
                del self.queues[index]
                queue.stop()
        await super().on_subchannel_rescind(relid)

    def _stop_queues(self) -> None:
        queues, self.queues = list(self.queues.values()), {}
        for queue in queues:
            queue.stop()
        self.spreading = False

    def queue_counters(self) -> dict[str, Any]:
        """Frames received and sent on each channel (0: the primary)."""
        guest = self.guest
        rx = {i: q.rx_frames for i, q in sorted(self.queues.items())}
        tx = {i: q.tx_frames for i, q in sorted(self.queues.items())}
        if guest is not None:
            rx[0] = guest.counters.rx_frames - sum(rx.values())
            tx[0] = guest.counters.tx_frames - sum(tx.values())
        return {"rx_by_queue": dict(sorted(rx.items())), "tx_by_queue": dict(sorted(tx.items()))}


class _Queue:
    """One open sub-channel of the NetVSC: its reader, and its packets waiting for room on its ring."""

    def __init__(self, vsc: NetworkVsc, index: int, channel: Channel, relid: int) -> None:
        self.vsc, self.index, self.channel, self.relid = vsc, index, channel, relid
        self.backlog: list[Packet] = []
        self.reader: asyncio.Task[None] | None = None
        self.flushing: asyncio.Task[None] | None = None
        self.rx_frames = 0
        self.tx_frames = 0

    async def read(self) -> None:
        """netvsc_channel_cb on a sub-channel: receives (completed here) and transmit completions."""
        vsc = self.vsc
        try:
            while True:
                pkt = await self.channel.recv()
                if pkt.type == PacketType.DATA_USING_XFER_PAGES and pkt.data:
                    vsc._absorb(pkt)
                guest = vsc.guest
                assert guest is not None
                for event in guest.receive(pkt):
                    if isinstance(event, netguest.FramesReceived):
                        self.rx_frames += len(event.frames)
                    vsc._event(event)
                self._route(vsc.packets())
                await self.flush()
        except ChannelClosed:
            pass
        except (nvsp.NvspError, rndis.RndisError) as exc:
            vsc.log.error("sub-channel protocol error; it stops receiving", index=self.index, error=str(exc))

    def _route(self, packets: list[Packet]) -> None:
        """Completions go back on this channel; anything else (an RNDIS request a control answer let out) on
        the primary."""
        vsc = self.vsc
        for pkt in packets:
            (self.backlog if pkt.type == PacketType.COMP else vsc._backlog).append(pkt)
        if vsc._backlog and vsc.channel is not None and (vsc._flushing is None or vsc._flushing.done()):
            vsc._flushing = asyncio.get_running_loop().create_task(vsc.flush(vsc.channel))

    async def flush(self) -> None:
        channel = self.channel
        while self.backlog:
            pkt = self.backlog.pop(0)
            if not channel.try_send(pkt):
                await channel.send(pkt)
        if self.vsc.nic is not None:
            self.vsc.nic.tx_room()

    def transmit(self, frame: bytes, info: rndis.PacketInfo) -> bool:
        """A frame whose flow this queue carries: onto its ring now, or by its flusher."""
        guest = self.vsc.guest
        if guest is None or self.backlog or guest.tx_in_flight >= MAX_TX_IN_FLIGHT:
            return False
        guest.send_frame(frame, info)
        self.tx_frames += 1
        for pkt in self.vsc.packets():
            if self.backlog or not self.channel.try_send(pkt):
                self.backlog.append(pkt)
        if self.backlog and (self.flushing is None or self.flushing.done()):
            self.flushing = asyncio.get_running_loop().create_task(self._flush_quietly())
        return True

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(ChannelClosed):
            await self.flush()

    def stop(self) -> None:
        for task in (self.reader, self.flushing):
            if task is not None:
                task.cancel()
        self.backlog.clear()


_INBAND = PacketType.DATA_INBAND


class NetVscNic(Nic):
    """The NetVSC as the guest's network interface."""

    def __init__(self, vsc: NetworkVsc, mac: bytes, mtu: int) -> None:
        super().__init__(mac, mtu)
        self.vsc = vsc

    def _transmit(self, frame: bytes) -> bool:
        return self.vsc.transmit(frame)

    def _transmit_offload(self, frame: bytes, hdr: vnet.VnetHdr) -> bool:
        """Checksum and TCP segmentation left to the host, as netvsc_xmit does: the TX checksum or LSOv2 PPI (a
        large send in NDIS's length and pseudo-header convention)."""
        try:
            info = offload.to_info(frame, hdr)
        except ValueError:
            return super()._transmit_offload(frame, hdr)  # nothing RNDIS can carry: done in software here
        if info.lso is not None:
            frame = offload.to_lso_frame(frame, info.lso)
        return self.vsc.transmit(frame, info)
