"""NetVSC's side of one primary channel, sans-IO, in the order a Linux guest drives it.

Mirrors Linux drivers/net/hyperv/netvsc.c (``netvsc_connect_vsp``: INIT probing 6.1 ... 1, NDIS_CONFIG,
SEND_NDIS_VER, ``netvsc_init_buf``: SEND_RECV_BUF and SEND_SEND_BUF and their checks; ``netvsc_send``:
small frames copied into a send-buffer section, the rest GPA-direct; ``netvsc_receive``: transfer-page
ranges checked against the receive buffer, then completed; ``netvsc_send_table``; ``netvsc_device_remove``:
revoke before close), rndis_filter.c (``rndis_filter_device_add``: INITIALIZE, then the queries and sets
in Linux's order, SUBCHANNEL when the host offers several queues; ``rndis_filter_halt_device``;
``rndis_filter_receive_data`` with RSC fragments) and netvsc_drv.c (``netvsc_linkstatus_callback``).

Inputs are method calls (``start``, ``receive``, ``send_frame``, ``close``); packets to send are pulled with
``data_to_send()``; events come back from ``receive``. Buffers are ``BufferView``s the child owns.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ...errors import LocalProtocolError
from ...packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType, pages_spanned
from ..base import Incoming
from . import nvsp, rndis, rss
from .buffers import BufferView, SendBufferAllocator
from .nvsp import NvspError, Status, Version

NETVSC_MTU_MIN = 68  # the smallest receive section Linux accepts
DIRECT_PFN_BASE = 0x100000  # where the default GPA-direct descriptors say a frame lives


def default_direct_ranges(length: int) -> tuple[GpaRange, ...]:
    """GPA ranges for a GPA-direct transmit when the child has no real guest-physical layout: the data
    travels with the packet, the descriptor only has to be well formed."""
    return (GpaRange(length, 0, tuple(range(DIRECT_PFN_BASE, DIRECT_PFN_BASE + pages_spanned(0, length)))),)


@dataclass(frozen=True, slots=True)
class Ready:
    """The NIC is up: RNDIS initialized, offloads and the packet filter set."""


@dataclass(frozen=True, slots=True)
class Failed:
    """Device add failed (as Linux fails the probe): ``reason`` says which answer."""

    reason: str


@dataclass(frozen=True, slots=True)
class SubchannelsGranted:
    """The host granted ``count`` sub-channels: the NetVSC opens them (then the RSS table is set)."""

    count: int


@dataclass(frozen=True, slots=True)
class FramesReceived:
    frames: list[tuple[bytes, rndis.PacketInfo]]


@dataclass(frozen=True, slots=True)
class LinkChanged:
    connected: bool
    speed: int  # bits per second


@dataclass(frozen=True, slots=True)
class SendTableChanged:
    table: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TornDown:
    """HALT completed and both buffers revoked: close the channel, then tear the GPADLs down."""


Event = Ready | Failed | SubchannelsGranted | FramesReceived | LinkChanged | SendTableChanged | TornDown


@dataclass(slots=True)
class GuestCounters:
    tx_frames: int = 0
    tx_section: int = 0  # frames copied into a send-buffer section
    tx_direct: int = 0  # frames sent as GPA-direct pages
    rx_frames: int = 0
    rx_errors: int = 0  # transfer-page ranges or RNDIS messages that were malformed (dropped)
    tx_failed_completions: int = 0


@dataclass(slots=True)
class _Request:
    """One RNDIS request in flight (Linux waits for each in turn)."""

    message: rndis.RndisMessage
    on_answer: Callable[[rndis.RndisMessage], None]


@dataclass(slots=True)
class _Rsc:
    frags: list[bytes | memoryview] = field(default_factory=list)
    info: rndis.PacketInfo = rndis.NO_INFO


class NvspGuest:
    """A NetVSC primary channel. ``start()`` begins with INIT (or, given ``version``, after a finished
    ``nvsp.VscHandshake``); the guest then sets itself up as Linux does and reports ``Ready``."""

    def __init__(self, *, recv_gpadl: int, recv_view: BufferView, recv_size: int, send_gpadl: int,
                 send_view: BufferView, send_size: int, mtu: int = 1500, queues: int = 1,
                 versions: tuple[int, ...] = nvsp.LINUX_VERSIONS, version: int | None = None,
                 direct_ranges: Callable[[int], tuple[GpaRange, ...]] = default_direct_ranges,
                 direct_done: Callable[[tuple[GpaRange, ...]], None] | None = None,
                 auto_complete: bool = True) -> None:
        self.recv_gpadl, self.recv_view, self.recv_size = recv_gpadl, recv_view, recv_size
        self.send_gpadl, self.send_view, self.send_size = send_gpadl, send_view, send_size
        self.mtu = mtu
        self.queues = queues
        self.direct_ranges = direct_ranges
        # Called with a GPA-direct transmit's ranges once its completion came: the pages are the guest's again.
        self.direct_done = direct_done
        self._tx_direct: dict[int, tuple[GpaRange, ...]] = {}  # trans_id -> the pages a direct transmit names
        self.auto_complete = auto_complete
        self.handshake = nvsp.VscHandshake(versions)
        self.version: int | None = version
        self.mac = b""
        self.friendly_name = ""
        self.connected = True
        self.link_speed = 0
        self.subchannels = 0
        self.requested_subchannels = 0
        self.send_table: tuple[int, ...] = ()
        self.rss_key = bytes(range(1, rndis.RSS_KEY_SIZE + 1))  # Linux fills it at random (netdev_rss_key_fill)
        self.recv_section_size = 0
        self.recv_sections = 0
        self.max_pkt_per_msg = 0
        self.pkt_alignment = 0
        self.ready = False
        self.failed: str | None = None
        self.closing = False
        self.counters = GuestCounters()
        self.sends: SendBufferAllocator | None = None
        self.pending_receive_completions: list[int] = []
        self._outbox: list[Packet] = []
        self._next_trans_id = 0x1000  # INIT used 1, 2, ...
        self._waiting: dict[int, str] = {}  # NVSP requests awaiting their completion, by trans_id
        self._tx_sections: dict[int, int] = {}  # trans_id -> send-buffer section (NO_SECTION if direct)
        self._next_req_id = 1
        self._request: _Request | None = None
        self._steps: list[Callable[[], _Request | None]] = []
        self._halt_trans_id: int | None = None
        self._rsc = _Rsc()

    def data_to_send(self) -> list[Packet]:
        out, self._outbox = self._outbox, []
        return out

    def _trans_id(self) -> int:
        self._next_trans_id += 1
        return self._next_trans_id

    def _send(self, message: nvsp.NvspMessage, wait: str | None = None) -> int:
        trans_id = self._trans_id()
        flags = FLAG_COMPLETION_REQUESTED if wait else 0
        if wait:
            self._waiting[trans_id] = wait
        self._outbox.append(Packet(PacketType.DATA_INBAND, flags, trans_id, nvsp.encode(message)))
        return trans_id

    # ---- setup ----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.version is not None:
            self._after_init()
            return
        for out in self.handshake.start():
            self._outbox.append(out.to_packet())

    def _after_init(self) -> None:
        version = self.version
        assert version is not None
        if version >= Version.V2:
            self._send(nvsp.SendNdisConfig(self.mtu + rndis.ETH_HEADER_LEN, 0, nvsp.linux_capabilities(version)))
        self._send(nvsp.SendNdisVersion(*nvsp.linux_ndis_version(version)))
        self._send(nvsp.SendReceiveBuffer(self.recv_gpadl, nvsp.RECEIVE_BUFFER_ID), wait="SEND_RECV_BUF")

    def _fail(self, reason: str) -> list[Event]:
        self.failed = reason
        return [Failed(reason)]

    def _recv_buf_done(self, message: nvsp.NvspMessage) -> list[Event]:
        if not isinstance(message, nvsp.SendReceiveBufferComplete):
            raise NvspError(f"{type(message).__name__} answers SEND_RECV_BUF")
        if message.status != Status.SUCCESS:
            return self._fail(f"host refused the receive buffer (status {message.status})")
        if len(message.sections) != 1 or message.sections[0].offset != 0:
            return self._fail(f"receive buffer answered with {len(message.sections)} sections, need one at 0")
        section = message.sections[0]
        if section.sub_alloc_size < NETVSC_MTU_MIN or \
                section.sub_alloc_size * section.num_sub_allocs > self.recv_size:
            return self._fail(f"receive sections of {section.sub_alloc_size} x {section.num_sub_allocs} do not "
                              f"fit the {self.recv_size}-byte buffer")
        self.recv_section_size, self.recv_sections = section.sub_alloc_size, section.num_sub_allocs
        self._send(nvsp.SendSendBuffer(self.send_gpadl, nvsp.SEND_BUFFER_ID), wait="SEND_SEND_BUF")
        return []

    def _send_buf_done(self, message: nvsp.NvspMessage) -> list[Event]:
        if not isinstance(message, nvsp.SendSendBufferComplete):
            raise NvspError(f"{type(message).__name__} answers SEND_SEND_BUF")
        if message.status != Status.SUCCESS:
            return self._fail(f"host refused the send buffer (status {message.status})")
        try:
            self.sends = SendBufferAllocator(self.send_size, message.section_size)
        except NvspError as exc:
            return self._fail(str(exc))
        self._steps = self._linux_steps()
        return self._next_step()

    def _linux_steps(self) -> list[Callable[[], _Request | None]]:
        """rndis_filter_device_add and rndis_netdev_set_hwcaps, then the open's packet filter."""
        version = self.version or Version.V1
        steps: list[Callable[[], _Request | None]] = [
            lambda: self._req(rndis.Initialize(self._req_id()), self._initialized),
            lambda: self._query(rndis.Oid.GEN_MAXIMUM_FRAME_SIZE, self._frame_size),
            lambda: self._query(rndis.Oid.P802_3_PERMANENT_ADDRESS, self._mac),
            lambda: self._query(rndis.Oid.GEN_FRIENDLY_NAME, self._name),
            lambda: self._query(rndis.Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES, self._hwcaps, self._offload_probe()),
            lambda: self._set(rndis.Oid.TCP_OFFLOAD_PARAMETERS, self._offload_params()),
            lambda: self._query(rndis.Oid.GEN_MEDIA_CONNECT_STATUS, self._media),
        ]
        if version >= Version.V5:
            steps += [lambda: self._query(rndis.Oid.GEN_LINK_SPEED, self._speed),
                      lambda: self._query(rndis.Oid.GEN_RECEIVE_SCALE_CAPABILITIES, self._rss_caps)]
        steps.append(lambda: self._set(rndis.Oid.GEN_CURRENT_PACKET_FILTER,
                                       struct.pack("<I", rndis.LINUX_PACKET_FILTER)))
        return steps

    def _offload_probe(self) -> bytes:
        """Linux puts an NDIS_OFFLOAD header in the hardware-capabilities query (revision by NVSP version)."""
        version = self.version or Version.V1
        revision, size = (3, rndis.NDIS_OFFLOAD_SIZE) if version >= Version.V5 else \
            (2, rndis.NDIS_OFFLOAD_SIZE) if version >= Version.V4 else (1, rndis.NDIS_OFFLOAD_SIZE_6_0)
        return struct.pack("<BBH", rndis.NDIS_OBJECT_TYPE_OFFLOAD, revision, size).ljust(size, b"\0")

    def _offload_params(self) -> bytes:
        """``struct ndis_offload_params``: checksums TX+RX, LSOv2 for IPv4/IPv6 (and RSC at 6.1)."""
        version = self.version or Version.V1
        rsc = 1 if version >= Version.V61 else 0
        body = struct.pack("<BBH5B7BI", rndis.NDIS_OBJECT_TYPE_DEFAULT, 3, 24 if version >= Version.V5 else 20,
                           4, 4, 4, 4, 4, 0, 0, 2, 2, 0, 0, 0, 0)
        return body + (struct.pack("<BBBB", rsc, rsc, 0, 0) if version >= Version.V5 else b"")

    def _req(self, message: rndis.RndisMessage, on_answer: Callable[[rndis.RndisMessage], None]) -> _Request:
        return _Request(message, on_answer)

    def _query(self, oid: int, handler: Callable[[rndis.QueryComplete], None], info: bytes = b"") -> _Request:
        def answered(message: rndis.RndisMessage) -> None:
            if not isinstance(message, rndis.QueryComplete):
                raise NvspError(f"RNDIS {type(message).__name__} answers a QUERY")
            handler(message)
        return _Request(rndis.Query(self._req_id(), oid, info), answered)

    def _set(self, oid: int, value: bytes) -> _Request:
        def answered(message: rndis.RndisMessage) -> None:
            if not isinstance(message, rndis.SetComplete):
                raise NvspError(f"RNDIS {type(message).__name__} answers a SET")
            if message.status != rndis.Status.SUCCESS and oid != rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS:
                raise _SetupFailed(f"SET {rndis.oid_text(oid)} failed with status {message.status:#x}")
        return _Request(rndis.Set(self._req_id(), oid, value), answered)

    def _next_step(self) -> list[Event]:
        while self._steps:
            request = self._steps.pop(0)()
            if request is _WAIT_NVSP:
                return []  # an NVSP request is out; its completion continues the steps
            if request is not None:
                self._issue(request)
                return []
        if not self.ready and self.failed is None:
            self.ready = True
            return [Ready()]
        return []

    def _issue(self, request: _Request) -> None:
        self._request = request
        self._send_rndis(rndis.encode(request.message), nvsp.CHANNEL_CONTROL)

    def _req_id(self) -> int:
        req_id = self._next_req_id
        self._next_req_id += 1
        return req_id

    # Answers during setup.
    def _initialized(self, message: rndis.RndisMessage) -> None:
        if not isinstance(message, rndis.InitializeComplete):
            raise NvspError(f"RNDIS {type(message).__name__} answers INITIALIZE")
        if message.status != rndis.Status.SUCCESS:
            raise _SetupFailed(f"RNDIS INITIALIZE failed with status {message.status:#x}")
        self.max_pkt_per_msg = message.max_pkt_per_msg
        self.pkt_alignment = 1 << message.pkt_alignment_factor if message.pkt_alignment_factor < 32 else 0

    def _frame_size(self, message: rndis.QueryComplete) -> None:
        if message.status == rndis.Status.SUCCESS and len(message.info) >= 4:
            self.mtu = min(self.mtu, struct.unpack_from("<I", message.info)[0])

    def _mac(self, message: rndis.QueryComplete) -> None:
        if message.status != rndis.Status.SUCCESS or len(message.info) < 6:
            raise _SetupFailed("OID_802_3_PERMANENT_ADDRESS failed: the NIC has no MAC address")
        self.mac = message.info[:6]

    def _name(self, message: rndis.QueryComplete) -> None:
        if message.status == rndis.Status.SUCCESS:
            self.friendly_name = message.info.decode("utf-16-le", "replace").split("\0", 1)[0]

    def _hwcaps(self, message: rndis.QueryComplete) -> None:
        info = message.info
        if message.status != rndis.Status.SUCCESS or len(info) < 4:
            raise _SetupFailed(f"OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES failed (status {message.status:#x})")
        obj_type, revision, size = struct.unpack_from("<BBH", info)
        if obj_type != rndis.NDIS_OBJECT_TYPE_OFFLOAD or revision < 1 or size < rndis.NDIS_OFFLOAD_SIZE_6_0:
            raise _SetupFailed(f"hardware offload answer has type {obj_type:#x} revision {revision} size {size}")

    def _media(self, message: rndis.QueryComplete) -> None:
        if message.status == rndis.Status.SUCCESS and len(message.info) >= 4:
            self.connected = struct.unpack_from("<I", message.info)[0] == rndis.MEDIA_STATE_CONNECTED

    def _speed(self, message: rndis.QueryComplete) -> None:
        if message.status == rndis.Status.SUCCESS and len(message.info) >= 4:
            self.link_speed = struct.unpack_from("<I", message.info)[0] * 100

    def _rss_caps(self, message: rndis.QueryComplete) -> None:
        if message.status != rndis.Status.SUCCESS or len(message.info) < rndis.RSS_CAPABILITIES_SIZE:
            return
        host_queues = struct.unpack_from("<I", message.info, 12)[0]
        wanted = min(self.queues, host_queues, 64)
        if wanted > 1:
            # rndis_set_subchannel: the request goes before the remaining steps (the packet filter).
            self._steps.insert(0, lambda: self._subchannel_request(wanted - 1))

    def _subchannel_request(self, count: int) -> _Request | None:
        self.requested_subchannels = count
        self._send(nvsp.SubchannelRequest(nvsp.SUBCHANNEL_ALLOCATE, count), wait="SUBCHANNEL")
        return _WAIT_NVSP

    def _subchannels_done(self, message: nvsp.NvspMessage) -> list[Event]:
        if not isinstance(message, nvsp.SubchannelComplete):
            raise NvspError(f"{type(message).__name__} answers SUBCHANNEL")
        if message.status != Status.SUCCESS:
            return self._next_step()  # Linux keeps the single channel
        if message.num_subchannels > self.requested_subchannels:  # Linux: "invalid number of allocated sub channel"
            raise _SetupFailed(f"host granted {message.num_subchannels} sub-channels, {self.requested_subchannels} "
                               "were asked for")
        self.subchannels = message.num_subchannels
        return [SubchannelsGranted(self.subchannels), *self._next_step()]

    def subchannels_opened(self, count: int) -> list[Event]:
        """The NetVSC opened ``count`` sub-channels (Linux ``rndis_set_subchannel`` once ``open_chn ==
        num_chn``): the send table spreads over every channel, then RSS is SET for them all."""
        if not 0 < count <= self.subchannels:
            raise LocalProtocolError(f"{count} sub-channels opened, {self.subchannels} were granted")
        queues = count + 1
        self.subchannels = count
        self.send_table = tuple(i % queues for i in range(nvsp.INDIRECTION_TABLE_ENTRIES))
        self._steps.append(lambda: self._set(rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS,
                                             rss_parameters(queues, self.rss_key)))
        events: list[Event] = [SendTableChanged(self.send_table)]
        if self._request is None:
            events += self._next_step()
        return events

    # ---- packets from the host -------------------------------------------------------------------------

    def receive(self, packet: Packet) -> list[Event]:
        """One packet from the host; ``NvspError``/``RndisError`` end the channel."""
        if self.version is None:
            incoming = Incoming(packet.type, packet.trans_id, packet.completion_requested, packet.payload)
            for out in self.handshake.receive(incoming):
                self._outbox.append(out.to_packet())
            if self.handshake.failed:
                return self._fail(self.handshake.failed)
            if self.handshake.done:
                self.version = self.handshake.negotiated_version
                self._after_init()
            return []
        try:
            if packet.type == PacketType.COMP:
                return self._completion(packet)
            if packet.type == PacketType.DATA_USING_XFER_PAGES:
                return self._xfer(packet)
            if packet.type == PacketType.DATA_INBAND:
                return self._inband(packet)
        except _SetupFailed as exc:
            return self._fail(str(exc))
        raise NvspError(f"NetVSC got packet type {packet.type:#x}")

    def _completion(self, packet: Packet) -> list[Event]:
        waited = self._waiting.pop(packet.trans_id, None)
        if waited is not None:
            if not packet.payload:
                return []  # SWITCH_DATA_PATH's empty completion
            message = nvsp.decode(packet.payload, completion=True)
            if waited == "SEND_RECV_BUF":
                return self._recv_buf_done(message)
            if waited == "SEND_SEND_BUF":
                return self._send_buf_done(message)
            return self._subchannels_done(message)
        section = self._tx_sections.pop(packet.trans_id, None)
        if section is None:
            raise NvspError(f"NVSP completion for unknown transaction id {packet.trans_id:#x}")
        status = nvsp.unpack_rndis_packet_complete(packet.payload)
        if status is None:
            message = nvsp.decode(packet.payload, completion=True)
            raise NvspError(f"{type(message).__name__} completes SEND_RNDIS_PKT")
        if status != Status.SUCCESS:
            self.counters.tx_failed_completions += 1  # Linux logs it and still frees the section
        if section != nvsp.NO_SECTION and self.sends is not None:
            self.sends.release(section)
        elif section == nvsp.NO_SECTION and self._tx_direct:
            ranges = self._tx_direct.pop(packet.trans_id, None)
            if ranges is not None and self.direct_done is not None:
                self.direct_done(ranges)
        if packet.trans_id == self._halt_trans_id:
            return self._revoke()
        return []

    def _inband(self, packet: Packet) -> list[Event]:
        msg_type, body = nvsp.unpack_message(packet.payload)
        if msg_type == nvsp.MessageType.SEND_INDIRECTION_TABLE:
            self.send_table = nvsp.SendIndirectionTable.unpack(body, self.version or Version.V1).table
            return [SendTableChanged(self.send_table)]
        message = nvsp.decode(packet.payload)
        if isinstance(message, nvsp.SendVfAssociation):
            return []  # no VF to team with; Linux never completes it
        if isinstance(message, nvsp.SwitchDataPath):
            return []  # the host moved us back to the synthetic path, which is the only one here
        raise NvspError(f"NVSP {type(message).__name__} sent by the host")

    def _xfer(self, packet: Packet) -> list[Event]:
        if nvsp.unpack_rndis_packet(packet.payload) is None:
            message = nvsp.decode(packet.payload)
            raise NvspError(f"transfer-page packet carries NVSP {type(message).__name__}")
        events: list[Event] = []
        if packet.xfer_pageset_id != nvsp.RECEIVE_BUFFER_ID or not self.recv_section_size:
            self.counters.rx_errors += 1  # Linux: "Invalid xfer page set id"; dropped, still completed
        else:
            frames: list[tuple[bytes, rndis.PacketInfo]] = []
            read, size, section, counters = self.recv_view.read, self.recv_size, self.recv_section_size, self.counters
            mapping: memoryview | None = getattr(self.recv_view, "mapping", None)
            for length, offset in packet.xfer_ranges:  # vmtransfer_page_range: byte_count, byte_offset
                if offset < 0 or length <= 0 or offset + length > size or length > section:
                    counters.rx_errors += 1  # netvsc_receive: "Packet offset:%u + len:%u too big"
                    continue
                try:
                    data = mapping[offset:offset + length] if mapping is not None else read(offset, length)
                    if data[:4] == rndis.PACKET_MSG_TYPE:  # the data path: one pass, no message object
                        frame, info = rndis.unpack_packet_view(data)
                        rsc = info.rsc
                        if rsc is None:
                            frames.append((bytes(frame), info))
                        elif not rsc.flags and self._rsc.frags:  # a middle piece of a coalesced frame
                            self._rsc.frags.append(frame)
                        else:
                            self._packet(frame, info, frames)
                    else:
                        events += self._rndis_in(bytes(data), frames)
                except rndis.RndisError:
                    counters.rx_errors += 1
                except _SetupFailed as exc:
                    events += self._fail(str(exc))
            if self._rsc.frags and mapping is not None:  # a coalesced frame goes on in a later packet: keep
                self._rsc.frags = [bytes(f) for f in self._rsc.frags]  # its pieces, not views of the buffer
            if frames:
                self.counters.rx_frames += len(frames)
                events.append(FramesReceived(frames))
        self.pending_receive_completions.append(packet.trans_id)
        if self.auto_complete:
            self.complete_receives()
        return events

    def complete_receives(self) -> None:
        """Return every received transfer-page packet's sub-allocations to the host (Linux batches these
        per NAPI poll)."""
        done = nvsp.rndis_packet_complete(Status.SUCCESS)
        for trans_id in self.pending_receive_completions:
            self._outbox.append(Packet(PacketType.COMP, 0, trans_id, done))
        self.pending_receive_completions = []

    def _rndis_in(self, data: bytes, frames: list[tuple[bytes, rndis.PacketInfo]]) -> list[Event]:
        if data[:4] == rndis.PACKET_MSG_TYPE:  # the data path: one pass, no message object
            self._packet(*rndis.unpack_packet(data), frames)
            return []
        message = rndis.decode(data)
        if isinstance(message, rndis.PacketMessage):
            self._packet(message.data, message.info, frames)
            return []
        if isinstance(message, rndis.IndicateStatus):
            return self._indication(message)
        request = self._request
        req_id = getattr(message, "req_id", None)
        if request is None or req_id != getattr(request.message, "req_id", None):
            return []  # rndis_filter_receive_response: "got rndis message uninitialized" / no request: dropped
        self._request = None
        request.on_answer(message)
        return self._next_step()

    def _packet(self, data: bytes | memoryview, info: rndis.PacketInfo,
                frames: list[tuple[bytes, rndis.PacketInfo]]) -> None:
        rsc = info.rsc
        if rsc is None:
            frames.append((bytes(data), info))
            return
        if rsc.flags & rndis.RSC_FIRST_FRAG:
            self._rsc = _Rsc([], info)
        elif not self._rsc.frags:
            raise rndis.RndisError("RSC fragment without a first fragment")
        self._rsc.frags.append(data)  # a view of bytes read for it alone: joined once, at the last fragment
        if rsc.flags & rndis.RSC_LAST_FRAG:
            info = self._rsc.info
            frames.append((b"".join(self._rsc.frags), rndis.PacketInfo(info.checksum, None, info.vlan,
                                                                      info.hash_value)))
            self._rsc = _Rsc()

    def _indication(self, message: rndis.IndicateStatus) -> list[Event]:
        if message.status in (rndis.Status.MEDIA_CONNECT, rndis.Status.MEDIA_DISCONNECT):
            self.connected = message.status == rndis.Status.MEDIA_CONNECT
        elif message.status == rndis.Status.LINK_SPEED_CHANGE and len(message.buffer) >= 4:
            self.link_speed = struct.unpack_from("<I", message.buffer)[0] * 100
        else:
            return []
        return [LinkChanged(self.connected, self.link_speed)]

    # ---- transmit ----------------------------------------------------------------------------------

    def send_frame(self, frame: bytes, info: rndis.PacketInfo = rndis.NO_INFO) -> None:
        """Transmit one frame: copied into a free send-buffer section when it fits and is not a large send,
        else as GPA-direct pages (section index 0xFFFFFFFF)."""
        if not self.ready or self.closing:
            raise LocalProtocolError("NetVSC cannot transmit before Ready or after close")
        self.counters.tx_frames += 1
        message = rndis.pack_packet(frame, rndis.info_chain(info))  # rndis.encode(PacketMessage(frame, info))
        self._send_rndis(message, nvsp.CHANNEL_DATA, info.lso is None)

    def _send_rndis(self, data: bytes, channel: int, may_copy: bool = True) -> int:
        sends = self.sends
        trans_id = self._trans_id()
        index = sends.allocate() if sends is not None and may_copy and len(data) <= sends.section_size else None
        if index is not None:
            assert sends is not None
            self.send_view.write(index * sends.section_size, data)
            self._tx_sections[trans_id] = index
            self.counters.tx_section += channel == nvsp.CHANNEL_DATA
            payload = nvsp.pack_rndis_packet(channel, index, len(data))
            self._outbox.append(Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, trans_id, payload))
            return trans_id
        self._tx_sections[trans_id] = nvsp.NO_SECTION
        self.counters.tx_direct += channel == nvsp.CHANNEL_DATA
        payload = nvsp.pack_rndis_packet(channel, nvsp.NO_SECTION, 0)
        ranges = self.direct_ranges(len(data))
        if self.direct_done is not None:
            self._tx_direct[trans_id] = ranges
        self._outbox.append(Packet(PacketType.DATA_USING_GPA_DIRECT, FLAG_COMPLETION_REQUESTED, trans_id, payload,
                                   ranges, data))
        return trans_id

    @property
    def tx_in_flight(self) -> int:
        return len(self._tx_sections)

    def keepalive(self) -> None:
        """An RNDIS KEEPALIVE (Linux sends none; Windows does): answered by KEEPALIVE_CMPLT."""
        self._steps.append(lambda: self._req(rndis.Keepalive(self._req_id()), lambda message: None))
        if self._request is None:
            self._next_step()

    def set_packet_filter(self, value: int) -> None:
        """ifup/ifdown: SET OID_GEN_CURRENT_PACKET_FILTER (0 stops all delivery)."""
        self._steps.append(lambda: self._set(rndis.Oid.GEN_CURRENT_PACKET_FILTER, struct.pack("<I", value)))
        if self._request is None:
            self._next_step()

    def close(self) -> None:
        """netvsc_device_remove: RNDIS HALT, and when its send completes, REVOKE_RECV_BUF and REVOKE_SEND_BUF
        (``TornDown`` then says the channel may close and its GPADLs go)."""
        if self.closing:
            return
        self.closing = True
        halt = rndis.Halt(self._req_id())
        self._halt_trans_id = self._send_rndis(rndis.encode(halt), nvsp.CHANNEL_CONTROL)

    def _revoke(self) -> list[Event]:
        self._send(nvsp.RevokeReceiveBuffer(nvsp.RECEIVE_BUFFER_ID))
        self._send(nvsp.RevokeSendBuffer(nvsp.SEND_BUFFER_ID))
        return [TornDown()]


