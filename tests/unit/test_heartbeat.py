"""The heartbeat integration service: IC framing golden bytes, both sides' state machines, bad input, and the
VSP's serve loop on an in-memory channel (no socket)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parent_partition.config import Config
from parent_partition.devices import vsp_classes
from parent_partition.devices.heartbeat.vsp import HeartbeatSettings, HeartbeatVsp
from parent_partition.settings import ConfigError, parse_section
from parent_partition.vsp import ChannelResources
from vmbus_proto import guids
from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import Channel
from vmbus_proto.channel import ChannelRings
from vmbus_proto.devices.base import HandshakeTrace, Incoming, Outgoing
from vmbus_proto.devices.heartbeat import ic
from vmbus_proto.devices.heartbeat import protocol as hb
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import Packet, PacketType
from vmbus_proto.pipe import pipe_wrap

# Golden packets, laid out by hand from Linux hyperv.h: vmbuspipe_hdr {flags u32 = 1 (DATA), msgsize u32},
# icmsg_hdr {icverframe u16+u16, icmsgtype u16, icvermsg u16+u16, icmsgsize u16, status u32,
# ictransaction_id u8, icflags u8, reserved u8[2]}, then the body.
NEGOTIATE_REQUEST = bytes.fromhex(
    "01000000" "2c000000"  # pipe: DATA, 44 bytes follow
    "00000000" "0000" "00000000" "1800" "00000000" "00" "03" "0000"  # fw 0.0, NEGOTIATE, 0.0, 24 bytes, TRANS|REQ
    "0200" "0200" "00000000"  # icframe_vercnt 2, icmsg_vercnt 2, reserved
    "01000000" "03000000"  # framework 1.0, 3.0
    "01000000" "03000000")  # heartbeat 1.0, 3.0
NEGOTIATE_ANSWER = bytes.fromhex(  # the same buffer, answered in place by vmbus_prep_negotiate_resp
    "01000000" "2c000000"
    "00000000" "0000" "00000000" "1000" "00000000" "00" "05" "0000"  # icmsgsize 0x10, TRANSACTION|RESPONSE
    "0100" "0100" "00000000"  # one of each
    "03000000" "03000000"  # framework 3.0, heartbeat 3.0
    "01000000" "03000000")  # the rest of the request, left as it was
HEARTBEAT_REQUEST = bytes.fromhex(
    "01000000" "24000000"  # pipe: DATA, 36 bytes
    "03000000" "0100" "03000000" "1000" "00000000" "00" "03" "0000"  # fw 3.0, HEARTBEAT, 3.0, 16 bytes, TRANS|REQ
    "0700000000000000" "00000000" "00000000")  # seq_num 7, application_state, reserved
HEARTBEAT_ANSWER = bytes.fromhex(
    "01000000" "24000000"
    "03000000" "0100" "03000000" "1000" "00000000" "00" "05" "0000"  # status S_OK, TRANSACTION|RESPONSE
    "0800000000000000" "00000000" "00000000")  # seq_num + 1


def inband(payload: bytes, trans_id: int = 0) -> Incoming:
    return Incoming(PacketType.DATA_INBAND, trans_id, False, payload)


def to(out: Outgoing) -> Incoming:
    return Incoming(out.type, out.trans_id, out.completion_requested, out.payload)


def negotiated() -> tuple[hb.HeartbeatHost, hb.HeartbeatGuest, Outgoing]:
    """A host and a guest past the NEGOTIATE; returns the first heartbeat (sent at t=0)."""
    host, guest = hb.HeartbeatHost(interval=1.0, lost_after=3), hb.HeartbeatGuest()
    answer = guest.answer(to(host.start(0.0)[0]))
    assert answer is not None
    first = host.receive(to(answer), 0.0)
    assert host.events() == [(hb.HeartbeatEvent.NEGOTIATED, None)] and len(first) == 1
    return host, guest, first[0]


def answer_of(guest: hb.HeartbeatGuest, out: Outgoing) -> Incoming:
    got = guest.answer(to(out))
    assert got is not None, guest.dropped
    return to(got)


def with_header(payload: bytes, **fields: int) -> bytes:
    """``payload`` with some icmsg_hdr fields replaced."""
    header = ic.IcHeader.unpack(payload[8:28])
    values = {f: getattr(header, f) for f in ("framework_version", "message_type", "message_version",
                                              "message_size", "status", "transaction_id", "flags", "reserved")}
    return payload[:8] + ic.IcHeader(**(values | fields)).pack() + payload[28:]


def repiped(payload: bytes) -> bytes:
    """``payload`` with its pipe header's length made right again."""
    return pipe_wrap(payload[8:])


