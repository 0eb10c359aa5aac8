"""NetVSP: the host half of the synthetic network adapter, on a learning virtual switch.

Mirrors OpenVMM vm/devices/net/netvsp (``initialize``, ``main_loop``, ``process_endpoint_rx``): the NVSP/RNDIS
state machine is ``vmbus_proto.devices.network.host.NvspHost``; this device moves its packets, looks up and
holds the receive and send buffer GPADLs the guest names (SEND_RECV_BUF / SEND_SEND_BUF), joins the
partition's NIC to the switch as a port, hands the guest's transmits to the switch and writes what the
switch forwards into receive-buffer sub-allocations (transfer-page packets). A guest that stops completing
receives keeps every sub-allocation: further frames are dropped and counted, nothing is buffered.

Sub-channels (``[network] subchannels``, OpenVMM ``max_queues - 1``): the guest's NVSP SUBCHANNEL is granted
up to that count and the sub-channels offered; each one joins its primary's NIC as a queue (the receive and
send buffers are the primary's), carries SEND_RNDIS_PKT and its own transfer-page packets and completions.
Once all are open the guest gets SEND_INDIRECTION_TABLE; frames from the switch go to the queue the
guest's RSS indirection table picks for their Toeplitz hash (``vmbus_proto.devices.network.rss``).

Over a stream the host cannot map the guest's buffers: a transfer-page packet carries the bytes of the
ranges it names (the guest copies them into its receive buffer), and a send-buffer section's bytes travel
with the SEND_RNDIS_PKT that names it (docs/protocol.md §7.4).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Literal

from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.aio.tap import Tap, TapError
from vmbus_proto.devices.base import HandshakeTrace
from vmbus_proto.devices.network import host as nethost
from vmbus_proto.devices.network import nvsp, offload, rndis, rss, vnet
from vmbus_proto.errors import DeviceProtocolError, PacketError
from vmbus_proto.packets import Buffer, Packet

from ...counters import Sample
from ...memory import GpadlBuffer, GpadlHold, MappedMemory
from ...settings import ConfigError
from ...vsp import ChannelResources, HostContext, Vsp, offer_subchannels
from .settings import NetworkSettings
from .stats import SwitchStatsLog
from .switch import MAX_LARGE_FRAME, Frame, Port, PortDetached, Switch, TapUplink, format_mac, mac_for, port_fields

RX_BATCH = 64  # frames taken off the switch port per wake-up
RX_POLL = 64  # guest packets taken off the channel per wake-up before answering them


class StreamReceiveView:
    """The host's view of a receive buffer over a stream: what ``NvspHost`` writes at an offset waits here
    until the transfer-page packet naming it is sent, then leaves with it (nothing else is kept). Each write
    is taken once, by the packet that names its offset."""

    def __init__(self) -> None:
        self._offsets: list[int] = []  # in the order written, which is the order the packets name them
        self._data: list[bytes] = []

    def read(self, offset: int, length: int) -> bytes:
        offsets = self._offsets
        for i in range(len(offsets) - 1, -1, -1):
            if offsets[i] == offset:
                return self._data[i][:length]
        return b""

    def write(self, offset: int, data: bytes) -> None:
        self._offsets.append(offset)
        self._data.append(bytes(data))

    def write_many(self, offsets: list[int], pieces: list[bytes]) -> None:
        """``write`` for each (offset, piece): every piece of a frame in one call (BufferView.write_many)."""
        self._offsets += offsets
        self._data += map(bytes, pieces)

    def take(self, ranges: tuple[tuple[int, int], ...]) -> bytes:
        """The bytes of ``ranges`` (byte_count, byte_offset), which leave the view: in one join when they are
        the oldest writes in order (every packet NvspHost makes), else looked up one by one."""
        n = len(ranges)
        offsets, data = self._offsets, self._data
        if offsets[:n] == [offset for _, offset in ranges]:
            out = b"".join(data[:n])
            del offsets[:n], data[:n]
            return out
        found = dict(zip(offsets, data, strict=True))  # the latest write at each offset
        wanted = {offset for _, offset in ranges}
        rest = {offset: found[offset] for offset in offsets if offset not in wanted}
        self._offsets, self._data = list(rest), list(rest.values())
        return b"".join(found.get(offset, b"") for _, offset in ranges)


class StreamSendView:
    """The host's view of the send buffer over a stream: the section a SEND_RNDIS_PKT names is the data
    that travelled with that packet."""

    def __init__(self) -> None:
        self.current: Buffer = b""

    def read(self, offset: int, length: int) -> bytes:
        if len(self.current) < length:
            raise nvsp.NvspError(f"send-buffer section of {length} bytes came with {len(self.current)} bytes of data")
        return bytes(self.current[:length])

    def write(self, offset: int, data: bytes) -> None:
        raise nvsp.NvspError("the host never writes the guest's send buffer")


def _data(channel: Channel, pkt: Packet) -> Buffer:
    """The bytes a guest packet's GPA ranges name: with the packet over a stream, in its pages in shared memory
    (then also set as ``pkt.data``, where the NVSP state machine reads a GPA-direct RNDIS message)."""
    if channel.shared and pkt.ranges:
        try:
            view = channel.dma(pkt)
        except PacketError as exc:
            raise DeviceProtocolError(f"SEND_RNDIS_PKT buffer: {exc}") from None
        # Copied: the frames go on to the switch's queues, and the guest reuses these pages once we complete.
        pkt.data = bytes(view) if view is not None else b""
    return pkt.data


class MappedView:
    """A receive or send buffer in shared memory: the guest's own pages, mapped (one view when its GPADL is
    consecutive pages, else page by page through the GPADL). Frames are written where the transfer-page packet
    says they are and read where SEND_RNDIS_PKT says; nothing travels with a packet."""

    def __init__(self, buffer: GpadlBuffer, memory: MappedMemory) -> None:
        self.buffer = buffer
        self.current: Buffer = b""  # (a stream's section data; unused here)
        ranges = buffer.ranges(0, buffer.size)
        view = memory.pages.slice(ranges[0]) if len(ranges) == 1 else None
        self._map = view

    @property
    def mapping(self) -> memoryview | None:
        return self._map

    def read(self, offset: int, length: int) -> bytes:
        m = self._map
        if m is None:
            return self.buffer.read(offset, length)
        if offset < 0 or length < 0 or offset + length > len(m):
            raise nvsp.NvspError(f"bytes {offset}..{offset + length} are outside a {len(m)}-byte buffer")
        return bytes(m[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        m = self._map
        if m is None:
            self.buffer.write(offset, data)
            return
        if offset < 0 or offset + len(data) > len(m):
            raise nvsp.NvspError(f"bytes {offset}..{offset + len(data)} are outside a {len(m)}-byte buffer")
        m[offset:offset + len(data)] = data

    def write_many(self, offsets: list[int], pieces: list[bytes]) -> None:
        for offset, piece in zip(offsets, pieces, strict=True):
            self.write(offset, piece)

    def take(self, ranges: tuple[tuple[int, int], ...]) -> bytes:
        return b""  # written in place already


_SWITCH_COUNTERS = (("frames", "frames accepted at ingress"), ("unicast", "frames forwarded to one learned port"),
                    ("flooded", "frames sent to every other port"), ("learned", "MAC addresses learned"),
                    ("segmented", "large TCP segments cut into MTU-sized frames"),
                    ("moved", "MACs seen on another port than they were learned on"),
                    ("aged_out", "MAC table entries aged out"))
def _port(port: str, name: str, value: int, help_: str, label: tuple[str, str] | None = None) -> Sample:
    kind: Literal["counter", "gauge"] = "counter" if name.endswith("_total") else "gauge"
    return Sample(name, value, help_, kind, partition=port, labels=(label,) if label else (), aggregate=False)


_PORT_HELP = "frames or bytes through a switch port (in: from the partition into the switch, out: to it)"


class NetworkVsp(Vsp):
    spec = nvsp.SPEC
    Settings = NetworkSettings

    def __init__(self, settings: NetworkSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or NetworkSettings()
        self.switch = Switch(mtu=self.settings.mtu, queue_frames=self.settings.port_queue_frames)
        self.hosts: dict[str, nethost.NvspHost] = {}  # by partition: the NIC's protocol state (counters)
        self.nics: dict[tuple[str, int], _Nic] = {}  # by (partition, primary relid): where sub-channels join
        self.uplink: TapUplink | None = None
        self.stats_log: SwitchStatsLog | None = None

    @classmethod
    def create(cls, settings: NetworkSettings, host: HostContext) -> NetworkVsp:
        vsp = cls(settings)
        if settings.external_tap:
            vsp.attach_external(settings.external_tap)
        if settings.stats_interval:
            vsp.stats_log = SwitchStatsLog(vsp.switch, settings.stats_interval)
        return vsp

    def attach_external(self, name: str) -> None:
        """``[network] external_tap``: create TAP ``name`` on this host (virtio-net headers, offloads on) and
        join it to the switch, as Hyper-V's external virtual switch joins the host's NIC. ConfigError when the
        device cannot be created (no CAP_NET_ADMIN, no /dev/net/tun, a name in use by another kind of link)."""
        try:
            tap = Tap.open(name)
        except (TapError, OSError) as exc:
            raise ConfigError(f"[network] external_tap = {name!r}: cannot create the TAP device: {exc}") from None
        try:
            self.uplink = TapUplink(self.switch, tap)
        except BaseException:
            tap.close()
            raise
        logs.get(component="netvsp").info("external TAP on the virtual switch", tap=name,
                                          mac=format_mac(self.uplink.port.mac))

    def samples(self) -> list[Sample]:
        """The virtual switch's counters (``Get-VMSwitch`` statistics): switch-wide, and per port (a port is
        named after its partition, or ``tap:NAME`` for the external TAP)."""
        sw = self.switch.counters
        out = [*super().samples(),
               *(Sample(f"switch_{name}_total", getattr(sw, name), help_) for name, help_ in _SWITCH_COUNTERS),
               *(Sample("switch_dropped_frames_total", n, "frames the switch dropped", labels=(("reason", r),))
                 for r, n in sw.drops.items()),
               Sample("switch_mac_table_entries", len(self.switch.table()), "MACs learned", "gauge")]
        for name, port in self.switch.ports.items():  # a port's counters go with it: no sum over ports
            c = port.counters
            for direction, frames, nbytes in (("in", c.rx_frames, c.rx_bytes), ("out", c.tx_frames, c.tx_bytes)):
                out += [_port(name, "port_frames_total", frames, _PORT_HELP, ("direction", direction)),
                        _port(name, "port_bytes_total", nbytes, _PORT_HELP, ("direction", direction))]
            out.append(_port(name, "port_queued_frames", port.pending(), "frames waiting for the port's owner"))
            out += [_port(name, "port_dropped_frames_total", n, "frames a port dropped", ("reason", r))
                    for r, n in c.drops.items()]
        return out

    async def shutdown(self) -> None:
        """Close the external TAP (the kernel deletes it with its last fd); log the switch counters a last time."""
        uplink, self.uplink = self.uplink, None
        if uplink is not None:
            uplink.close()
            uplink.tap.close()
        stats_log, self.stats_log = self.stats_log, None
        if stats_log is not None:
            await stats_log.stop()

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        if res.sub_channel_index:
            await self._serve_queue(channel, res)
            return
        st = self.settings
        mac = mac_for(res.partition, st.mac_style)
        host = nethost.NvspHost(mac, max_subchannels=st.subchannels, link_speed=st.link_speed_mbps * 1_000_000)
        nic = _Nic(channel, res, host, st.mtu)
        self.nics[(res.partition, res.relid)] = nic
        port: Port | None = None
        try:
            # Large segments both ways: the NvspHost enforces the MTU on transmits without LSO, and the pump cuts
            # what a guest without RSC cannot take.
            port = self.switch.attach(res.partition, mac, max_frame=MAX_LARGE_FRAME,
                                      spoof_check=not st.mac_spoofing)
            nic.port = port
            self.hosts[res.partition] = host
            res.log.info("NIC on the virtual switch", mac=format_mac(mac))
            pump = asyncio.get_running_loop().create_task(nic.pump())
            try:
                await nic.run()
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, PortDetached):
                    await pump
        except (nvsp.NvspError, rndis.RndisError) as exc:
            raise DeviceProtocolError(str(exc)) from None
        finally:
            if self.nics.get((res.partition, res.relid)) is nic:
                del self.nics[(res.partition, res.relid)]
            for sub in nic.close_queues():  # a guest closes sub-channels first; if not, they end with the primary
                task = self.tasks.get(sub)
                if task is not None:
                    task.cancel()
            nic.release()
            if port is not None:
                port.detach()
            if self.hosts.get(res.partition) is host:
                del self.hosts[res.partition]
            res.log.info("NIC off the switch", **_counters(host), rx_by_queue=nic.rx_by_queue,
                         **(port_fields(port.counters) if port else {}))

    async def _serve_queue(self, channel: Channel, res: ChannelResources) -> None:
        """A sub-channel: queue ``sub_channel_index`` of its primary's NIC (no handshake of its own)."""
        nic = self.nics.get((res.partition, res.primary_relid))
        queue = res.sub_channel_index
        if nic is None or not nic.host.subchannels_granted:
            raise DeviceProtocolError(f"sub-channel {res.relid} opened while its primary {res.primary_relid} "
                                      "has no sub-channels granted")
        try:
            nic.open_queue(queue, channel)
            try:
                await nic.serve_queue(queue)
            finally:
                nic.close_queue(queue, channel)
        except (nvsp.NvspError, rndis.RndisError) as exc:
            raise DeviceProtocolError(str(exc)) from None


