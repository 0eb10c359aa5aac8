"""Fuzz targets: every decoder of ``vmbus_proto`` (and the SCSI target behind VSTOR) as a function of bytes.

The contract each target checks: a decoder returns a value or raises the project's own error for its layer
(``FrameError``, ``MessageError``, ``PacketError``, ``RingOverrunError``, ``DeviceProtocolError`` and its
``NvspError``/``RndisError``). Anything else escaping (IndexError, struct.error, a ValueError, an assertion of
a property below) is a bug. Where an encoder exists the target also checks ``decode(encode(x)) == x`` for
what it decoded. A target's first byte usually picks which decoder of its layer reads the rest.

The same functions run under atheris (``python -m tests.fuzz``, coverage-guided) and under Hypothesis in the
normal suite (tests/unit/test_fuzz_decoders.py); their seeds are real traffic (``tests.fuzz.seeds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from vmbus_proto import envelope, gpadl, messages, server
from vmbus_proto.devices.base import Incoming
from vmbus_proto.devices.heartbeat import ic
from vmbus_proto.devices.heartbeat import protocol as heartbeat
from vmbus_proto.devices.input import host as input_host
from vmbus_proto.devices.input import keyboard, mouse
from vmbus_proto.devices.network import nvsp, offload, rndis
from vmbus_proto.devices.registry import ALL
from vmbus_proto.devices.storage import vstor
from vmbus_proto.devices.video import host as video_host
from vmbus_proto.devices.video import synthvid
from vmbus_proto.errors import (
    DeviceProtocolError,
    FrameError,
    MessageError,
    PacketError,
    ProtocolError,
    RingOverrunError,
)
from vmbus_proto.framing import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameDecoder
from vmbus_proto.packets import Packet, PacketType, packet_ring_size
from vmbus_proto.ring import RingReader, RingWriter

from .reader import Reader, packets


class PropertyFailed(AssertionError):
    """A decoder returned a value that breaks one of its properties (a bug, like an unexpected exception)."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise PropertyFailed(what)


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    expected: tuple[type[BaseException], ...]  # what the decoders may raise on bad input
    doc: str
    max_len: int = 4096  # libFuzzer's -max_len: larger inputs add nothing to these decoders

    def __call__(self, data: bytes) -> None:
        """Run one input; the expected errors are swallowed, anything else propagates (a finding)."""
        with contextlib.suppress(self.expected):
            self.run(data)


def _pick(data: bytes, n: int) -> tuple[int, bytes]:
    return (data[0] % n, data[1:]) if data else (0, b"")


def _incoming(p: Packet) -> Incoming:
    return Incoming(p.type, p.trans_id, p.completion_requested, p.payload)


# ---- the stream envelope -----------------------------------------------------------------------------------

_MAX_FRAMES = (DEFAULT_MAX_FRAME, 4096, 80_000, 64)


def frame(data: bytes) -> None:
    """``FrameDecoder`` fed the same stream in one piece and in pieces of a fuzzed size, through both of its
    interfaces (``feed`` and ``get_buffer``/``buffer_updated``): the same frames or the same failure."""
    r = Reader(data)
    mode, step = r.u8(), r.u8() + 1
    stream = r.rest()
    max_frame = _MAX_FRAMES[mode & 3]

    def decode(pieces: int) -> tuple[list[tuple[int, int, bytes, bytes, int]], FrameError | None]:
        dec = FrameDecoder(max_frame)
        out: list[tuple[int, int, bytes, bytes, int]] = []
        try:
            if pieces == 1:
                got = dec.feed(stream)
            else:
                got = []
                pos = 0
                while pos < len(stream):
                    if mode & 4:  # the BufferedProtocol path: at most ``step`` bytes into each buffer
                        buf = dec.get_buffer()
                        check(len(buf) > 0, "get_buffer returned an empty buffer")
                        n = min(len(buf), step, len(stream) - pos)
                        buf[:n] = stream[pos:pos + n]
                        got += dec.buffer_updated(n)
                    else:
                        n = min(step, len(stream) - pos)
                        got += dec.feed(stream[pos:pos + n])
                    pos += n
                    check(dec.buffered <= max_frame + HEADER_SIZE, f"decoder holds {dec.buffered} bytes")
        except FrameError as exc:
            return out, exc
        for f in got:
            check(len(f.body) + len(f.data) <= max_frame, "a frame larger than max_frame was returned")
            out.append((f.kind, f.relid, bytes(f.body), bytes(f.data), f.flags))
        return out, None

    whole, whole_err = decode(1)
    split, split_err = decode(2)
    check((whole_err is None) == (split_err is None), f"whole stream: {whole_err!r}, split: {split_err!r}")
    if whole_err is None:
        check(whole == split, "split reads decoded other frames than one read")
        for kind, *_ in whole:
            check(1 <= kind <= 5, f"frame kind {kind} passed the decoder")
    if whole_err is not None:
        raise whole_err