# --- golden bytes ------------------------------------------------------------------------------------------


def test_struct_sizes_are_linuxs() -> None:
    assert ic.IC_HEADER.size == 20 and ic.ICMSG_HDR == 28
    assert len(hb.HeartbeatMessage(1).pack()) == 16
    assert ic.IcMessageType.HEARTBEAT == 1 and ic.IcMessageType.NEGOTIATE == 0  # ICMSGTYPE_HEARTBEAT is 1
    assert (ic.IcFlags.TRANSACTION, ic.IcFlags.REQUEST, ic.IcFlags.RESPONSE) == (1, 2, 4)


def test_host_negotiate_request_golden_bytes() -> None:
    assert hb.HeartbeatHost().start(0.0)[0].payload == NEGOTIATE_REQUEST


def test_guest_answers_negotiate_in_place_like_vmbus_prep_negotiate_resp() -> None:
    vsc = hb.VscHandshake()
    answer = vsc.receive(inband(NEGOTIATE_REQUEST, trans_id=0x1234))
    assert [a.payload for a in answer] == [NEGOTIATE_ANSWER]
    assert (answer[0].type, answer[0].trans_id, answer[0].completion_requested) == (PacketType.DATA_INBAND,
                                                                                    0x1234, False)
    assert vsc.done and vsc.failed is None and vsc.negotiated_version == 0x30000
    assert vsc.guest.framework_version == 0x30000


def test_heartbeat_request_and_answer_golden_bytes() -> None:
    host, guest, first = negotiated()
    request = [first]
    for t in range(1, 8):  # answer heartbeats 0..6: the next request carries seq_num 7
        host.receive(answer_of(guest, request[0]), t - 0.5)
        request = host.handle_timer(float(t))
    assert [r.payload for r in request] == [HEARTBEAT_REQUEST]
    assert (request[0].type, request[0].trans_id, request[0].completion_requested) == (PacketType.DATA_INBAND,
                                                                                       0, False)
    assert answer_of(guest, request[0]).payload == HEARTBEAT_ANSWER
    assert guest.last_seq == 8


def test_describe_reads_like_the_linux_names() -> None:
    assert hb.describe(NEGOTIATE_REQUEST) == ("ICMSGTYPE_NEGOTIATE(0) icflags=TRANSACTION|REQUEST "
                                              "framework=[1.0, 3.0] service=[1.0, 3.0]")
    assert hb.describe(NEGOTIATE_ANSWER) == ("ICMSGTYPE_NEGOTIATE(0) icflags=TRANSACTION|RESPONSE "
                                             "framework=[3.0] service=[3.0]")
    assert hb.describe(HEARTBEAT_ANSWER) == ("ICMSGTYPE_HEARTBEAT(1) icflags=TRANSACTION|RESPONSE "
                                             "framework=3.0 service=3.0 seq_num=8")
    line = HandshakeTrace(hb.describe).line("G>H", PacketType.DATA_INBAND, 0, False, b"\x01\x00")
    assert line.startswith("G>H undecodable (2 bytes")


def test_spec_is_hyper_vs_heartbeat_offer() -> None:
    assert hb.SPEC.class_id == guids.HEARTBEAT == guids.uuid.UUID("57164f39-9115-4e78-ab55-382f3bd5422d")
    assert guids.CLASS_NAMES[guids.HEARTBEAT] == "heartbeat"
    assert str(hb.SPEC.default_instance) == "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0"
    assert hb.SPEC.pipe_mode and hb.SPEC.ring_bytes == 4 * 4096  # VMBUS_RING_SIZE(3 * HV_HYP_PAGE_SIZE)