_WAIT_NVSP = _Request(rndis.Halt(0), lambda message: None)  # a step that sent an NVSP request instead


class _SetupFailed(Exception):
    """A host answer that makes Linux fail the device add (reported as ``Failed``, not a protocol error)."""


def rss_parameters(queues: int, key: bytes = bytes(range(1, rndis.RSS_KEY_SIZE + 1)),
                   table_entries: int = rndis.DEFAULT_INDIRECTION_TABLE) -> bytes:
    """``struct ndis_recv_scale_param`` as Linux ``rndis_set_rss_param_msg`` sends it: the 40-byte
    parameters, then the indirection table (entry i = i % queues), then the key."""
    table = struct.pack(f"<{table_entries}I", *(i % queues for i in range(table_entries)))
    table_offset = rndis.RSS_PARAMETERS_SIZE
    key_offset = table_offset + len(table)
    params = struct.pack("<BBHHHIH2xIH2xIIII", rndis.NDIS_OBJECT_TYPE_RSS_PARAMETERS, 2, rndis.RSS_PARAMETERS_SIZE,
                         0, 0, rss.LINUX_HASH_INFO, len(table), table_offset, len(key), key_offset, 0, 0, 0)
    return params + table + key


__all__ = ["Event", "Failed", "FramesReceived", "GuestCounters", "LinkChanged", "NvspGuest", "Ready",
           "SendTableChanged", "SubchannelsGranted", "TornDown", "default_direct_ranges", "rss_parameters"]