class _Nic:
    """One partition's NIC on one channel: NVSP packets in, frames to the switch, frames from it out."""

    def __init__(self, channel: Channel, res: ChannelResources, host: nethost.NvspHost, mtu: int) -> None:
        self.channel, self.res, self.host, self.mtu = channel, res, host, mtu
        self.port: Port | None = None
        self.rx_view: StreamReceiveView | MappedView = StreamReceiveView()
        self.send_view: StreamSendView | MappedView = StreamSendView()
        self.holds: dict[str, GpadlHold] = {}
        self._out: list[Packet] = []
        self._ready = False
        self.queues: dict[int, Channel] = {}  # open sub-channels by index
        self.rx_by_queue: dict[int, int] = {}  # frames delivered per queue (0: the primary)

    def _mapped(self, hold: GpadlHold) -> MappedView:
        memory = self.res.memory
        assert isinstance(memory, MappedMemory)
        return MappedView(self.res.gpadls.buffer(hold), memory)

    async def run(self) -> None:
        channel, host = self.channel, self.host
        trace = HandshakeTrace(nvsp.describe) if self.res.trace else None
        while True:
            first = await channel.recv()
            handshake = trace if host.version is None else None  # --trace shows the NVSP INIT exchange
            if handshake is not None:
                self.res.log.info(handshake.line("G>H", first.type, first.trans_id, first.completion_requested,
                                                 first.payload))
            pkt: Packet | None = first
            budget = RX_POLL  # what the channel already holds, up to RX_POLL, then one flush (NAPI-like)
            while pkt is not None:
                self.send_view.current = _data(channel, pkt)
                for event in host.receive(pkt):
                    self._event(event)
                budget -= 1
                # (a packet is taken off the channel only when it will be served in this batch)
                pkt = channel.recv_nowait() if budget and handshake is None and host.version is not None else None
            await self.flush(handshake)

    def _event(self, event: nethost.Event) -> None:
        host, res = self.host, self.res
        match event:
            case nethost.ReceiveBufferRequested(gpadl_handle=gid):
                hold = self._hold("receive", gid)
                if hold is None:
                    host.refuse_receive_buffer()
                else:
                    if self.channel.shared:
                        self.rx_view = self._mapped(hold)
                    host.attach_receive_buffer(self.rx_view, self._size(hold))
            case nethost.SendBufferRequested(gpadl_handle=gid):
                hold = self._hold("send", gid)
                if hold is None:
                    host.refuse_send_buffer()
                else:
                    if self.channel.shared:
                        self.send_view = self._mapped(hold)
                    host.attach_send_buffer(self.send_view, self._size(hold))
            case nethost.FramesSent(frames=frames):
                port = self.port
                if port is not None:
                    no_info = rndis.NO_INFO
                    for frame, info in frames:  # TX checksum and LSOv2 PPIs travel as virtio-net metadata
                        if info is no_info:
                            port.send_nowait(frame, None)
                            continue
                        # A large send from NDIS's length and pseudo-header convention to the kernel's GSO one.
                        data = frame if info.lso is None else offload.from_lso_frame(frame, info.lso)
                        port.send_nowait(data, offload.from_tx_info(data, info))
            case nethost.DataPathReady():
                res.log.info("RNDIS initialized", nvsp=nvsp.version_text(host.version or 0), mtu=host.mtu)
            case nethost.PacketFilterChanged(filter=value):
                res.log.info("packet filter", filter=f"{value:#x}")
            case nethost.BufferRevoked(receive=receive):
                hold = self.holds.pop("receive" if receive else "send", None)
                if hold is not None:
                    hold.release()
            case nethost.Halted():
                res.log.info("RNDIS halted")
            case nethost.SubchannelsRequested(count=count):
                offer_subchannels(res, count)
            case nethost.RssChanged(config=config):
                res.log.info("RSS", **_rss_summary(config))
            case nethost.DataPathSwitched():
                pass  # there is no VF to switch to

    def _hold(self, which: str, gpadl_id: int) -> GpadlHold | None:
        try:
            hold = self.res.gpadls.hold(gpadl_id, on_teardown=lambda: self._torn_down(which))
        except DeviceProtocolError as exc:
            self.res.log.warning(f"{which} buffer refused", gpadl=gpadl_id, error=str(exc))
            return None
        self.holds[which] = hold
        return hold

    def _torn_down(self, which: str) -> None:
        """The guest tore a buffer down while it is in use (it should revoke first): let go of it."""
        hold = self.holds.pop(which, None)
        if hold is not None:
            self.res.log.warning(f"{which} buffer torn down before it was revoked")
            hold.release()

    @staticmethod
    def _size(hold: GpadlHold) -> int:
        return sum(count for count, _ in hold.gpadl.ranges)

    async def pump(self) -> None:
        """Frames the switch forwards to this NIC, into receive-buffer sub-allocations."""
        port, host = self.port, self.host
        assert port is not None
        while True:
            frames: list[Frame] = await port.recv_batch(RX_BATCH)
            if self.queues:  # sub-channels open: RSS spreads the frames over them
                await self._spread(self._for_guest(frames))
                continue
            host.deliver(self._for_guest(frames))
            await self.flush()

    def _for_guest(self, frames: list[Frame]) -> list[tuple[bytes, rndis.PacketInfo]]:
        """Offload metadata as receive PPIs: a TCP GSO frame whole (RSC, NVSP 6.1) to a guest that coalesces
        with checksum offload on, cut into MTU-sized frames otherwise; checksums as RX checksum-OK bits."""
        host = self.host
        rx_csum = offload.rx_checksum_offloaded(host.offload)
        out: list[tuple[bytes, rndis.PacketInfo]] = []
        for data, hdr in frames:
            if hdr is None:
                out.append((data, rndis.NO_INFO))
            elif not hdr.gso:
                out.append(offload.to_rx(data, hdr, rx_csum))
            elif host.rsc and rx_csum and hdr.gso_type & ~vnet.GSO_ECN in (vnet.GSO_TCPV4, vnet.GSO_TCPV6):
                out.append((data, offload.to_rx(data, vnet.VnetHdr(vnet.F_DATA_VALID), True)[1]))
            else:
                try:
                    out += [(seg, rndis.NO_INFO) for seg in vnet.segment_tcp(data, hdr, self.mtu)]
                except ValueError:
                    host.counters.rx_dropped_bad_frame += 1  # a GSO frame that is not TCP: nothing cuts it
        return out

    async def flush(self, trace: HandshakeTrace | None = None) -> None:
        channel = self.channel
        for pkt in self.host.data_to_send():
            if trace is not None:
                self.res.log.info(trace.line("H>G", pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload))
            if pkt.xfer_ranges:
                pkt.data = self.rx_view.take(pkt.xfer_ranges)
            if not channel.try_send(pkt):
                await channel.send(pkt)

    # ---- sub-channels ---------------------------------------------------------------------------------

    def open_queue(self, queue: int, channel: Channel) -> None:
        self.host.queue_opened(queue)
        self.queues[queue] = channel
        self.res.log.info("NIC sub-channel open", queue=queue, relid=channel.relid)
        if len(self.queues) == self.host.subchannels_granted:
            # Every granted sub-channel is open: SEND_INDIRECTION_TABLE on the primary (OpenVMM tx_spread_sent).
            self.host.subchannels_opened(len(self.queues))
            self.res.log.info("NIC sub-channels open", queues=len(self.queues) + 1)
            self._kick()

    def close_queue(self, queue: int, channel: Channel) -> None:
        if self.queues.get(queue) is channel:
            del self.queues[queue]
            self.host.queue_closed(queue)
            self._kick()  # control answers freed sub-allocations may let out

    def close_queues(self) -> list[Channel]:
        """The primary goes: every queue with it (their sub-allocations too); returns their channels."""
        channels = list(self.queues.values())
        for queue in list(self.queues):
            self.close_queue(queue, self.queues[queue])
        return channels

    def _kick(self) -> None:
        """Send what the primary has waiting, from outside its own loop."""
        task = asyncio.get_running_loop().create_task(self.flush())
        task.add_done_callback(_quiet)

    async def serve_queue(self, queue: int) -> None:
        """Packets on sub-channel ``queue``: transmits and receive completions, answered on it."""
        channel, host = self.queues[queue], self.host
        while True:
            pkt = await channel.recv()
            self.send_view.current = _data(channel, pkt)
            for event in host.receive_on_queue(pkt, queue):
                self._event(event)
            await self._send_queue(queue)
            await self.flush()  # RNDIS control answers a completion let out go on the primary

    async def _send_queue(self, queue: int) -> None:
        channel = self.queues.get(queue)
        for pkt in self.host.queue_data(queue):
            if pkt.xfer_ranges:
                pkt.data = self.rx_view.take(pkt.xfer_ranges)
            if channel is not None and not channel.try_send(pkt):
                with contextlib.suppress(ChannelClosed):  # it closed meanwhile: queue_closed freed its buffers
                    await channel.send(pkt)

    async def _spread(self, frames: list[tuple[bytes, rndis.PacketInfo]]) -> None:
        """Receive-side scaling: each frame on the queue the guest's indirection table picks for it."""
        host = self.host
        by_queue: dict[int, list[tuple[bytes, rndis.PacketInfo]]] = {}
        for item in frames:
            by_queue.setdefault(host.queue_for(item[0]), []).append(item)
        for queue, batch in by_queue.items():
            self.rx_by_queue[queue] = self.rx_by_queue.get(queue, 0) + host.deliver(batch, queue).delivered
        for queue in by_queue:
            if queue:
                await self._send_queue(queue)
        await self.flush()

    def release(self) -> None:
        for hold in self.holds.values():
            hold.release()
        self.holds.clear()


def _quiet(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # a channel that closed meanwhile: nothing to send it to


def _rss_summary(config: rss.RssConfig | None) -> dict[str, Any]:
    """The RSS table briefly: which queues it spreads over, its size, the hash types."""
    if config is None:
        return {"enabled": False}
    queues = sorted(set(config.table))
    return {"enabled": True, "queues": queues, "table_entries": len(config.table),
            "hash_types": rss.hash_types_text(config.hash_info)}


def _counters(host: nethost.NvspHost) -> dict[str, Any]:
    c = host.counters
    return {"tx_frames": c.tx_frames, "rx_frames": c.rx_frames, "rx_dropped_no_room": c.rx_dropped_no_room,
            "rx_dropped_filter": c.rx_dropped_filter}
