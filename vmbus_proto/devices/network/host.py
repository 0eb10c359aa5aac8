"""NetVSP's side of one NetVSC primary channel, sans-IO: NVSP INIT to the running data path, RNDIS control,
transmit parsing, the receive path through receive-buffer sub-allocations, link indications, sub-channels.

Mirrors OpenVMM vm/devices/net/netvsp/src/lib.rs: ``initialize`` (what may come in which order:
NDIS_CONFIG from v2, NDIS_VERSION, SEND_RECEIVE_BUFFER, SEND_SEND_BUFFER, then RNDIS; duplicates and
anything out of order end the channel; empty completions for NDIS_CONFIG/NDIS_VERSION when requested),
``main_loop`` (SUBCHANNEL, REVOKE_*, SWITCH_DATA_PATH, OID_QUERY_EX), ``handle_rndis_message``
(INITIALIZE only once, HALT ignored, KEEPALIVE), ``handle_rndis_packet_messages`` (TX frames, completed
with SEND_RNDIS_PKT_COMPLETE), ``process_endpoint_rx`` / ``send_rndis_control_message`` (RX through
transfer-page packets, control answers in the 16 reserved sub-allocations) and Linux
drivers/net/hyperv/netvsc.c / rndis_filter.c for what the guest expects back.

Inputs are method calls; packets to send are pulled with ``data_to_send()``; events come back from
``receive()``. The host never touches GPADLs: the device looks them up and hands over a ``BufferView``.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ...packets import FLAG_COMPLETION_REQUESTED, Packet, PacketType
from ..base import Incoming
from . import nvsp, rndis, rss
from .buffers import RX_BATCH_SIZE, BufferView, ReceiveBufferAllocator, sub_allocation_size
from .nvsp import NvspError, Status, Version

MIN_MTU, MAX_MTU, DEFAULT_MTU = 1514, 9216, 1514  # OpenVMM: an NDIS_CONFIG mtu outside [MIN, MAX] -> DEFAULT
MAX_QUEUED_CONTROL = 64  # control answers waiting for a free reserved sub-allocation (OpenVMM: 100 KiB)
MAX_RSC_FRAME = 65535 + rndis.ETH_HEADER_LEN  # the largest coalesced (RX) or large-send (TX) frame
RX_FOOTER = 36  # bytes OpenVMM keeps free at the end of each receive sub-allocation
_PACKET_HEAD = rndis.HEADER_SIZE + rndis.PACKET_BODY_SIZE
_RNDIS_PACKET_TYPES = frozenset({PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT})
# The PPI chains of an RSC frame's later fragments: RNDIS_PKTINFO_ID alone, without and with LAST_FRAG.
_SEND_RNDIS_PKT = struct.pack("<I", nvsp.MessageType.SEND_RNDIS_PKT)
_RSC_CHAINS = tuple(rndis.pack_ppis(rndis.PacketInfo(rsc=rndis.RscId(flags)).ppis())
                    for flags in (0, rndis.RSC_LAST_FRAG))


# ---- events (what ``receive`` reports to the device) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceiveBufferRequested:
    """SEND_RECV_BUF: look GPADL ``gpadl_handle`` up, then ``attach_receive_buffer`` or ``refuse_receive_buffer``."""

    gpadl_handle: int
    id: int


@dataclass(frozen=True, slots=True)
class SendBufferRequested:
    """SEND_SEND_BUF: look the GPADL up, then ``attach_send_buffer`` or ``refuse_send_buffer``."""

    gpadl_handle: int
    id: int


@dataclass(frozen=True, slots=True)
class FramesSent:
    """The guest transmitted these frames (with their per-packet info)."""

    frames: list[tuple[bytes, rndis.PacketInfo]]


@dataclass(frozen=True, slots=True)
class DataPathReady:
    """RNDIS INITIALIZE answered: the NIC is up (frames flow once the packet filter is set)."""


@dataclass(frozen=True, slots=True)
class PacketFilterChanged:
    filter: int


@dataclass(frozen=True, slots=True)
class SubchannelsRequested:
    """Offer ``count`` sub-channels, then call ``subchannels_opened`` when the guest has opened them."""

    count: int


@dataclass(frozen=True, slots=True)
class RssChanged:
    """OID_GEN_RECEIVE_SCALE_PARAMETERS set: receives spread by ``config`` from now on (None: RSS off)."""

    config: rss.RssConfig | None


@dataclass(frozen=True, slots=True)
class BufferRevoked:
    """REVOKE_RECV_BUF or REVOKE_SEND_BUF: the device may drop its hold on that GPADL."""

    receive: bool
    id: int


@dataclass(frozen=True, slots=True)
class Halted:
    """RNDIS HALT: the guest is going away; nothing more is delivered."""


@dataclass(frozen=True, slots=True)
class DataPathSwitched:
    """SWITCH_DATA_PATH from the guest (no VF here: the synthetic path stays in use)."""

    to_vf: bool


Event = (ReceiveBufferRequested | SendBufferRequested | FramesSent | DataPathReady | PacketFilterChanged
         | SubchannelsRequested | RssChanged | BufferRevoked | Halted | DataPathSwitched)


@dataclass(slots=True)
class RxResult:
    """What ``deliver`` did with a batch of frames: delivered in ``packets`` transfer-page packets, or dropped."""

    delivered: int = 0
    dropped: int = 0
    reason: str = ""


@dataclass(slots=True)
class HostCounters:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0  # SEND_RNDIS_PKT whose RNDIS was malformed (completed with FAIL)
    tx_dropped_bad_frame: int = 0  # a runt, or over the MTU without LSO (the packet is still completed)
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped_no_room: int = 0  # every sub-allocation waits for a guest completion
    rx_dropped_filter: int = 0  # packet filter 0, not initialized, halted or revoked
    rx_dropped_bad_frame: int = 0  # runt or larger than the MTU allows
    control_answers: int = 0


@dataclass(slots=True)
class _RxBuffer:
    view: BufferView
    id: int
    allocator: ReceiveBufferAllocator


@dataclass(slots=True)
class _Queue:
    """One open sub-channel: packets for it, and its transfer-page transactions the guest has not completed
    (freed when the sub-channel goes, so a closed queue keeps no sub-allocation)."""

    outbox: list[Packet] = field(default_factory=list)
    held: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Init:
    """OpenVMM ``InitState``: what has arrived since INIT_COMPLETE."""

    ndis_config: nvsp.SendNdisConfig | None = None
    ndis_version: nvsp.SendNdisVersion | None = None
    pending: ReceiveBufferRequested | SendBufferRequested | None = None
    pending_trans_id: int = 0


class NvspHost:
    """One NetVSP primary channel. Construct it with the vNIC's MAC; feed it every packet the guest sends
    (``receive``), frames for the guest (``deliver``) and link changes (``set_link``); send what
    ``data_to_send()`` returns.

    ``version`` skips INIT when the device already ran ``nvsp.VspHandshake``.
    """

    def __init__(self, mac: bytes, *, max_subchannels: int = 0, link_speed: int = 10_000_000_000,
                 connected: bool = True, supported: Iterable[int] = nvsp.DEFAULT_SUPPORTED,
                 version: int | None = None) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        self.mac = bytes(mac)
        self.max_subchannels = max_subchannels
        self.link_speed = link_speed
        self.connected = connected
        self.handshake = nvsp.VspHandshake(supported)
        self.version: int | None = version
        self.mtu = DEFAULT_MTU  # the frame size (NDIS_CONFIG's mtu)
        self.capabilities = 0
        self.ndis_version: tuple[int, int] = (6, 30)
        self.packet_filter = 0
        self.rndis_initialized = False
        self.halted = False
        self.revoked: set[str] = set()
        self.rss: rss.RssConfig | None = None  # OID_GEN_RECEIVE_SCALE_PARAMETERS (None: RSS off)
        self.requested_mac: str | None = None  # OID_GEN_RNDIS_CONFIG_PARAMETER "NetworkAddress"
        self.offload: tuple[int, ...] = ()
        self.subchannels = 0  # opened (SEND_INDIRECTION_TABLE sent)
        self.subchannels_granted = 0  # the last SUBCHANNEL completion's count
        self.counters = HostCounters()
        self._init: _Init | None = _Init() if version is not None else None
        self._rx: _RxBuffer | None = None
        self._send_view: BufferView | None = None
        self._send_count = 0
        self._outbox: list[Packet] = []  # the primary channel's
        self._queues: dict[int, _Queue] = {}  # sub-channel queues (1..subchannels): packets and receives held
        self._control_queue: deque[bytes] = deque()

    # ---- state ---------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """RNDIS is initialized and frames may be delivered (filter set, not halted or revoked)."""
        return (self.rndis_initialized and self.packet_filter != 0 and not self.halted and not self.revoked
                and self._rx is not None)

    @property
    def rsc(self) -> bool:
        return self.version is not None and self.version >= Version.V61 and bool(self.capabilities & nvsp.CAP_RSC)

    @property
    def receive_allocator(self) -> ReceiveBufferAllocator | None:
        return self._rx.allocator if self._rx else None

    def data_to_send(self) -> list[Packet]:
        out, self._outbox = self._outbox, []
        return out

    # ---- guest packets -------------------------------------------------------------------------------

    def receive(self, packet: Packet) -> list[Event]:
        """One packet from the guest. Raises ``NvspError``/``RndisError`` for what ends the channel."""
        if self._init is None and self.version is not None and not self.revoked:  # the running data path
            ptype = packet.type
            if ptype == PacketType.COMP:
                return self._completion(packet)
            if ptype in _RNDIS_PACKET_TYPES:
                fields = nvsp.unpack_rndis_packet(packet.payload)
                if fields is not None:
                    return self._rndis(packet, fields[1], fields[2])
        if self.version is None:
            return self._handshake(packet)
        if self._init is not None and self._init.pending is not None:
            raise NvspError("NVSP packet while the device has not answered the buffer GPADL lookup")
        if packet.type == PacketType.COMP:
            return self._completion(packet)
        if packet.type not in (PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT):
            raise NvspError(f"NetVSP got packet type {packet.type:#x}")
        message = nvsp.decode(packet.payload)
        if self.revoked and not isinstance(message, (nvsp.RevokeReceiveBuffer, nvsp.RevokeSendBuffer)):
            raise NvspError(f"NVSP {type(message).__name__} after the guest revoked its "
                            f"{' and '.join(sorted(self.revoked))} buffer")
        if self._init is not None:
            return self._initializing(packet, message)
        return self._running(packet, message)

    def _handshake(self, packet: Packet) -> list[Event]:
        incoming = Incoming(packet.type, packet.trans_id, packet.completion_requested, packet.payload)
        for out in self.handshake.receive(incoming):
            self._outbox.append(out.to_packet())
        if self.handshake.done:
            self.version = self.handshake.negotiated_version
            self._init = _Init()
        return []

    def _complete(self, packet: Packet, message: nvsp.NvspMessage | None = None) -> None:
        """A VM_PKT_COMP for ``packet`` if the guest asked for one (empty when ``message`` is None)."""
        if packet.completion_requested:
            payload = nvsp.encode(message, self._size) if message is not None else b""
            self._outbox.append(Packet(PacketType.COMP, 0, packet.trans_id, payload))

    @property
    def _size(self) -> int:
        return nvsp.host_message_size(self.version or Version.V1)

    def _initializing(self, packet: Packet, message: nvsp.NvspMessage) -> list[Event]:
        init = self._init
        assert init is not None and self.version is not None
        name = type(message).__name__
        if isinstance(message, nvsp.SendNdisConfig) and self.version >= Version.V2:
            if init.ndis_config is not None:
                raise NvspError("NVSP SEND_NDIS_CONFIG sent twice")
            init.ndis_config = message
            self.mtu = message.mtu if MIN_MTU <= message.mtu <= MAX_MTU else DEFAULT_MTU
            self.capabilities = message.capabilities
            self._complete(packet)
            return []
        if isinstance(message, nvsp.SendNdisVersion):
            if init.ndis_version is not None:
                raise NvspError("NVSP SEND_NDIS_VER sent twice")
            init.ndis_version = message
            self.ndis_version = (message.ndis_major_ver, message.ndis_minor_ver)
            self._complete(packet)
            return []
        if isinstance(message, nvsp.SendReceiveBuffer):
            if self._rx is not None:
                raise NvspError("NVSP SEND_RECV_BUF sent twice")
            if init.ndis_config is None and self.version >= Version.V2:
                raise NvspError("NVSP SEND_RECV_BUF before SEND_NDIS_CONFIG (the MTU is not known)")
            init.pending = ReceiveBufferRequested(message.gpadl_handle, message.id)
            init.pending_trans_id = packet.trans_id
            return [init.pending]
        if isinstance(message, nvsp.SendSendBuffer):
            if self._send_view is not None:
                raise NvspError("NVSP SEND_SEND_BUF sent twice")
            init.pending = SendBufferRequested(message.gpadl_handle, message.id)
            init.pending_trans_id = packet.trans_id
            return [init.pending]
        if isinstance(message, nvsp.SendRndisPacket):
            if not ((init.ndis_config is not None or self.version < Version.V2)
                    and init.ndis_version is not None and self._rx is not None):
                raise NvspError("RNDIS packet before NDIS_CONFIG, NDIS_VER and SEND_RECV_BUF (OpenVMM "
                                "UnexpectedRndisPacket)")
            self._init = None
            return self._rndis(packet, message.send_buf_section_index, message.send_buf_section_size)
        raise NvspError(f"NVSP {name} while the channel is initializing")

    def attach_receive_buffer(self, view: BufferView, size: int) -> None:
        """The receive-buffer GPADL was found (``size`` bytes, contiguous): answer SEND_RECV_BUF with one
        section of ``256 + mtu + 36``-byte sub-allocations, as OpenVMM."""
        init = self._pending(ReceiveBufferRequested)
        request = init.pending
        assert isinstance(request, ReceiveBufferRequested)
        sub = sub_allocation_size(self.mtu)
        try:
            allocator = ReceiveBufferAllocator(size, sub)
        except NvspError:
            self.refuse_receive_buffer()
            return
        self._rx = _RxBuffer(view, request.id, allocator)
        section = nvsp.ReceiveBufferSection(0, sub, allocator.count, sub * allocator.count)
        self._answer_buffer(init, nvsp.SendReceiveBufferComplete(Status.SUCCESS, (section,)))

    def refuse_receive_buffer(self) -> None:
        """No usable GPADL: SEND_RECV_BUF_COMPLETE with FAIL (Linux then fails the probe cleanly)."""
        init = self._pending(ReceiveBufferRequested)
        self._answer_buffer(init, nvsp.SendReceiveBufferComplete(Status.FAIL, ()))

    def attach_send_buffer(self, view: BufferView, size: int) -> None:
        """The send-buffer GPADL was found: sections of 6144 bytes (index i at byte i * 6144)."""
        init = self._pending(SendBufferRequested)
        if size < nvsp.SEND_SECTION_SIZE:
            self.refuse_send_buffer()
            return
        self._send_view, self._send_count = view, size // nvsp.SEND_SECTION_SIZE
        self._answer_buffer(init, nvsp.SendSendBufferComplete(Status.SUCCESS, nvsp.SEND_SECTION_SIZE))

    def refuse_send_buffer(self) -> None:
        init = self._pending(SendBufferRequested)
        self._answer_buffer(init, nvsp.SendSendBufferComplete(Status.FAIL, 0))

    def _pending(self, kind: type[ReceiveBufferRequested] | type[SendBufferRequested]) -> _Init:
        init = self._init
        if init is None or not isinstance(init.pending, kind):
            raise NvspError(f"no {kind.__name__} is waiting for an answer")
        return init

    def _answer_buffer(self, init: _Init, message: nvsp.NvspMessage) -> None:
        self._outbox.append(Packet(PacketType.COMP, 0, init.pending_trans_id, nvsp.encode(message, self._size)))
        init.pending = None

    def _running(self, packet: Packet, message: nvsp.NvspMessage) -> list[Event]:
        assert self.version is not None
        if isinstance(message, nvsp.SendRndisPacket):
            return self._rndis(packet, message.send_buf_section_index, message.send_buf_section_size)
        if isinstance(message, (nvsp.RevokeReceiveBuffer, nvsp.RevokeSendBuffer)):
            receive = isinstance(message, nvsp.RevokeReceiveBuffer)
            self.revoked.add("receive" if receive else "send")
            if receive:
                self._rx = None
            else:
                self._send_view = None
            self._complete(packet)
            return [BufferRevoked(receive, message.id)]
        if isinstance(message, nvsp.SubchannelRequest) and self.version >= Version.V5:
            # OpenVMM: ALLOCATE of fewer than max_queues, with receive sub-allocations for every queue.
            granted = message.num_subchannels
            ok = message.op == nvsp.SUBCHANNEL_ALLOCATE and 0 < granted <= self.max_subchannels \
                and self._rx is not None and (self._rx.allocator.count - 16) // (granted + 1) > 0
            self._complete(packet, nvsp.SubchannelComplete(Status.SUCCESS if ok else Status.FAIL,
                                                           granted if ok else 0))
            if not ok:
                return []
            self.subchannels_granted = granted
            return [SubchannelsRequested(granted)]
        if isinstance(message, nvsp.OidQueryEx) and self.version >= Version.V5:
            self._complete(packet, nvsp.OidQueryExComplete(nvsp.RNDIS_STATUS_NOT_SUPPORTED, 0))
            return []
        if isinstance(message, nvsp.SwitchDataPath) and self.version >= Version.V4:
            self._complete(packet)  # Linux waits for an empty completion
            return [DataPathSwitched(message.active_datapath == nvsp.DATAPATH_VF)]
        raise NvspError(f"NVSP {type(message).__name__} is not valid on a running channel at version "
                        f"{nvsp.version_text(self.version)}")

    def _completion(self, packet: Packet) -> list[Event]:
        if not packet.payload:
            return []  # SEND_VF_ASSOCIATION / SWITCH_DATA_PATH completions (not all guests send them)
        if nvsp.unpack_rndis_packet_complete(packet.payload) is None:
            message = nvsp.decode(packet.payload, completion=True)
            raise NvspError(f"NVSP completion {type(message).__name__} from the guest")
        if self._rx is None:
            return []  # the buffer was revoked: late completions are harmless
        self._rx.allocator.complete(packet.trans_id)
        self._flush_control()
        return []

    # ---- RNDIS over SEND_RNDIS_PKT ---------------------------------------------------------------------

    def _rndis_bytes(self, packet: Packet, index: int, size: int) -> bytes | memoryview:
        """The RNDIS message a SEND_RNDIS_PKT names (GPA-direct data is not copied: the frames are, once)."""
        if index == nvsp.NO_SECTION:
            if packet.type != PacketType.DATA_USING_GPA_DIRECT or not packet.data:
                raise NvspError("SEND_RNDIS_PKT with no send-buffer section and no GPA-direct data")
            return memoryview(packet.data)
        if self._send_view is None:
            raise NvspError(f"SEND_RNDIS_PKT names send-buffer section {index} but there is no send buffer")
        if index >= self._send_count or size > nvsp.SEND_SECTION_SIZE:
            raise NvspError(f"SEND_RNDIS_PKT section {index} of {size} bytes is outside "
                            f"the {self._send_count}-section send buffer")
        return self._send_view.read(index * nvsp.SEND_SECTION_SIZE, size)

    def _rndis(self, packet: Packet, index: int, size: int) -> list[Event]:
        data = self._rndis_bytes(packet, index, size)
        status: int = Status.SUCCESS
        try:
            kind = rndis.message_type(data)
            events = self._tx(data) if kind == rndis.MessageType.PACKET else self._control(rndis.decode(data))
        except rndis.RndisError:
            # OpenVMM answers a malformed RNDIS packet with a failed completion; it costs only this packet.
            self.counters.tx_errors += 1
            events, status = [], Status.FAIL
        if packet.flags & FLAG_COMPLETION_REQUESTED:
            self._outbox.append(Packet(PacketType.COMP, 0, packet.trans_id,
                                       nvsp.rndis_packet_complete(status, self._size)))
        return events

    def _tx(self, data: bytes | memoryview) -> list[Event]:
        if not self.rndis_initialized:
            raise rndis.RndisError("RNDIS PACKET_MSG before INITIALIZE")
        sent = rndis.packet_frames(data)
        mtu, c = self.mtu, self.counters
        frames = [(f, i) for f, i in sent if rndis.ETH_HEADER_LEN <= len(f) <= (MAX_RSC_FRAME if i.lso else mtu)]
        c.tx_dropped_bad_frame += len(sent) - len(frames)  # runts, or larger than the MTU without LSO
        c.tx_frames += len(frames)
        c.tx_bytes += sum(len(f) for f, _ in frames)
        return [FramesSent(frames)] if frames else []

    def _control(self, message: rndis.RndisMessage) -> list[Event]:
        if isinstance(message, rndis.Initialize):
            if self.rndis_initialized:
                raise NvspError("RNDIS INITIALIZE on an initialized adapter (OpenVMM InvalidRndisState)")
            self.rndis_initialized = True
            self._send_control(rndis.InitializeComplete(message.req_id))
            return [DataPathReady()]
        if not self.rndis_initialized:
            raise NvspError(f"RNDIS {type(message).__name__} before INITIALIZE")
        if isinstance(message, rndis.Halt):
            self.halted = True
            return [Halted()]
        if isinstance(message, rndis.Keepalive):
            self._send_control(rndis.KeepaliveComplete(message.req_id))
            return []
        if isinstance(message, rndis.Reset):
            self._send_control(rndis.ResetComplete())
            return []
        if isinstance(message, rndis.Query):
            try:
                info = rndis.query_oid(self._nic(), message.oid, self.packet_filter)
                self._send_control(rndis.QueryComplete(message.req_id, rndis.Status.SUCCESS, info))
            except rndis.OidError as exc:
                self._send_control(rndis.QueryComplete(message.req_id, exc.status))
            return []
        if isinstance(message, rndis.Set):
            events: list[Event] = []
            status: int = rndis.Status.SUCCESS
            try:
                events = self._set(message.oid, message.info)
            except rndis.OidError as exc:
                status = exc.status
            self._send_control(rndis.SetComplete(message.req_id, status))
            return events
        raise NvspError(f"RNDIS {type(message).__name__} is not a request a guest sends")

    def _nic(self) -> rndis.NicProperties:
        return rndis.NicProperties(self.mac, self.mtu, self.link_speed, self.max_subchannels + 1,
                                   self.ndis_version, self.connected)

    def _set(self, oid: int, info: bytes) -> list[Event]:
        if oid == rndis.Oid.GEN_CURRENT_PACKET_FILTER:
            if len(info) < 4:
                raise rndis.OidError(rndis.Status.INVALID_DATA, f"packet filter of {len(info)} bytes")
            (value,) = struct.unpack_from("<I", info)
            changed = value != self.packet_filter
            self.packet_filter = value
            return [PacketFilterChanged(value)] if changed else []
        if oid == rndis.Oid.TCP_OFFLOAD_PARAMETERS:
            self.offload = rndis.parse_offload_parameters(info)
        elif oid == rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS:
            params = rndis.parse_rss_parameters(info, self.max_subchannels + 1)
            self.rss = rss.RssConfig(*params) if params is not None else None
            return [RssChanged(self.rss)]
        elif oid == rndis.Oid.GEN_RNDIS_CONFIG_PARAMETER:
            name, value = rndis.parse_config_parameter(info)
            if name == "NetworkAddress":
                self.requested_mac = value
        elif oid not in (rndis.Oid.OFFLOAD_ENCAPSULATION, rndis.Oid.GEN_NETWORK_LAYER_ADDRESSES):
            raise rndis.OidError(rndis.Status.NOT_SUPPORTED, f"set of unknown {rndis.oid_text(oid)}")
        return []

    # ---- host to guest: control answers, indications, frames --------------------------------------------

    def _send_control(self, message: rndis.RndisMessage) -> None:
        if len(self._control_queue) >= MAX_QUEUED_CONTROL:
            raise NvspError(f"{MAX_QUEUED_CONTROL} RNDIS control answers wait for receive completions: the guest "
                            "sends requests without completing their answers")
        self._control_queue.append(rndis.encode(message))
        self.counters.control_answers += 1
        self._flush_control()

    def _flush_control(self) -> None:
        rx = self._rx
        while self._control_queue and rx is not None:
            ids = rx.allocator.allocate(1, control=True)
            if ids is None:
                return
            data = self._control_queue.popleft()
            offset = ids[0] * rx.allocator.sub_alloc_size
            rx.view.write(offset, data)
            self._xfer(rx, ids, ((len(data), offset),), nvsp.CHANNEL_CONTROL)

    def _xfer(self, rx: _RxBuffer, ids: list[int], ranges: tuple[tuple[int, int], ...], channel: int,
              queue: int = 0) -> None:
        trans_id = rx.allocator.hold(ids)
        payload = nvsp.pack_rndis_packet(channel, nvsp.NO_SECTION, 0, self._size)
        outbox = self._queues[queue].outbox if queue else self._outbox
        outbox.append(Packet(PacketType.DATA_USING_XFER_PAGES, FLAG_COMPLETION_REQUESTED, trans_id,
                             payload, xfer_pageset_id=rx.id, xfer_ranges=ranges))

    def set_link(self, connected: bool) -> None:
        """Media connect/disconnect: indicated to the guest once RNDIS is up (Linux schedules link work)."""
        if connected == self.connected:
            return
        self.connected = connected
        if self.rndis_initialized and not self.halted and not self.revoked:
            status = rndis.Status.MEDIA_CONNECT if connected else rndis.Status.MEDIA_DISCONNECT
            self._send_control(rndis.IndicateStatus(status))

    def set_link_speed(self, bits_per_second: int) -> None:
        """LINK_SPEED_CHANGE, its u32 in 100 bps units."""
        self.link_speed = bits_per_second
        if self.rndis_initialized and not self.halted and not self.revoked:
            speed = struct.pack("<I", min(bits_per_second // 100, 0xFFFFFFFF))
            self._send_control(rndis.IndicateStatus(rndis.Status.LINK_SPEED_CHANGE, speed))

    def subchannels_opened(self, count: int) -> None:
        """The guest opened ``count`` sub-channels: send SEND_INDIRECTION_TABLE, entry i = i % channels."""
        if self.version is None or self.version < Version.V5:
            raise NvspError("sub-channels need NVSP v5")
        self.subchannels = count
        table = tuple(i % (count + 1) for i in range(nvsp.INDIRECTION_TABLE_ENTRIES))
        self._outbox.append(Packet(PacketType.DATA_INBAND, 0, 0, nvsp.encode(nvsp.SendIndirectionTable(table))))

    # ---- sub-channels: queues 1..subchannels ------------------------------------------------------------

    def queue_opened(self, queue: int) -> None:
        """Sub-channel ``queue`` (its sub_channel_index) is open: frames may be delivered on it."""
        if not 0 < queue <= self.max_subchannels:
            raise NvspError(f"sub-channel {queue} is outside the {self.max_subchannels} this NIC offers")
        self._queues.setdefault(queue, _Queue())

    def queue_closed(self, queue: int) -> None:
        """Sub-channel ``queue`` closed: its unsent packets and uncompleted receives give their
        sub-allocations back (nothing of the queue is kept)."""
        q = self._queues.pop(queue, None)
        rx = self._rx
        if q is None or rx is None:
            return
        held = q.held | {p.trans_id for p in q.outbox if p.type == PacketType.DATA_USING_XFER_PAGES}
        for trans_id in held:
            with contextlib.suppress(NvspError):
                rx.allocator.complete(trans_id)
        self._flush_control()

    @property
    def open_queues(self) -> list[int]:
        """The queues frames may go to: 0 and every open sub-channel."""
        return [0, *sorted(self._queues)]

    def queue_data(self, queue: int) -> list[Packet]:
        """``data_to_send`` for sub-channel ``queue``: its transfer-page packets and completions."""
        q = self._queues.get(queue)
        if q is None:
            return []
        out, q.outbox = q.outbox, []
        q.held.update(p.trans_id for p in out if p.type == PacketType.DATA_USING_XFER_PAGES)
        return out

    def receive_on_queue(self, packet: Packet, queue: int) -> list[Event]:
        """A packet on sub-channel ``queue``: only SEND_RNDIS_PKT and receive completions belong there
        (OpenVMM ``NotSupportedOnSubChannel``). Completions of its packets go back on it; RNDIS control
        answers go on the primary."""
        q = self._queues.get(queue)
        if q is None:
            raise NvspError(f"packet on sub-channel {queue}, which is not open")
        if packet.type == PacketType.COMP:
            q.held.discard(packet.trans_id)
        elif packet.payload[:4] != _SEND_RNDIS_PKT:
            kind = struct.unpack_from("<I", packet.payload)[0] if len(packet.payload) >= 4 else None
            raise NvspError(f"NVSP message {kind} is not valid on sub-channel {queue} (only SEND_RNDIS_PKT)")
        primary, self._outbox = self._outbox, []
        try:
            events = self.receive(packet)
        finally:
            produced, self._outbox = self._outbox, primary
        for out in produced:
            (primary if out.type == PacketType.DATA_USING_XFER_PAGES else q.outbox).append(out)
        return events

    def queue_for(self, frame: bytes) -> int:
        """The queue RSS sends ``frame`` to: the guest's indirection table entry for its Toeplitz hash; 0
        without RSS, without a hash, or when that queue is not open."""
        config = self.rss
        if config is None or not self._queues:
            return 0
        queue = config.queue(frame)
        return queue if queue in self._queues else 0

    def deliver(self, frames: Sequence[tuple[bytes, rndis.PacketInfo]], queue: int = 0) -> RxResult:
        """Write frames for the guest into free sub-allocations and queue transfer-page packets (up to 375
        ranges each, one RNDIS PACKET_MSG per range) for ``queue`` (0: the primary, i: sub-channel i, whose
        packets ``data_to_send(i)`` returns). Frames find no room while the guest holds every
        sub-allocation: they are dropped and counted, nothing is buffered."""
        result = RxResult()
        rx = self._rx
        if not self.ready or rx is None:
            result.dropped, result.reason = len(frames), "not ready (packet filter 0, halted or revoked)"
            self.counters.rx_dropped_filter += len(frames)
            return result
        ids: list[int] = []
        ranges: list[tuple[int, int]] = []
        allocator, write, counters = rx.allocator, rx.view.write, self.counters
        write_many: Callable[[list[int], list[bytes]], None] | None = getattr(rx.view, "write_many", None)
        sub = allocator.sub_alloc_size
        for frame, info in frames:
            messages = self._rx_messages(rx, frame, info)
            if messages is None:
                result.dropped += 1
                self.counters.rx_dropped_bad_frame += 1
                result.reason = result.reason or f"frame of {len(frame)} bytes is a runt or too large"
                continue
            if len(ranges) + len(messages) > RX_BATCH_SIZE:
                self._xfer(rx, ids, tuple(ranges), nvsp.CHANNEL_DATA, queue)
                ids, ranges = [], []
            got = allocator.allocate(len(messages))
            if got is None:
                result.dropped += 1
                counters.rx_dropped_no_room += 1
                result.reason = "no free receive-buffer sub-allocation (the guest has not completed)"
                continue
            offsets = [i * sub for i in got]
            if write_many is not None:
                write_many(offsets, messages)
            else:
                for offset, data in zip(offsets, messages, strict=True):
                    write(offset, data)
            ranges += zip(map(len, messages), offsets, strict=True)  # vmtransfer_page_range: byte_count, byte_offset
            ids += got
            result.delivered += 1
            counters.rx_frames += 1
            counters.rx_bytes += len(frame)
        if ranges:
            self._xfer(rx, ids, tuple(ranges), nvsp.CHANNEL_DATA, queue)
        return result

    def _rx_messages(self, rx: _RxBuffer, frame: bytes, info: rndis.PacketInfo) -> list[bytes] | None:
        """The RNDIS messages carrying ``frame``: one, or at 6.1 with RSC several fragments marked with the
        RNDIS_PKTINFO_ID PPI; None for a runt or a frame that cannot be carried. PPI chains are packed once
        per frame (the later fragments' chains are constants)."""
        if len(frame) < rndis.ETH_HEADER_LEN:
            return None
        size = rx.allocator.sub_alloc_size
        chain = rndis.info_chain(info)
        if len(frame) <= size - _PACKET_HEAD - len(chain) - RX_FOOTER:
            return [rndis.pack_packet(frame, chain)]
        if not self.rsc or len(frame) > MAX_RSC_FRAME:
            return None
        first_chain = _rsc_first_chain(info)
        view = memoryview(frame)
        pos = size - _PACKET_HEAD - len(first_chain) - RX_FOOTER
        out = [rndis.pack_packet(view[:pos], first_chain)]
        middle, last = _RSC_CHAINS
        piece = size - _PACKET_HEAD - len(middle) - RX_FOOTER
        end = pos + (len(frame) - pos - 1) // piece * piece  # the middle fragments are whole pieces
        head = _rsc_middle_head(piece)
        out += [head + view[p:p + piece] for p in range(pos, end, piece)]
        out.append(rndis.pack_packet(view[end:], last))
        return out


@functools.lru_cache(maxsize=64)
def _rsc_first_chain(info: rndis.PacketInfo) -> bytes:
    """The PPI chain of an RSC frame's first fragment: the frame's own PPIs and RNDIS_PKTINFO_ID (1ST_FRAG)."""
    first = rndis.PacketInfo(info.checksum, None, info.vlan, info.hash_value, rndis.RscId(rndis.RSC_FIRST_FRAG))
    return rndis.packed_ppis(first)


@functools.lru_cache(maxsize=16)
def _rsc_middle_head(piece: int) -> bytes:
    """What goes before a whole middle RSC fragment of ``piece`` bytes (one per sub-allocation size)."""
    return rndis.packet_head(piece, _RSC_CHAINS[0])