# --- the guest: hv_util heartbeat_onchannelcallback ---------------------------------------------------------


def test_guest_picks_the_newest_common_versions() -> None:
    old_host = ic.pack_ic(ic.IcHeader(0, ic.IcMessageType.NEGOTIATE, 0, 16, flags=3),
                          ic.Negotiate((0x10000,), (0x10000,)).pack())
    vsc = hb.VscHandshake()
    answer = ic.Negotiate.unpack(ic.unpack_ic(vsc.receive(inband(old_host))[0].payload)[1])
    assert answer == ic.Negotiate((0x10000,), (0x10000,)) and vsc.negotiated_version == 0x10000


@pytest.mark.parametrize(("framework", "service"), [((0x20000,), (0x30000,)), ((0x30000,), (0x40000,))],
                         ids=["framework", "service"])
def test_guest_with_no_common_version_answers_zero_counts_and_fails(framework: tuple[int, ...],
                                                                    service: tuple[int, ...]) -> None:
    request = ic.pack_ic(ic.IcHeader(0, ic.IcMessageType.NEGOTIATE, 0, 16, flags=3),
                         ic.Negotiate(framework, service).pack())
    vsc = hb.VscHandshake()
    answer = vsc.receive(inband(request))
    counts = struct.unpack_from("<HH", answer[0].payload, ic.ICMSG_HDR)
    assert counts == (0, 0) and not vsc.done and vsc.failed is not None and "3.0, 1.0" in vsc.failed
    host = hb.HeartbeatHost()
    host.start(0.0)
    assert host.receive(to(answer[0]), 0.0) == [] and host.refused is not None
    assert host.events() == [(hb.HeartbeatEvent.REFUSED, None)]
    with pytest.raises(DeviceProtocolError, match="refused every version"):
        host.receive(to(answer[0]), 0.0)


def test_guest_increments_seq_num_with_wraparound_and_echoes_the_rest() -> None:
    guest = hb.HeartbeatGuest()
    request = bytearray(HEARTBEAT_REQUEST)
    struct.pack_into("<QI", request, ic.ICMSG_HDR, (1 << 64) - 1, 2)
    got = answer_of(guest, Outgoing(bytes(request)))
    seq, state = struct.unpack_from("<QI", got.payload, ic.ICMSG_HDR)
    assert (seq, state) == (0, 2) and len(got.payload) == len(request)


def test_guest_accepts_a_host_that_sends_only_the_seq_num() -> None:
    short = with_header(HEARTBEAT_REQUEST[:ic.ICMSG_HDR + 8], message_size=8)
    got = answer_of(hb.HeartbeatGuest(), Outgoing(short))
    assert struct.unpack_from("<Q", got.payload, ic.ICMSG_HDR) == (8,)


@pytest.mark.parametrize(("payload", "why"), [
    (HEARTBEAT_REQUEST[:27], "shorter than ICMSG_HDR"),
    (HEARTBEAT_REQUEST[:ic.ICMSG_HDR + 7], "too small for seq_num"),
], ids=["header", "seq_num"])
def test_guest_drops_short_packets_unanswered(payload: bytes, why: str) -> None:
    guest = hb.HeartbeatGuest()
    assert guest.answer(inband(payload)) is None
    assert len(guest.dropped) == 1 and why in guest.dropped[0]


def test_guest_answers_an_unknown_message_type_with_e_fail() -> None:
    guest = hb.HeartbeatGuest()
    got = guest.answer(inband(with_header(HEARTBEAT_REQUEST, message_type=ic.IcMessageType.SHUTDOWN)))
    assert got is not None
    header, _ = ic.unpack_ic(got.payload)
    assert header.status == ic.HV_E_FAIL and header.is_response and "invalid msg type 3" in guest.dropped[0]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=96))
