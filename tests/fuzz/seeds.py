"""Seed inputs for every fuzz target, from real traffic: the messages a Linux-order guest sends (encoded by the
project's own encoders), each device's VSC handshake run against its VSP in memory, and NetVSC's whole
setup against NetVSP. ``write_corpus()`` stores them under tests/fuzz/corpus/<target>/ (one small file each,
named by content), where the atheris runner and the Hypothesis suite start from."""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vmbus_proto import messages as m
from vmbus_proto.devices.base import Handshake, Incoming, Outgoing
from vmbus_proto.devices.heartbeat import ic
from vmbus_proto.devices.heartbeat import protocol as heartbeat
from vmbus_proto.devices.input import keyboard, mouse
from vmbus_proto.devices.network import nvsp, rndis
from vmbus_proto.devices.storage import scsi, vstor
from vmbus_proto.devices.video import synthvid as sv
from vmbus_proto.envelope import Hello, Signal, encode_close, encode_packet
from vmbus_proto.framing import ENVELOPE_VERSION, FrameKind, encode_frame
from vmbus_proto.gpadl import split
from vmbus_proto.guids import SCSI
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType

from .reader import Seq, encode_packets

CORPUS = Path(__file__).parent / "corpus"
RELID = 1
GPADL = 0xE1E10


def _session_messages() -> list[m.Message]:
    """A guest's control messages in Linux's order: contact, offers, a ring GPADL, open, close, teardown,
    unload, and the other requests a guest may send."""
    header, bodies = split(RELID, GPADL, list(range(0x1000, 0x1000 + 64)))
    return [m.InitiateContact(vmbus_version_requested=0x50003, interrupt_page=2), m.RequestOffers(), header,
            *bodies,
            m.OpenChannel(child_relid=RELID, openid=RELID, ringbuffer_gpadlhandle=GPADL,
                          downstream_ringbuffer_pageoffset=32),
            m.ModifyChannel(child_relid=RELID, target_vp=1), m.CloseChannel(child_relid=RELID),
            m.GpadlTeardown(child_relid=RELID, gpadl=GPADL), m.RelidReleased(child_relid=RELID), m.Unload()]


def _host_messages() -> list[m.Message]:
    return [m.VersionResponse(version_supported=1, msg_conn_id=1),
            m.OfferChannel(if_type=SCSI, if_instance=uuid.UUID(int=7), child_relid=RELID, connection_id=0x2001),
            m.AllOffersDelivered(), m.GpadlCreated(child_relid=RELID, gpadl=GPADL, creation_status=0),
            m.OpenChannelResult(child_relid=RELID, openid=RELID, status=0), m.GpadlTorndown(gpadl=GPADL),
            m.RescindChannelOffer(child_relid=RELID), m.UnloadResponse(),
            m.ModifyChannelResponse(child_relid=RELID, status=0)]


def _packets() -> list[Packet]:
    return [Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, 1, vstor.pack_request(1)),
            Packet(PacketType.COMP, 0, 1, b"\0" * 16),
            Packet(PacketType.DATA_USING_GPA_DIRECT, FLAG_COMPLETION_REQUESTED, 2, b"\0" * 64,
                   (GpaRange(8192, 0, (0x10, 0x11)),)),
            Packet(PacketType.DATA_USING_GPA_DIRECT, FLAG_COMPLETION_REQUESTED, 3, b"", (
                GpaRange(100, 4000, (0x20, 0x21)), GpaRange(4096, 0, (0x30,)))),
            Packet(PacketType.DATA_USING_XFER_PAGES, 0, 4, b"\1\0\0\0", xfer_pageset_id=0xCAFE,
                   xfer_ranges=((1514, 0), (60, 1806)))]


def _session_stream() -> bytes:
    """One connection's bytes as a guest writes them."""
    out = [encode_frame(FrameKind.HELLO, 0, Hello(ENVELOPE_VERSION, "seed-vm").encode())]
    out += [encode_frame(FrameKind.CONTROL, 0, msg.encode()) for msg in _session_messages()[:-4]]
    for pkt in _packets():
        out.append(encode_frame(FrameKind.PACKET, RELID, encode_packet(pkt), b"\xab" * 32) + b"\xab" * 32)
    out.append(encode_frame(FrameKind.SIGNAL, RELID, Signal(1, read_index=4096, interrupt_mask=0).encode()))
    out.append(encode_frame(FrameKind.CLOSE, 0, encode_close("bye")))
    return b"".join(out)