def envelope_bodies(data: bytes) -> None:
    """HELLO, CLOSE, SIGNAL and PACKET bodies; each decoded value re-encodes to itself."""
    which, body = _pick(data, 4)
    if which == 0:
        hello = envelope.Hello.decode(body)
        check(envelope.Hello.decode(hello.encode()) == hello, "HELLO does not round-trip")
    elif which == 1:
        reason, code = envelope.decode_close_code(body)  # never raises: a CLOSE is the peer's last word
        check(isinstance(reason, str) and (code is None or isinstance(code, str)), "CLOSE decoded to non-text")
    elif which == 2:
        sig = envelope.Signal.decode(body)
        check(envelope.Signal.decode(sig.encode()) == sig, "SIGNAL does not round-trip")
    else:
        pkt = envelope.decode_packet(body, b"", 1 << 16)
        again = envelope.decode_packet(envelope.encode_packet(pkt), b"", 1 << 16)
        check(again == pkt, "PACKET does not round-trip")


def ring_packet(data: bytes) -> None:
    """A PACKET body's descriptor fields and GPA ranges, then its ring accounting: the fast paths' ring size
    equals the general formula, and a reader/writer pair accepts exactly what fits."""
    r = Reader(data)
    ring_pages, read_index = r.u8() % 16 + 2, r.u32()
    pkt = envelope.decode_packet(r.rest(), b"", 1 << 16)
    want = packet_ring_size(len(pkt.payload), pkt.ranges, len(pkt.xfer_ranges))
    check(pkt.ring_size == want, f"ring size {pkt.ring_size}, the formula says {want}")
    size = (ring_pages - 1) * 4096
    reader, writer = RingReader(size), RingWriter(size)
    fits = writer.try_write(pkt.ring_size)
    check(fits == (pkt.ring_size < size), "the writer's view of what fits is wrong")
    if not fits:
        return
    peer = RingWriter(size)
    peer.write(pkt.ring_size)
    peer.update(read_index, 0)  # a peer's SIGNAL: any u32 read_index; RingOverrunError when impossible
    check(peer.free <= size, "a peer's read_index gave the writer more than the ring")
    reader.arrive(pkt.ring_size)
    reader.consume(pkt.ring_size)
    writer.update(reader.credit(), 0)
    check(writer.free == size, "credit did not return the whole ring")


# ---- control messages ----------------------------------------------------------------------------------------

def control(data: bytes) -> None:
    """One CHANNELMSG body: decoded, described for --trace, packed to its Hyper-V layout, round-tripped."""
    msg = messages.decode(data)
    msg.describe(0x50003)
    msg.to_binary(0x50003)
    check(messages.decode(msg.encode()) == msg, f"{msg.msgtype.name} does not round-trip")


def _fields(r: Reader, count_mod: int) -> list[int]:
    return [r.u64() if r.u8() & 1 else r.u16() for _ in range(r.u8() % count_mod)]


def gpadl_assembly(data: bytes) -> None:
    """GPADL_HEADER then GPADL_BODY messages built field by field from the input (through the decoder's own
    field checks), assembled as the host does: never more PFNs than the ranges span."""
    r = Reader(data)
    ranges = [[r.u32() if r.u8() & 1 else r.u16(), r.u16()] for _ in range(r.u8() % 5)]
    header = messages.from_dict({"msgtype": 8, "child_relid": r.u8(), "gpadl": r.u32(),
                                 "range_buflen": r.u16(), "rangecount": r.u8() % 6, "ranges": ranges,
                                 "pfns": _fields(r, 30)})
    assert isinstance(header, messages.GpadlHeader)
    asm = gpadl.GpadlAssembly.from_header(header)
    while r.left and not asm.complete:
        body = messages.from_dict({"msgtype": 9, "msgnumber": 0, "gpadl": asm.gpadl, "pfns": _fields(r, 32)})
        assert isinstance(body, messages.GpadlBody)
        asm.add(body.pfns)
        check(len(asm.pfns) <= asm.expected_pfns, "a GPADL holds more PFNs than its ranges span")