def test_guest_never_raises_on_any_packet(payload: bytes) -> None:
    guest = hb.HeartbeatGuest()
    out = guest.answer(inband(payload))
    assert out is None or len(out.payload) == len(payload)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(0, 200), st.binary(max_size=64))
def test_guest_negotiate_answer_keeps_the_buffer_length(fw_count: int, msg_count: int, tail: bytes) -> None:
    body = struct.pack("<HHI", fw_count, msg_count, 0) + tail
    request = ic.pack_ic(ic.IcHeader(0, ic.IcMessageType.NEGOTIATE, 0, len(body), flags=3), body)
    out = hb.HeartbeatGuest().answer(inband(request))
    assert out is not None and len(out.payload) == len(request)


# --- the host: one heartbeat in flight, lost and resumed -----------------------------------------------------


def test_heartbeats_go_out_every_interval_and_chain_their_seq_nums() -> None:
    host, guest, first = negotiated()
    assert host.get_timer() == 1.0 and host.outstanding == 0
    assert host.receive(answer_of(guest, first), 0.2) == []
    assert host.events() == [(hb.HeartbeatEvent.STARTED, 1)] and host.healthy and host.last_answer == 0.2
    assert host.handle_timer(0.9) == []  # not due yet
    second = host.handle_timer(1.0)
    assert hb.HeartbeatMessage.unpack(ic.unpack_ic(second[0].payload)[1]).seq_num == 1
    host.receive(answer_of(guest, second[0]), 1.1)
    assert host.events() == [(hb.HeartbeatEvent.ANSWERED, 2)] and host.seq == 2 and host.answered == 2


def test_a_silent_guest_is_lost_after_lost_after_intervals_and_resumes_when_it_answers() -> None:
    host, guest, first = negotiated()
    for t in (1.0, 2.0):
        assert host.handle_timer(t) == []  # the request in flight is not repeated
        assert host.events() == []
    assert host.handle_timer(3.0) == [] and host.missed == 3
    assert host.events() == [(hb.HeartbeatEvent.LOST, 0)] and host.lost and not host.healthy
    assert host.handle_timer(4.0) == [] and host.events() == []  # reported once
    late = host.receive(answer_of(guest, first), 4.5)
    assert host.events() == [(hb.HeartbeatEvent.RESUMED, 1)] and host.healthy and host.missed == 0
    assert late == []  # the next one goes at the timer (5.0)
    assert len(host.handle_timer(5.0)) == 1


def test_an_answer_after_its_timer_passed_sends_the_next_heartbeat_at_once() -> None:
    host, guest, first = negotiated()
    nxt = host.receive(answer_of(guest, first), 1.5)  # the timer (1.0) has not been handled yet
    assert len(nxt) == 1 and host.outstanding == 1 and host.get_timer() == 2.5


def test_stale_answers_during_negotiation_are_dropped() -> None:
    host = hb.HeartbeatHost()
    host.start(0.0)
    stale = with_header(HEARTBEAT_ANSWER, framework_version=0, message_version=0)
    assert host.receive(inband(stale), 0.0) == [] and host.negotiation.stale == 1 and not host.running


@pytest.mark.parametrize(("make", "error"), [
    (lambda a: repiped(a.payload[:20]), "shorter than icmsg_hdr"),
    (lambda a: a.payload[:30], "pipe header says 36 bytes"),
    (lambda a: b"\x02" + a.payload[1:], "not DATA"),
    (lambda a: with_header(a.payload, message_size=64), "icmsg_hdr says 64"),
    (lambda a: with_header(a.payload, flags=ic.IcFlags.TRANSACTION | ic.IcFlags.REQUEST), "not a transaction"),
    (lambda a: with_header(a.payload, transaction_id=9), "ictransaction_id=9"),
    (lambda a: with_header(a.payload, status=ic.HV_E_FAIL), "status 0x80004005"),
    (lambda a: with_header(a.payload, message_type=ic.IcMessageType.TIMESYNC), "message type 4"),
    (lambda a: a.payload[:ic.ICMSG_HDR] + struct.pack("<QII", 5, 0, 0), "seq_num 5, expected 1"),
    (lambda a: repiped(with_header(a.payload[:ic.ICMSG_HDR + 4], message_size=4)), "no seq_num"),
], ids=["short", "pipe-length", "pipe-type", "size", "request-flags", "trans-id", "e-fail", "type", "seq", "no-seq"])
def test_malformed_heartbeat_answers_are_device_protocol_errors(make: Callable[[Incoming], bytes],
                                                               error: str) -> None:
    host, guest, first = negotiated()
    with pytest.raises(DeviceProtocolError, match=error):
        host.receive(inband(make(answer_of(guest, first))), 0.1)