def frame() -> Iterator[bytes]:
    stream = _session_stream()
    for mode, step in ((0, 255), (4, 6), (1, 16), (5, 1), (2, 200), (3, 63)):
        yield bytes([mode, step]) + stream
    big = encode_frame(FrameKind.PACKET, RELID, encode_packet(_packets()[2]), b"\0" * 70_000) + b"\0" * 70_000
    yield bytes([6, 255]) + big


def envelope() -> Iterator[bytes]:
    yield b"\0" + Hello(ENVELOPE_VERSION, "seed-vm").encode()
    yield b"\0" + Hello(ENVELOPE_VERSION, "vm-2", "challenge", 16 << 20).encode()
    yield b"\1" + encode_close("name taken", "name-taken")
    yield b"\1" + encode_close("bye")
    yield b"\2" + Signal(0, read_index=8, interrupt_mask=1, data_read_index=64).encode()
    yield b"\2" + Signal(1, write_index=16, pending_send_sz=256, data_pending_sz=8).encode()
    for pkt in _packets():
        yield b"\3" + encode_packet(pkt)


def ring_packet() -> Iterator[bytes]:
    for i, pkt in enumerate(_packets()):
        yield bytes([i * 3]) + struct.pack("<I", 8 * i) + encode_packet(pkt)


def control() -> Iterator[bytes]:
    for msg in _session_messages() + _host_messages():
        yield msg.encode()


def _gpadl_input(ranges: Sequence[tuple[int, int]], pfns: Sequence[int], buflen: int) -> bytes:
    """The gpadl target's field format (see ``targets.gpadl_assembly``)."""
    out = bytearray([len(ranges)])
    for count, offset in ranges:
        out += b"\1" + struct.pack("<IH", count, offset)
    out += bytes([RELID]) + struct.pack("<IHB", GPADL, buflen, len(ranges))
    head, rest = pfns[:27 - len(ranges)], list(pfns[27 - len(ranges):])
    out += bytes([len(head)]) + b"".join(b"\1" + struct.pack("<Q", p) for p in head)
    while rest:
        chunk, rest = rest[:28], rest[28:]
        out += bytes([len(chunk)]) + b"".join(b"\1" + struct.pack("<Q", p) for p in chunk)
    return bytes(out)


def gpadl() -> Iterator[bytes]:
    for pages in (1, 26, 27, 54, 60):
        header, _ = split(RELID, GPADL, list(range(0x1000, 0x1000 + pages)))
        yield _gpadl_input(header.ranges, range(0x1000, 0x1000 + pages), header.range_buflen)
    yield _gpadl_input([(100, 4000), (4096, 0)], [0x20, 0x21, 0x30], 8 * 2 + 8 * 3)


def host_core() -> Iterator[bytes]:
    bodies = [msg.encode() for msg in _session_messages()]
    yield b"".join(bytes([len(b)]) + b for b in bodies)
    yield b"".join(bytes([len(b)]) + b for b in bodies[:2] + bodies[-1:])  # contact, offers, unload


def _pump_both(vsc: Handshake, vsp: Handshake) -> tuple[list[Outgoing], list[Outgoing]]:
    """Run a VSC's handshake against a VSP in memory: the guest's packets and the host's, each in order."""
    sent: list[Outgoing] = []
    replies: list[Outgoing] = []
    queue = vsc.start()
    for _ in range(64):
        if not queue:
            break
        out = queue.pop(0)
        sent.append(out)
        for reply in vsp.receive(Incoming(out.type, out.trans_id, out.completion_requested, out.payload)):
            replies.append(reply)
            queue += vsc.receive(Incoming(reply.type, reply.trans_id, reply.completion_requested, reply.payload))
    return sent, replies


def _pump(vsc: Handshake, vsp: Handshake) -> list[Outgoing]:
    return _pump_both(vsc, vsp)[0]


def _seq(outs: Sequence[Outgoing]) -> list[Seq]:
    return [Seq(o.type, o.payload, o.completion_requested, o.trans_id) for o in outs]



def _srb(cdb: bytes, length: int, write: bool) -> Seq:
    req = vstor.VmscsiRequest(cdb_length=len(cdb), data=cdb.ljust(20, b"\0"), data_transfer_length=length,
                              data_in=vstor.DataDirection.WRITE if write else vstor.DataDirection.READ)
    payload = vstor.pack_request(vstor.Operation.EXECUTE_SRB, req.pack())
    if not length:
        return Seq(PacketType.DATA_INBAND, payload, True, 9)
    return Seq(PacketType.DATA_USING_GPA_DIRECT, payload, True, 9, range_len=length, carries_data=write)


