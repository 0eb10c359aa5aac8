"""Bad input over a real socket: each case is logged, costs at most that peer's connection, and the parent
keeps serving everyone else. A bystander child stays connected through the whole module and must never
notice; after every case a fresh client must still negotiate."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from vmbus_proto import messages as m
from vmbus_proto.devices.network import nvsp
from vmbus_proto.envelope import Hello, Signal, encode_packet
from vmbus_proto.framing import ENVELOPE_VERSION, HEADER, FrameKind, encode_frame
from vmbus_proto.gpadl import split
from vmbus_proto.guids import NETWORK, SYNTH_KEYBOARD
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, Packet, PacketType

from .conftest import FAST_LIMITS, Parent, Proc
from .rawclient import RawClient

pytestmark = pytest.mark.integration
KEYBOARD_PAGES = 10  # 36 KiB of ring data per direction


@pytest.fixture
def p(survived_parent: Parent) -> Parent:
    return survived_parent


def _error_logged(p: Parent, mark: int, needle: str) -> None:
    p.wait_for(lambda r: r.get("level") in ("error", "warning") and needle in str(r), timeout=30, start=mark)


def test_garbage_bytes(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.tcp)
    c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
    reason = c.wait_closed()
    assert reason is not None and "FrameError" in reason
    _error_logged(p, mark, "FrameError")


def test_oversized_length_prefix(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.unix)
    c.send_raw(HEADER.pack(0x7FFFFFFF, FrameKind.CONTROL, 0, 0, 0, 0))
    reason = c.wait_closed()
    assert reason is not None and "exceeds" in reason
    _error_logged(p, mark, "exceeds")


def test_unknown_frame_kind(p: Parent) -> None:
    c = RawClient(p.tcp)
    c.send_raw(HEADER.pack(1, 99, 0, 0, 0, 0) + b"\x00")
    reason = c.wait_closed()
    assert reason is not None and "unknown frame kind 99" in reason


def test_truncated_frame_then_hangup(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.tcp)
    c.hello("truncated")
    frame = encode_frame(FrameKind.CONTROL, 0, m.RequestOffers().encode())
    c.send_raw(frame[: len(frame) - 3])
    c.sock.shutdown(socket.SHUT_WR)
    c.wait_closed()
    _error_logged(p, mark, "peer closed mid-frame")


def test_control_before_hello_and_second_hello(p: Parent) -> None:
    c = RawClient(p.tcp)
    c.send(m.InitiateContact(vmbus_version_requested=0x50003))
    reason = c.wait_closed()
    assert reason is not None and "CONTROL frame before HELLO" in reason
    c2 = RawClient(p.tcp)
    c2.hello("twice")
    c2.send_frame(FrameKind.HELLO, 0, b"\x80")
    reason = c2.wait_closed()
    assert reason is not None and "second HELLO" in reason


def test_duplicate_partition_name_is_refused(p: Parent) -> None:
    c = RawClient(p.tcp)
    c.send_frame(FrameKind.HELLO, 0, Hello(ENVELOPE_VERSION, "bystander").encode())
    reason = c.wait_closed()
    assert reason is not None and "already connected" in reason


def test_unknown_and_malformed_control_messages_are_dropped(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.tcp)
    c.hello("dropper")
    c.send_frame(FrameKind.CONTROL, 0, b"\xc1\xc1garbage")  # not msgpack
    c.send_frame(FrameKind.CONTROL, 0, msgpack.packb({"msgtype": 99}))
    c.send_frame(FrameKind.CONTROL, 0, msgpack.packb({"msgtype": 21, "x": 1}))  # TL_CONNECT
    c.send_frame(FrameKind.CONTROL, 0, msgpack.packb({"msgtype": 7}))  # CLOSECHANNEL, no relid
    c.send_frame(FrameKind.CONTROL, 0, msgpack.packb({"msgtype": 7, "child_relid": -1}))
    # ...and the connection still works: this guest negotiates normally afterwards.
    c.send(m.InitiateContact(vmbus_version_requested=0x50003, interrupt_page=2))
    assert c.expect(m.VersionResponse).version_supported == 1
    _error_logged(p, mark, "not msgpack")
    _error_logged(p, mark, "unsupported channel message type 99")
    _error_logged(p, mark, "missing field 'child_relid'")
    c.close()


def test_messages_in_the_wrong_state_and_unknown_relids(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.tcp)
    c.hello("wrongstate")
    c.send(m.RequestOffers())  # before INITIATE_CONTACT
    c.send(m.InitiateContact(vmbus_version_requested=0x50003, interrupt_page=2))
    c.expect(m.VersionResponse)
    c.send(m.RequestOffers())
    c.expect(m.AllOffersDelivered)
    c.send(m.RequestOffers())  # a second time
    c.send(m.CloseChannel(child_relid=999))
    c.send(m.OpenChannel(child_relid=999, openid=999, ringbuffer_gpadlhandle=1, downstream_ringbuffer_pageoffset=2))
    c.send(m.GpadlBody(msgnumber=0, gpadl=0x4242, pfns=(1, 2, 3)))
    c.send(m.CloseChannel(child_relid=1))  # offered but not open
    # A GPADL for an unknown relid gets a failed GPADL_CREATED: the guest waits on it.
    c.send(m.GpadlHeader(child_relid=999, gpadl=5, range_buflen=16, rangecount=1, ranges=((4096, 0),), pfns=(1,)))
    created = c.expect(m.GpadlCreated)
    assert created.creation_status == m.STATUS_UNSUCCESSFUL
    # An OPENCHANNEL with a GPADL that does not exist is answered with a failure, never left hanging.
    c.send(m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=0x77, downstream_ringbuffer_pageoffset=2))
    assert c.expect(m.OpenChannelResult).status == m.STATUS_UNSUCCESSFUL
    for needle in ("REQUESTOFFERS while disconnected", "REQUESTOFFERS was already answered", "unknown relid 999",
                   "GPADL_BODY for unknown GPADL id 0x4242", "CLOSECHANNEL for relid 1 while closed",
                   "does not exist"):
        _error_logged(p, mark, needle)
    c.send(m.Unload())
    c.expect(m.UnloadResponse)
    c.close()


def test_duplicate_in_progress_gpadl_id_fails(p: Parent) -> None:
    c = RawClient(p.tcp)
    c.negotiate("dupgpadl")
    header = m.GpadlHeader(child_relid=1, gpadl=9, range_buflen=8 + 8 * 40, rangecount=1, ranges=((40 * 4096, 0),),
                           pfns=tuple(range(26)))
    c.send(header)
    c.send(header)
    created = c.expect(m.GpadlCreated)
    assert (created.gpadl, created.creation_status) == (9, m.STATUS_UNSUCCESSFUL)
    c.send(m.GpadlBody(msgnumber=0, gpadl=9, pfns=tuple(range(26, 40))))
    assert c.expect(m.GpadlCreated).creation_status == 0
    c.close()


def test_ring_credit_overrun_costs_the_connection(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.tcp)
    offers = c.negotiate("overrun")
    kbd = next(r for r, o in offers.items() if o.if_type == SYNTH_KEYBOARD)
    c.open(kbd, KEYBOARD_PAGES, gpadl=0xE1E10)
    pkt = Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, 1, bytes(4096))
    burst = b"".join(encode_frame(FrameKind.PACKET, kbd, encode_packet(pkt)) for _ in range(64))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        c.send_raw(burst)  # 64 x 4 KiB into a 36 KiB ring, without waiting for any credit
    reason = c.wait_closed()
    assert reason is not None and "overran its ring credit" in reason
    _error_logged(p, mark, "RingOverrunError")


def test_credit_signal_with_wrong_fields_costs_the_connection(p: Parent) -> None:
    c = RawClient(p.tcp)
    offers = c.negotiate("badsignal")
    relid = min(offers)
    c.open(relid, 33, gpadl=0xE1E10)
    c.signal(relid, Signal(ring=0, read_index=8))  # the guest does not read ring 0
    reason = c.wait_closed()
    assert reason is not None and "reader fields for ring 0" in reason


def test_packet_with_malformed_gpa_range(p: Parent) -> None:
    c = RawClient(p.tcp)
    offers = c.negotiate("badrange")
    relid = min(offers)
    c.open(relid, 33, gpadl=0xE1E10)
    body = msgpack.packb([PacketType.DATA_USING_GPA_DIRECT, 1, 5, b"x" * 8, [[4096, 5000, [1, 2]]]])
    c.send_frame(FrameKind.PACKET, relid, body)
    reason = c.wait_closed()
    assert reason is not None and "byte_offset 5000" in reason


def test_silent_client_hits_the_handshake_timeout(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.tcp)
    reason = c.wait_closed(timeout=30)
    assert reason is not None and "handshake timeout: no HELLO" in reason
    c2 = RawClient(p.unix)
    c2.hello("mute")
    reason = c2.wait_closed(timeout=30)
    assert reason is not None and "no accepted INITIATE_CONTACT" in reason
    _error_logged(p, mark, "handshake timeout")


def test_unloaded_guest_may_contact_again_after_the_handshake_timeout(p: Parent) -> None:
    """After UNLOAD the connection stays (docs/protocol.md §6.5): firmware, kexec and kdump unload and
    contact the host again much later. A silent client connected after the UNLOAD hits its own handshake
    timeout, so by then the unloaded one's timer, had it been armed, would have fired too."""
    mark = p.mark()
    c = RawClient(p.tcp)
    c.negotiate("kexec")
    c.send(m.Unload())
    c.expect(m.UnloadResponse)
    silent = RawClient(p.tcp)
    assert "handshake timeout" in str(silent.wait_closed(timeout=30))
    c.send(m.InitiateContact(vmbus_version_requested=0x00050003, interrupt_page=2))
    assert c.expect(m.VersionResponse).version_supported == 1
    assert not [r for r in p.lines[mark:] if r.get("partition") == "kexec" and r.get("level") == "error"]
    c.close()