def test_an_answer_with_nothing_in_flight_is_a_protocol_error() -> None:
    host, guest, first = negotiated()
    answer = answer_of(guest, first)
    host.receive(answer, 0.1)
    with pytest.raises(DeviceProtocolError, match="no heartbeat in flight"):
        host.receive(answer, 0.2)


def test_a_completion_packet_is_a_protocol_error() -> None:
    host, guest, first = negotiated()
    with pytest.raises(DeviceProtocolError, match="packet type 0xb"):
        host.receive(Incoming(PacketType.COMP, 0, False, answer_of(guest, first).payload), 0.1)


@pytest.mark.parametrize(("answer", "error"), [
    (ic.Negotiate((0x30000, 0x10000), (0x30000,)), "2\\+1 versions"),
    (ic.Negotiate((0x30000,), (0x40000,)), "not offered"),
], ids=["two", "unoffered"])
def test_bad_negotiate_answers_are_protocol_errors(answer: ic.Negotiate, error: str) -> None:
    host = hb.HeartbeatHost()
    host.start(0.0)
    body = answer.pack()
    payload = ic.pack_ic(ic.IcHeader(0, ic.IcMessageType.NEGOTIATE, 0, len(body), flags=5), body)
    with pytest.raises(DeviceProtocolError, match=error):
        host.receive(inband(payload), 0.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=96), st.booleans())
def test_host_raises_only_device_protocol_errors(payload: bytes, running: bool) -> None:
    if running:
        host = negotiated()[0]
    else:
        host = hb.HeartbeatHost()
        host.start(0.0)
    with contextlib.suppress(DeviceProtocolError):
        host.receive(inband(payload), 0.5)


# --- the [heartbeat] section: parsed by the generic loader ---------------------------------------------------


def test_settings_come_from_the_heartbeat_section(tmp_path: Any) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[heartbeat]\ninterval = 0.5\nlost_after = 4\n")
    cfg = Config.load(str(path))
    assert cfg.section("heartbeat") == HeartbeatSettings(interval=0.5, lost_after=4)
    assert cfg.devices["heartbeat"] is True and vsp_classes()["heartbeat"] is HeartbeatVsp
    assert HeartbeatSettings() == HeartbeatSettings(interval=2.0, lost_after=3)