def storage() -> Iterator[bytes]:
    hs = _seq(_pump(vstor.VscHandshake(), vstor.VspHandshake(max_channel_cnt=4)))
    io = [_srb(scsi.read_write_cdb(False, 0, 8), 4096, False), _srb(scsi.read_write_cdb(True, 8, 1), 512, True),
          _srb(scsi.inquiry_cdb(96), 96, False), _srb(scsi.test_unit_ready_cdb(), 0, False),
          Seq(PacketType.DATA_INBAND, vstor.pack_request(vstor.Operation.CREATE_SUB_CHANNELS,
                                                         vstor.pack_create_sub_channels(2)), True, 3)]
    for which in (0, 1):
        yield bytes([which]) + encode_packets(hs + io)
    yield b"\0" + encode_packets(hs[:2])


def scsi_cdbs() -> Iterator[bytes]:
    cdbs = [scsi.test_unit_ready_cdb(), scsi.inquiry_cdb(96), scsi.inquiry_cdb(255, 0x83), scsi.inquiry_cdb(64, 0xB0),
            scsi.report_luns_cdb(64), scsi.read_capacity16_cdb(32), scsi.get_lba_status_cdb(0, 24),
            scsi.mode_sense6_cdb(0x3F, 192), scsi.read_write_cdb(False, 0, 8), scsi.read_write_cdb(True, 2, 1, True),
            scsi.synchronize_cache10_cdb(), scsi.write_same16_cdb(0, 8, unmap=True), scsi.unmap_cdb(24)]
    for cdb in cdbs:
        out = bytes([len(cdb)]) + cdb + struct.pack("<I", 4096)
        if cdb[0] in (0x2A, 0x8A):
            out += bytes(512)
        elif cdb[0] == 0x42:
            out += scsi.unmap_parameters(0, 8)
        yield out


def _netvsp_traffic() -> tuple[list[Packet], list[Packet], list[bytes]]:
    """NetVSC's whole Linux-order setup against NetVSP: (guest packets, host packets, RNDIS messages sent)."""
    from tests.unit.test_netvsp import Link  # noqa: PLC0415  (heavy: only when the target runs)
    link = Link(queues=2, max_subchannels=1, recv_size=256 * 1024).up()
    link.guest.send_frame(b"\xff" * 6 + link.guest.mac + b"\x08\x00" + bytes(46))
    link.guest.send_frame(bytes(range(64)) * 8, rndis.PacketInfo(vlan=rndis.Vlan(vlan_id=5)))
    link.pump()
    msgs = []
    for p in link.to_host:
        fields = nvsp.unpack_rndis_packet(p.payload) if p.type != PacketType.COMP else None
        if fields is None:
            continue
        _, index, size = fields
        msgs.append(bytes(p.data) if index == nvsp.NO_SECTION else
                    link.send.read(index * nvsp.SEND_SECTION_SIZE, size))
    return link.to_host, link.to_guest, msgs


def nvsp_codec() -> Iterator[bytes]:
    to_host, to_guest, _ = _netvsp_traffic()
    for p in to_host + to_guest:
        yield (b"\1" if p.type == PacketType.COMP else b"\0") + p.payload


def netvsp() -> Iterator[bytes]:
    _, _, msgs = _netvsp_traffic()
    no_section = nvsp.pack_rndis_packet(1, nvsp.NO_SECTION, 0)
    seqs = [Seq(PacketType.DATA_USING_GPA_DIRECT, no_section + msg, True, i, len(msg), True)
            for i, msg in enumerate(msgs)]
    yield encode_packets(seqs)
    for s in seqs:
        yield encode_packets([s])


def rndis_codec() -> Iterator[bytes]:
    _, _, msgs = _netvsp_traffic()
    for msg in msgs:
        yield bytes([0 if rndis.message_type(msg) != rndis.MessageType.PACKET else 1]) + msg
    tcp = bytes.fromhex("ffffffffffff00155d0000010800" "450000280001000040060000c0a80001c0a80002"
                        "0050005000000001000000005010ffff00000000")
    for info in (rndis.PacketInfo(checksum=rndis.TxChecksum(is_ipv4=True, tcp=True, tcp_header_offset=34).value()),
                 rndis.PacketInfo(lso=rndis.LsoV2(mss=1460, tcp_header_offset=34, ipv6=False)),
                 rndis.PacketInfo(vlan=rndis.Vlan(vlan_id=5))):
        chain = rndis.info_chain(info)
        yield b"\1" + rndis.pack_packet(tcp, chain)
        yield b"\2" + chain
    yield b"\3" + struct.pack("<BBH5B7BI", 0x80, 1, 20, 3, 3, 3, 3, 3, 1, 0, 2, 2, 0, 0, 0, 0)
    for msg in msgs:
        decoded = rndis.decode(msg)
        if isinstance(decoded, rndis.Set):
            yield bytes([4 if decoded.oid == rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS else 3]) + decoded.info
    yield b"\5" + rndis.pack_config_parameter("NetworkAddress", "00155d000002")