@pytest.fixture
def unlimited_rate(tmp_path: Path) -> Iterator[Parent]:
    """A parent whose control-message rate limit is out of reach."""
    p = Parent(tmp_path / "parent", FAST_LIMITS + "[limits]\ncontrol_per_second = 100000000\n"
                                                  "control_burst = 100000000\n")
    yield p
    p.stop()


def test_client_that_never_reads_is_dropped_without_unbounded_buffering(unlimited_rate: Parent) -> None:
    """Each bad GPADL_HEADER earns a failed GPADL_CREATED. A client that sends them and never reads fills the
    parent's output past what credit explains; the parent stops reading it, and after the stall timeout
    resets it, having buffered no more than its stated limit. Nothing here depends on who is faster: the
    client sends until the parent resets it (or a fixed cap, which a correct parent never lets it reach).
    The control-message rate limit would end this flood first (tests/integration/test_limits.py), so this
    parent's is out of reach: the output bound must hold on its own."""
    p = unlimited_rate
    mark = p.mark()
    c = RawClient(p.tcp, timeout=60)
    c.negotiate("deaf")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    bad = encode_frame(FrameKind.CONTROL, 0, m.GpadlHeader(child_relid=999, gpadl=1, range_buflen=16, rangecount=1,
                                                            ranges=((4096, 0),), pfns=(1,)).encode())
    chunk = bad * 2000
    cap = 2000 * len(chunk)  # ~140 MB: far more than the parent may answer before it stops reading
    outcome: list[str] = []

    def flood() -> None:
        sent = 0
        try:
            while sent < cap:
                sent += c.sock.send(chunk)
            outcome.append(f"sent all {sent} bytes: the parent kept reading a client that never reads")
        except (BrokenPipeError, ConnectionResetError):
            outcome.append("reset")
        except TimeoutError:
            outcome.append("the parent neither read nor dropped the client for 60 s")

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    stalled = p.wait_for(lambda r: "has not read" in str(r), timeout=120, start=mark)
    sender.join(60)
    assert outcome == ["reset"], outcome or "the client is still sending"
    waiting, limit = map(int, re.search(r"with (\d+) bytes waiting \(limit (\d+)\)", stalled["error"]).groups())
    # Past the limit only the replies to the rest of one read chunk (256 KiB of 70-byte requests) may queue.
    assert limit <= waiting <= limit + 256 * 1024, f"{waiting} bytes buffered for a deaf client (limit {limit})"
    c.close()