@pytest.mark.parametrize(("raw", "error"), [
    ({"interval": 0}, "interval: must be a positive number of seconds"),
    ({"lost_after": 0}, "lost_after: must be an integer of at least 1"),
    ({"period": 1}, "period: unknown setting"),
])
def test_bad_heartbeat_settings_name_the_key(raw: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_section(HeartbeatSettings, raw, "[heartbeat]", "p.toml")


# --- the VSP's serve loop on an in-memory channel --------------------------------------------------------------


class Recorder:
    """What a ``FramedConnection`` does for a channel, minus the socket."""

    def __init__(self) -> None:
        self.packets: list[Packet] = []
        self.closing = False

    def send_packet(self, relid: int, pkt: Packet) -> None:
        self.packets.append(pkt)

    def send_signal(self, relid: int, sig: object) -> None:
        pass


async def until(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class Guest:
    """The guest end of the in-memory channel: answers what the VSP sent, when told to."""

    def __init__(self, ch: Channel, conn: Recorder) -> None:
        self.ch, self.conn, self.guest, self.seen = ch, conn, hb.HeartbeatGuest(), 0

    def pending(self) -> int:
        return len(self.conn.packets) - self.seen

    def answer_all(self, mangle: Callable[[bytes], bytes] = lambda b: b) -> None:
        for pkt in self.conn.packets[self.seen:]:
            out = self.guest.answer(Incoming(pkt.type, pkt.trans_id, False, pkt.payload))
            assert out is not None
            reply = Packet(PacketType.DATA_INBAND, 0, 0, mangle(out.payload))
            self.ch.rings.arrive(reply.ring_size, 0)
            self.ch._deliver(reply)
        self.seen = len(self.conn.packets)


async def start_vsp(vsp: HeartbeatVsp, failures: list[str]) -> tuple[Channel, Guest]:
    conn = Recorder()
    rings = ChannelRings(3, host=True, guest_to_host_data=3 * 4096, host_to_guest_data=3 * 4096)
    ch = Channel(cast(Any, conn), 3, rings, name="heartbeat")
    res = ChannelResources.standalone("vm1", vsp.offer("vm1"), cast(Any, None), logs.get(), fail=failures.append)
    res.connection_lost = lambda: conn.closing
    await vsp.open(ch, res)
    return ch, Guest(ch, conn)


async def test_vsp_negotiates_then_heartbeats_and_reports_lost_and_resumed() -> None:
    vsp, failures = HeartbeatVsp(interval=0.02, lost_after=2), []
    ch, guest = await start_vsp(vsp, failures)
    state = lambda: vsp.partitions["vm1"]  # noqa: E731
    await until(lambda: guest.pending() == 1, "the NEGOTIATE")
    guest.answer_all()
    for _ in range(3):  # answer a few heartbeats as they come
        await until(lambda: guest.pending() == 1, "a heartbeat")
        guest.answer_all()
    await until(lambda: state().answered == 3, "three answers")
    assert state().healthy and state().version == "3.0" and state().seq == 3 and state().last_answer is not None
    await until(lambda: state().status == "lost", "the silent guest to be reported lost")
    assert guest.pending() == 1, "a second heartbeat went out while one was unanswered"
    guest.answer_all()
    await until(lambda: state().status == "ok", "the guest to be reported resumed")
    assert vsp.states()[0]["healthy"] is True and vsp.states()[0]["seq"] == 4
    await vsp.close(ch)
    assert state().status == "stopped" and not failures


async def test_vsp_reports_a_dropped_connection_as_lost() -> None:
    vsp, failures = HeartbeatVsp(interval=5.0), []
    ch, guest = await start_vsp(vsp, failures)
    await until(lambda: guest.pending() == 1, "the NEGOTIATE")
    guest.answer_all()
    await until(lambda: vsp.partitions["vm1"].healthy is False and guest.pending() == 1, "the first heartbeat")
    guest.answer_all()
    await until(lambda: vsp.partitions["vm1"].healthy, "the first answer")
    cast(Recorder, ch.conn).closing = True  # the connection is gone: the transport closes every channel
    ch.close()
    await vsp.close(ch)
    assert vsp.partitions["vm1"].status == "lost" and not failures


async def test_a_malformed_answer_fails_only_that_partitions_connection() -> None:
    vsp, failures = HeartbeatVsp(interval=0.02), []
    ch, guest = await start_vsp(vsp, failures)
    await until(lambda: guest.pending() == 1, "the NEGOTIATE")
    guest.answer_all()
    await until(lambda: guest.pending() == 1, "the first heartbeat")
    guest.answer_all(lambda b: repiped(with_header(b[:ic.ICMSG_HDR], message_size=8) + struct.pack("<Q", 99)))
    await until(lambda: bool(failures), "the VSP to fail the connection")
    assert "heartbeat answer seq_num 99, expected 1" in failures[0] and vsp.errors == 1
    assert vsp.partitions["vm1"].status == "failed"
    await vsp.close(ch)