_OFFERS = [server.OfferSpec(s.name, s.class_id, s.default_instance, s.pipe_mode, s.mmio_megabytes) for s in ALL]


def _control_bodies(r: Reader) -> list[bytes]:
    out = []
    while r.left >= 2 and len(out) < 64:
        out.append(r.take(r.u8()))
    return out


def host_core(data: bytes) -> None:
    """The host's control-plane state machine (``server.HostConnection``) fed a sequence of guest message
    bodies; the device answers every open, close and GPADL teardown (an open fails when the OPENCHANNEL's
    openid has its top bit set). The core never raises for a guest's mistake, and what it sends is host-to-guest
    messages that round-trip."""
    r = Reader(data)
    core = server.HostConnection(_OFFERS)
    for body in _control_bodies(r):
        try:
            msg = messages.decode(body)
        except MessageError as exc:
            core.receive_malformed(exc)
        else:
            core.receive(msg)
        for _ in range(16):  # device answers may trigger more actions; bounded
            actions = core.actions()
            if not actions:
                break
            for action in actions:
                if isinstance(action, server.DeviceOpen):
                    core.open_complete(action.params.relid, action.seq, not action.params.openid & 0x80000000)
                elif isinstance(action, server.DeviceClose):
                    core.close_complete(action.relid, action.seq)
                elif isinstance(action, server.TeardownGpadl):
                    core.gpadl_released(action.relid, action.gpadl)
                elif isinstance(action, server.Send):
                    msg_out = action.message
                    check(msg_out.msgtype in messages.HOST_TO_GUEST, f"host sent {msg_out.msgtype.name}")
                    check(messages.decode(msg_out.encode()) == msg_out, "host message does not round-trip")


# ---- device protocols -------------------------------------------------------------------------------------

def _describe_all(payload: bytes, describe: Callable[..., Any], request: bytes | None = None) -> None:
    for ptype in (PacketType.DATA_INBAND, PacketType.COMP):
        with contextlib.suppress(DeviceProtocolError):
            describe(payload, ptype, request)


def storage(data: bytes) -> None:
    """VSTOR: StorVSP's handshake state machine fed a packet sequence, then ``parse_request`` for each later
    packet (the per-I/O hot path); every packet also through ``describe``."""
    which, data = _pick(data, 2)
    hs = vstor.VspHandshake(max_channel_cnt=4)
    for pkt in packets(data):
        _describe_all(pkt.payload, vstor.describe, pkt.payload if which else None)
        if not hs.done:
            for out in hs.receive(_incoming(pkt)):
                vstor.describe(out.payload, PacketType.COMP, pkt.payload)  # our own answers always read back
            continue
        _op, srb = vstor.parse_request(pkt)
        if srb is not None:
            check(0 < srb.cdb_length <= vstor.MAX_CDB_LENGTH, "parse_request passed a bad cdb_length")


class _Log:
    """Receives the SCSI target's error log: an internal failure is a finding."""

    def error(self, event: str, **kw: Any) -> None:
        raise PropertyFailed(f"SCSI target internal failure: {event} {kw}")


@functools.cache
def _scsi_disk() -> tuple[asyncio.AbstractEventLoop, Any]:
    from parent_partition.devices.storage.scsi import ScsiDisk  # noqa: PLC0415  (heavy: only when the target runs)
    from tests.unit.test_scsi import FakeBackend  # noqa: PLC0415  (heavy: only when the target runs)
    return asyncio.new_event_loop(), ScsiDisk(FakeBackend(1 << 20), disk_id=uuid.UUID(int=1),
                                              max_transfer_bytes=64 * 1024)