def test_invalid_packet_for_closed_channel_is_still_rejected(p: Parent) -> None:
    c = RawClient(p.tcp)
    c.negotiate("nochannel")
    c.send_frame(FrameKind.PACKET, 3, b"\x93\x01\x02")  # not a valid packet body, for a channel not open
    reason = c.wait_closed()
    assert reason is not None and "PACKET body" in reason


def test_data_len_larger_than_frame(p: Parent) -> None:
    c = RawClient(p.tcp)
    c.send_raw(struct.pack("<IBBHII", 4, FrameKind.PACKET, 0, 0, 1, 8) + b"abcd")
    reason = c.wait_closed()
    assert reason is not None and "bad frame header" in reason


def test_bystander_still_connected(p: Parent, bystander: Proc) -> None:
    assert bystander.proc.poll() is None
    assert not bystander.events("session with the parent ended")


# ---- the network device -----------------------------------------------------------------------------------

NETWORK_PAGES = 16


def _network_after_init(c: RawClient, name: str) -> int:
    """A raw guest that opened its network channel and finished NVSP INIT (6.1)."""
    offers = c.negotiate(name)
    net = next(r for r, o in offers.items() if o.if_type == NETWORK)
    c.open(net, NETWORK_PAGES, gpadl=0xE1E20)
    init = nvsp.Init(nvsp.Version.V61, nvsp.Version.V61)
    c.send_packet(net, Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, 1, nvsp.encode(init)))
    done = nvsp.decode(c.recv_packet(net).payload, completion=True)
    assert isinstance(done, nvsp.InitComplete) and done.status == nvsp.Status.SUCCESS, done
    return net