def _guest_video() -> list[Seq]:
    hs = _seq(_pump(sv.VscHandshake(), sv.VspHandshake()))
    msgs: list[sv.Message] = [
        sv.VramLocation(user_ctx=7, is_vram_gpa_specified=1, vram_gpa=0x8000_0000),
        sv.SituationUpdate(user_ctx=0, active=1, width=1024, height=768, pitch=4096),
        sv.ResolutionRequest(maximum_resolution_count=8), sv.PointerPosition(is_visible=1, x=5, y=6),
        sv.Dirt(rects=(sv.Rect(0, 0, 64, 64),)), sv.BiosInfoRequest(), sv.CapabilityRequest()]
    return hs + [Seq(PacketType.DATA_INBAND, sv.encode(msg, guest=True)) for msg in msgs]


def video() -> Iterator[bytes]:
    seqs = _guest_video()
    for s in seqs:
        yield b"\0" + s.payload
    yield b"\1" + encode_packets(seqs)


def hid() -> Iterator[bytes]:
    ms = _pump(mouse.VscHandshake(), mouse.VspHandshake())
    kb = _pump(keyboard.VscHandshake(), keyboard.VspHandshake())
    for o in ms:
        yield b"\0" + o.payload
    for o in kb:
        yield b"\1" + o.payload
    led = keyboard.pack_message(keyboard.MessageType.LED_INDICATORS, keyboard.LedIndicators(0x4).pack())
    yield b"\2" + encode_packets(_seq(ms))
    yield b"\3" + encode_packets([*_seq(kb), Seq(PacketType.DATA_INBAND, led)])


def heartbeat_ic() -> Iterator[bytes]:
    host = heartbeat.HeartbeatHost(interval=1.0)
    guest = heartbeat.HeartbeatGuest()
    answers: list[Seq] = []
    queue = host.start(0.0)
    for now in range(1, 6):
        for out in queue:
            yield b"\0" + out.payload
            reply = guest.answer(Incoming(out.type, out.trans_id, out.completion_requested, out.payload))
            if reply is not None:
                answers.append(Seq(reply.type, reply.payload, False, reply.trans_id))
                yield b"\0" + reply.payload
                queue = host.receive(Incoming(reply.type, reply.trans_id, False, reply.payload), float(now))
                break
        else:
            queue = host.handle_timer(float(now))
    yield b"\1" + encode_packets(answers)
    yield b"\0" + ic.pack_ic(ic.IcHeader(ic.version(3, 0), ic.IcMessageType.NEGOTIATE, ic.version(3, 0), 0, 0, 0,
                                          0, 0), b"")


def guest_side() -> Iterator[bytes]:
    """What each VSC hears from its VSP during the handshake, and the host's heartbeat requests."""
    for which, (vsc, vsp) in enumerate(((vstor.VscHandshake(), vstor.VspHandshake(max_channel_cnt=4)),
                                        (nvsp.VscHandshake(), nvsp.VspHandshake()),
                                        (sv.VscHandshake(), sv.VspHandshake()),
                                        (mouse.VscHandshake(), mouse.VspHandshake()),
                                        (keyboard.VscHandshake(), keyboard.VspHandshake()))):
        yield bytes([which]) + encode_packets(_seq(_pump_both(vsc, vsp)[1]))
    host = heartbeat.HeartbeatHost(interval=1.0)
    yield b"\5" + encode_packets(_seq(host.start(0.0)))


SEEDS: dict[str, Callable[[], Iterator[bytes]]] = {
    "frame": frame, "envelope": envelope, "ring_packet": ring_packet, "control": control, "gpadl": gpadl,
    "host_core": host_core, "storage": storage, "scsi": scsi_cdbs, "nvsp": nvsp_codec, "netvsp": netvsp,
    "rndis": rndis_codec, "synthvid": video, "hid": hid, "heartbeat": heartbeat_ic, "guest": guest_side,
}


def corpus_dir(target: str) -> Path:
    return CORPUS / target


def corpus(target: str) -> list[bytes]:
    """The stored corpus of ``target`` (seeds, inputs atheris found new coverage with, former crashes)."""
    d = corpus_dir(target)
    return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


def save(target: str, data: bytes, prefix: str = "seed") -> Path:
    d = corpus_dir(target)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{prefix}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def write_corpus() -> dict[str, int]:
    """Write every target's seeds; returns how many each has."""
    return {name: sum(1 for data in make() if save(name, data)) for name, make in SEEDS.items()}