def scsi(data: bytes) -> None:
    """The SCSI target behind VSTOR's EXECUTE_SRB: a CDB, the guest's data-in buffer size and data-out bytes.
    Any CDB gets an answer (GOOD or CHECK CONDITION); HARDWARE ERROR for our own exception is a finding."""
    r = Reader(data)
    cdb = r.take(r.u8() % 17)
    data_in = r.u32() % (1 << 17)
    loop, disk = _scsi_disk()
    result = loop.run_until_complete(disk.execute(cdb, r.rest() or None, data_in, _Log()))
    check(len(result.data) <= data_in, f"{len(result.data)} bytes returned for a {data_in}-byte buffer")


def nvsp_codec(data: bytes) -> None:
    """NVSP messages as the host (requests) and the guest (completions) decode them; round trip; describe."""
    which, payload = _pick(data, 2)
    msg = nvsp.decode(payload, completion=bool(which))
    _describe_all(payload, nvsp.describe)
    encoded = nvsp.encode(msg, max(nvsp.NVSP_MESSAGE_SIZE, len(payload)))
    check(nvsp.decode(encoded, completion=bool(which)) == msg, f"{type(msg).__name__} does not round-trip")


@functools.cache
def _netvsp_ready() -> Any:
    from tests.unit.test_netvsp import Link  # noqa: PLC0415  (heavy: only when the target runs)
    link = Link(queues=2, max_subchannels=1, recv_size=256 * 1024).up()
    return link


def netvsp(data: bytes) -> None:
    """NetVSP (``NvspHost``) after a real Linux-order setup (NVSP, buffers, RNDIS, RSS, sub-channel) fed a
    packet sequence: SEND_RNDIS_PKT with RNDIS messages and PPIs in GPA-direct data, NVSP control, completions."""
    link = copy.deepcopy(_netvsp_ready())
    host = link.host
    for pkt in packets(data):
        if pkt.type == PacketType.DATA_USING_GPA_DIRECT and pkt.data:
            pkt.data = pkt.payload[nvsp.NVSP_MESSAGE_SIZE:] or pkt.data  # the RNDIS bytes ride as the data
            pkt.payload = pkt.payload[:nvsp.NVSP_MESSAGE_SIZE]
            pkt.ranges = (pkt.ranges[0]._replace(byte_count=len(pkt.data) or 1),) if pkt.data else pkt.ranges
        for event in host.receive(pkt):
            link._device(event)
        host.data_to_send()


def rndis_codec(data: bytes) -> None:
    """RNDIS control messages and data packets with their per-packet info (checksum, LSOv2, VLAN, RSC), the
    OID SET bodies the host parses, and what the switch makes of a guest's transmit PPIs."""
    which, body = _pick(data, 6)
    if which == 0:
        msg = rndis.decode(body)
        rndis.describe(body)
        check(rndis.decode(rndis.encode(msg)) == msg, f"RNDIS {type(msg).__name__} does not round-trip")
    elif which == 1:
        for frame_bytes, info in rndis.packet_frames(body):
            hdr = offload.from_tx_info(frame_bytes, info)  # what the VSP hands the switch
            if hdr is not None:
                hdr.pack()
            offload.from_rx_info(frame_bytes, info, 1500)  # what the NetVSC hands its TAP
    elif which == 2:
        rndis.unpack_ppis(body)
    elif which == 3:
        with contextlib.suppress(rndis.OidError):
            rndis.parse_offload_parameters(body)
    elif which == 4:
        with contextlib.suppress(rndis.OidError):
            rndis.parse_rss_parameters(body, 4)
    else:
        with contextlib.suppress(rndis.OidError):
            rndis.parse_config_parameter(body)


def video(data: bytes) -> None:
    """SYNTHVID: every message decoded and re-encoded, then ``SynthvidHost`` fed a packet sequence (the
    device maps the VRAM the guest names)."""
    which, data = _pick(data, 2)
    if which == 0:
        msg = synthvid.decode(data)
        _describe_all(data, synthvid.describe)
        for guest in (False, True):
            check(synthvid.decode(synthvid.encode(msg, guest=guest)) == msg, f"{type(msg).__name__} round trip")
        return
    host = video_host.SynthvidHost()
    for pkt in packets(data):
        for event in host.receive(pkt):
            if isinstance(event, video_host.VramRequested):
                host.map_vram(host.vram_limit)
        host.data_to_send()