def _nvsp(c: RawClient, relid: int, message: nvsp.NvspMessage, trans_id: int, data: bytes = b"") -> None:
    c.send_packet(relid, Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, trans_id, nvsp.encode(message),
                                data=data))


def test_rndis_before_the_receive_buffer_costs_the_connection(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.tcp)
    net = _network_after_init(c, "rndis-early")
    _nvsp(c, net, nvsp.SendRndisPacket(nvsp.CHANNEL_CONTROL, 0, 32), 2, data=bytes(32))
    reason = c.wait_closed()
    assert reason is not None and "RNDIS packet before" in reason, reason
    _error_logged(p, mark, "RNDIS packet before")


def test_a_receive_buffer_gpadl_that_does_not_exist_is_refused_not_fatal(p: Parent) -> None:
    c = RawClient(p.tcp)
    net = _network_after_init(c, "no-such-gpadl")
    _nvsp(c, net, nvsp.SendNdisConfig(1514, 0, 0), 2)
    _nvsp(c, net, nvsp.SendNdisVersion(6, 30), 3)
    _nvsp(c, net, nvsp.SendReceiveBuffer(0xBAD, nvsp.RECEIVE_BUFFER_ID), 4)
    answers = [c.recv_packet(net) for _ in range(3)]
    last = nvsp.decode(answers[-1].payload, completion=True)
    assert answers[-1].trans_id == 4 and isinstance(last, nvsp.SendReceiveBufferComplete), last
    assert last.status == nvsp.Status.FAIL
    c.close()


def test_a_send_buffer_section_out_of_range_costs_the_connection(p: Parent) -> None:
    mark = p.mark()
    c = RawClient(p.tcp)
    net = _network_after_init(c, "bad-section")
    # A receive buffer and a 1-section send buffer the host accepts, then a section index past it.
    recv_pfns = 64
    for gid, first, pages in ((0xE1E21, 0x8000, recv_pfns), (0xE1E22, 0x9000, 2)):
        header, bodies = split(net, gid, list(range(first, first + pages)))
        for msg in [header, *bodies]:
            c.send(msg)
        assert c.expect(m.GpadlCreated).creation_status == 0
    _nvsp(c, net, nvsp.SendNdisConfig(1514, 0, 0), 2)
    _nvsp(c, net, nvsp.SendNdisVersion(6, 30), 3)
    _nvsp(c, net, nvsp.SendReceiveBuffer(0xE1E21, nvsp.RECEIVE_BUFFER_ID), 4)
    _nvsp(c, net, nvsp.SendSendBuffer(0xE1E22, nvsp.SEND_BUFFER_ID), 5)
    _nvsp(c, net, nvsp.SendRndisPacket(nvsp.CHANNEL_CONTROL, 7, 32), 6, data=bytes(32))
    reason = c.wait_closed()
    assert reason is not None and "section 7" in reason, reason
    _error_logged(p, mark, "section 7")


def test_a_flood_of_junk_frames_is_logged_as_a_burst_and_a_count(p: Parent) -> None:
    """60,000 SIGNAL frames for a relid never opened: each is a warning, but the parent writes a burst of them
    and then counts the rest (``logs.PeerLimiter``), so one peer cannot fill the parent's disk with its log."""
    mark = p.mark()
    c = RawClient(p.tcp)
    c.negotiate("flooder")
    frame = encode_frame(FrameKind.SIGNAL, 99, Signal(0).encode())
    c.send_raw(frame * 60_000)
    c.close()
    end = p.wait_for(lambda r: r.get("partition") == "flooder" and r.get("event") == "partition disconnected",
                     timeout=60, start=mark)
    warned = [r for r in p.lines[mark:] if r.get("partition") == "flooder" and r.get("level") == "warning"]
    held = sum(int(r.get("suppressed", 0)) for r in [*warned, end])
    assert 0 < len(warned) < 1000 and len(warned) + held == 60_000, \
        f"{len(warned)} warnings written and {held} counted for 60,000 junk frames"