def hid(data: bytes) -> None:
    """SYNTHHID (mouse) and the synthetic keyboard: messages, ``describe`` and both VSPs fed packet sequences."""
    which, data = _pick(data, 4)
    if which == 0:
        _msg_type, body = mouse.unpack_message(data)
        _describe_all(data, mouse.describe)
        for cls in (mouse.ProtocolRequest, mouse.ProtocolResponse, mouse.InputDevInfo, mouse.HidDescriptor,
                    mouse.InitialDeviceInfo, mouse.DeviceInfoAck, mouse.MouseReport):
            with contextlib.suppress(DeviceProtocolError):
                cls.unpack(body)
    elif which == 1:
        _msg_type, body = keyboard.unpack_message(data)
        _describe_all(data, keyboard.describe)
        for kcls in (keyboard.ProtocolRequest, keyboard.ProtocolResponse, keyboard.KeyEvent,
                     keyboard.LedIndicators):
            with contextlib.suppress(DeviceProtocolError):
                kcls.unpack(body)
    else:
        dev: Any = input_host.MouseHost() if which == 2 else input_host.KeyboardHost()
        for pkt in packets(data):
            dev.receive(_incoming(pkt))


def heartbeat_ic(data: bytes) -> None:
    """Integration-component framing (pipe header, icmsg_hdr, NEGOTIATE) and the heartbeat host fed a packet
    sequence, its timer run between packets."""
    which, data = _pick(data, 2)
    if which == 0:
        header, body, _ = ic.describe_ic(data)
        _describe_all(data, heartbeat.describe)
        if header.message_type == ic.IcMessageType.NEGOTIATE:
            ic.Negotiate.unpack(body)
        return
    host = heartbeat.HeartbeatHost(interval=1.0)
    host.start(0.0)
    for now, pkt in enumerate(packets(data), 1):
        host.receive(_incoming(pkt), float(now))
        host.handle_timer(float(now))
        host.events()


_VSC_HANDSHAKES = (vstor.VscHandshake, nvsp.VscHandshake, synthvid.VscHandshake, mouse.VscHandshake,
                   keyboard.VscHandshake)


def guest_side(data: bytes) -> None:
    """The other direction: each VSC's handshake (StorVSC, NetVSC, synthvid, mouse, keyboard) fed what a
    broken or hostile parent might send, and the guest's IC answerer (heartbeat), which only ever drops."""
    which, data = _pick(data, len(_VSC_HANDSHAKES) + 1)
    if which == len(_VSC_HANDSHAKES):
        ic_guest = heartbeat.HeartbeatGuest()
        for pkt in packets(data):
            ic_guest.answer(_incoming(pkt))
        return
    hs = _VSC_HANDSHAKES[which]()
    hs.start()
    for pkt in packets(data):
        hs.receive(_incoming(pkt))


_DEVICE = (DeviceProtocolError,)

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("frame", frame, (FrameError,), frame.__doc__ or "", max_len=1 << 17),
    Target("envelope", envelope_bodies, (FrameError, PacketError), envelope_bodies.__doc__ or ""),
    Target("ring_packet", ring_packet, (FrameError, PacketError, RingOverrunError), ring_packet.__doc__ or ""),
    Target("control", control, (MessageError,), control.__doc__ or ""),
    Target("gpadl", gpadl_assembly, (MessageError,), gpadl_assembly.__doc__ or ""),
    Target("host_core", host_core, (), host_core.__doc__ or "", max_len=8192),
    Target("storage", storage, _DEVICE, storage.__doc__ or "", max_len=8192),
    Target("scsi", scsi, (), scsi.__doc__ or ""),
    Target("nvsp", nvsp_codec, _DEVICE, nvsp_codec.__doc__ or ""),
    Target("netvsp", netvsp, _DEVICE, netvsp.__doc__ or "", max_len=8192),
    Target("rndis", rndis_codec, _DEVICE, rndis_codec.__doc__ or ""),
    Target("synthvid", video, _DEVICE, video.__doc__ or "", max_len=8192),
    Target("hid", hid, _DEVICE, hid.__doc__ or ""),
    Target("heartbeat", heartbeat_ic, _DEVICE, heartbeat_ic.__doc__ or ""),
    Target("guest", guest_side, _DEVICE, guest_side.__doc__ or ""),
)}

__all__ = ["TARGETS", "PropertyFailed", "ProtocolError", "Target", "msgpack"]
