"""Tier 1: the codecs. Channel messages (msgpack on the stream, packed Hyper-V layout for sizes and golden
bytes), the frame decoder, and the PACKET / SIGNAL / HELLO bodies of the envelope.

Struct sizes are those of Linux include/linux/hyperv.h and OpenVMM vmbus_core protocol.rs
(reference/vmbus-core.md §2): OFFERCHANNEL 196, OPENCHANNEL 148, INITIATE_CONTACT 40, VERSION_RESPONSE 16
(20 as VersionResponse2, when 6.0+ is accepted), GPADL_BODY of 28 PFNs 240 = a full SynIC message payload.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import uuid
from dataclasses import fields
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus_proto import messages as m
from vmbus_proto.envelope import (
    DEFAULT_DATA_WINDOW,
    MAX_DATA_WINDOW,
    MIN_DATA_WINDOW,
    Hello,
    Signal,
    decode_close,
    decode_close_code,
    decode_packet,
    encode_close,
    encode_packet,
)
from vmbus_proto.errors import FrameError, MessageError, PacketError, ProtocolError
from vmbus_proto.framing import HEADER, HEADER_SIZE, FrameDecoder, FrameKind, encode_frame, frame_parts
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType
from vmbus_proto.versions import Version

_packb = msgpack.Packer(use_bin_type=True).pack

ALL_CLASSES: list[type[m.Message]] = sorted(m._REGISTRY.values(), key=lambda c: int(c.MSGTYPE))

# ---- strategies ----------------------------------------------------------------------------------------

_INT_MAX = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF, "Q": 0xFFFFFFFFFFFFFFFF}


def _field_strategy(kind: str) -> st.SearchStrategy[Any]:
    if kind in _INT_MAX:
        return st.integers(0, _INT_MAX[kind])
    if kind == "i":
        return st.integers(-(2**31), 2**31 - 1)
    if kind == "guid":
        return st.uuids()
    if kind.startswith("bytes"):
        return st.binary(max_size=int(kind[5:]))
    if kind == "pfns":
        return st.lists(st.integers(0, 2**64 - 1), max_size=m.GPADL_BODY_MAX_PFNS).map(tuple)
    if kind == "ranges":
        return st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                        max_size=3).map(tuple)
    raise AssertionError(kind)


def message_strategy(cls: type[m.Message]) -> st.SearchStrategy[m.Message]:
    return st.builds(cls, **{name: _field_strategy(kind) for name, kind in cls.LAYOUT})


any_message = st.sampled_from(ALL_CLASSES).flatmap(message_strategy)


# ---- messages: round trips -----------------------------------------------------------------------------

def test_registry_covers_every_direction_set() -> None:
    numbers = {int(c.MSGTYPE) for c in ALL_CLASSES}
    assert {int(t) for t in m.GUEST_TO_HOST | m.HOST_TO_GUEST} == numbers
    assert not m.GUEST_TO_HOST & m.HOST_TO_GUEST
    # Real CHANNELMSG numbers (Linux enum vmbus_channel_message_type).
    assert [int(t) for t in (m.MsgType.OFFERCHANNEL, m.MsgType.OPENCHANNEL, m.MsgType.GPADL_HEADER,
                             m.MsgType.GPADL_TORNDOWN, m.MsgType.INITIATE_CONTACT, m.MsgType.UNLOAD_RESPONSE,
                             m.MsgType.MODIFYCHANNEL, m.MsgType.MODIFYCHANNEL_RESPONSE)] == [1, 5, 8, 12, 14,
                                                                                              17, 22, 24]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.MSGTYPE.name)
def test_layout_names_every_dataclass_field(cls: type[m.Message]) -> None:
    assert {n for n, _ in cls.LAYOUT} == {f.name for f in fields(cls)}


@given(any_message)
@settings(max_examples=400, deadline=None)
def test_every_message_round_trips(msg: m.Message) -> None:
    wire = m.decode(msg.encode())
    assert type(wire) is type(msg)
    assert wire == msg
    assert m.from_dict(msg.to_dict()) == msg
    assert wire.describe().startswith(f"CHANNELMSG_{msg.MSGTYPE.name}({int(msg.MSGTYPE)})")


@given(any_message)
@settings(max_examples=200, deadline=None)
def test_decode_accepts_a_memoryview(msg: m.Message) -> None:
    assert m.decode(memoryview(msg.encode())) == msg


# ---- messages: binary layout ---------------------------------------------------------------------------

_G = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
FIXED_SIZES: list[tuple[m.Message, int]] = [
    (m.OfferChannel(if_type=_G, if_instance=_G, child_relid=1, connection_id=1), 196),
    (m.RescindChannelOffer(child_relid=1), 12),
    (m.RequestOffers(), 8),
    (m.AllOffersDelivered(), 8),
    (m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=1, downstream_ringbuffer_pageoffset=1), 148),
    (m.OpenChannelResult(child_relid=1, openid=1, status=0), 20),
    (m.CloseChannel(child_relid=1), 12),
    (m.GpadlCreated(child_relid=1, gpadl=1, creation_status=0), 20),
    (m.GpadlTeardown(child_relid=1, gpadl=1), 16),
    (m.GpadlTorndown(gpadl=1), 12),
    (m.RelidReleased(child_relid=1), 12),
    (m.InitiateContact(vmbus_version_requested=0x50003), 40),
    (m.VersionResponse(version_supported=1, supported_features=0x3), 16),  # no version given: the base struct
    (m.Unload(), 8),
    (m.UnloadResponse(), 8),
    (m.ModifyChannel(child_relid=1, target_vp=1), 16),
    (m.ModifyChannelResponse(child_relid=1, status=-1), 16),
]


def test_fixed_size_table_covers_every_fixed_message() -> None:
    variable = {m.MsgType.GPADL_HEADER, m.MsgType.GPADL_BODY}
    assert {x.MSGTYPE for x, _ in FIXED_SIZES} == {c.MSGTYPE for c in ALL_CLASSES} - variable


@pytest.mark.parametrize(("msg", "size"), FIXED_SIZES, ids=lambda x: getattr(x, "MSGTYPE", m.MsgType(0)).name)
def test_binary_sizes(msg: m.Message, size: int) -> None:
    raw = msg.to_binary()
    assert len(raw) == size <= m.MAX_MESSAGE_SIZE
    assert struct.unpack_from("<II", raw) == (int(msg.MSGTYPE), 0)  # vmbus_channel_message_header


@given(any_message)
@settings(max_examples=100, deadline=None)
def test_binary_size_does_not_depend_on_values(msg: m.Message) -> None:
    if isinstance(msg, m.GpadlHeader | m.GpadlBody):
        return
    expected = dict((type(x), n) for x, n in FIXED_SIZES)[type(msg)]
    assert len(msg.to_binary()) == expected


@pytest.mark.parametrize("n", [0, 1, 26, 28])
def test_gpadl_body_size(n: int) -> None:
    assert len(m.GpadlBody(msgnumber=0, gpadl=1, pfns=tuple(range(n))).to_binary()) == 16 + 8 * n
    assert n != 28 or len(m.GpadlBody(msgnumber=0, gpadl=1, pfns=tuple(range(n))).to_binary()) == 240


@pytest.mark.parametrize("n", [1, 25, 26])
def test_gpadl_header_size(n: int) -> None:
    hdr = m.GpadlHeader(child_relid=1, gpadl=2, range_buflen=8 + 8 * n, rangecount=1, ranges=((n * 4096, 0),),
                        pfns=tuple(range(n)))
    assert len(hdr.to_binary()) == 20 + 8 + 8 * n


def test_golden_closechannel() -> None:
    # OpenVMM vmbus_core unit test: CLOSE_CHANNEL for channel 5.
    assert m.CloseChannel(child_relid=5).to_binary() == bytes.fromhex("07000000 00000000 05000000")


def test_golden_gpadl_created_and_modify_response() -> None:
    assert m.GpadlCreated(child_relid=1, gpadl=0xE1E10, creation_status=m.STATUS_UNSUCCESSFUL).to_binary() == \
        bytes.fromhex("0a000000 00000000 01000000 101e0e00 ffff0080")
    # status is an i32: STATUS_UNSUCCESSFUL as a signed value packs to the same four bytes.
    assert m.ModifyChannelResponse(child_relid=3, status=m.STATUS_UNSUCCESSFUL - (1 << 32)).to_binary() == \
        bytes.fromhex("18000000 00000000 03000000 ffff0080")


def test_offerchannel_field_offsets() -> None:
    inst = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    raw = m.OfferChannel(if_type=_G, if_instance=inst, child_relid=0x7F1, connection_id=0x27F1, chn_flags=0x10,
                         mmio_megabytes=8, user_def=b"\x04", sub_channel_index=3, monitorid=0xFF,
                         is_dedicated_interrupt=1).to_binary()
    assert raw[8:24] == _G.bytes_le  # Microsoft mixed-endian GUID
    assert raw[8:12] == bytes.fromhex("635161f8")
    assert raw[24:40] == inst.bytes_le
    assert raw[40:56] == bytes(16)
    assert struct.unpack_from("<HH", raw, 56) == (0x10, 8)
    assert raw[60] == 4 and raw[61:180] == bytes(119)
    assert struct.unpack_from("<HHIBBHI", raw, 180) == (3, 0, 0x7F1, 0xFF, 0, 1, 0x27F1)


def test_openchannel_field_offsets() -> None:
    raw = m.OpenChannel(child_relid=5, openid=6, ringbuffer_gpadlhandle=0xE1E10, target_vp=2,
                        downstream_ringbuffer_pageoffset=17, userdata=b"ud").to_binary()
    assert struct.unpack_from("<IIIII", raw, 8) == (5, 6, 0xE1E10, 2, 17)
    assert raw[28:30] == b"ud" and raw[30:148] == bytes(118)


def test_initiate_contact_and_version_response_offsets() -> None:
    raw = m.InitiateContact(vmbus_version_requested=0x50003, target_vcpu=1, interrupt_page=(0x40 << 32) | 2,
                            monitor_page1=0x1000, monitor_page2=0x2000).to_binary()
    assert struct.unpack_from("<IIQQQ", raw, 8) == (0x50003, 1, (0x40 << 32) | 2, 0x1000, 0x2000)
    assert raw[16] == 2  # msg_sint in byte 0 of the union
    ic = m.InitiateContact(vmbus_version_requested=0x60000, interrupt_page=(0x40 << 32) | 2)
    assert (ic.msg_sint, ic.feature_flags) == (2, 0x40)
    raw = m.VersionResponse(version_supported=1, connection_state=2, msg_conn_id=4,
                            supported_features=9).to_binary(Version.WIN10_V6_0)
    assert struct.unpack_from("<BBHII", raw, 8) == (1, 2, 0, 4, 9)


# OpenVMM channels.rs send_version_response_with_target: VersionResponse (16 bytes) unless a 6.0+ version
# is accepted, then VersionResponse2 (20); Linux checks at least sizeof(vmbus_channel_version_response) = 16.
@pytest.mark.parametrize("version", [None, *Version, 0x00070000])
@pytest.mark.parametrize("supported", [0, 1])
def test_version_response_size_follows_the_version_it_answers(version: int | None, supported: int) -> None:
    raw = m.VersionResponse(version_supported=supported, msg_conn_id=1).to_binary(version)
    assert len(raw) == (20 if supported and version is not None and version >= Version.WIN10_V6_0 else 16)


def test_golden_version_response() -> None:
    # Accepted 5.3: VersionResponse, msg_conn_id 1 (OpenVMM's VTL0 MESSAGE_CONNECTION_ID).
    assert m.VersionResponse(version_supported=1, msg_conn_id=1).to_binary(0x50003) == \
        bytes.fromhex("0f000000 00000000 01000000 01000000")
    # Accepted 6.0: VersionResponse2 adds supported_features.
    assert m.VersionResponse(version_supported=1, msg_conn_id=1, supported_features=0x8).to_binary(0x60000) == \
        bytes.fromhex("0f000000 00000000 01000000 01000000 08000000")
    # Refused (try another version): the base struct, whatever was asked for.
    assert m.VersionResponse(version_supported=0).to_binary(0x60000) == \
        bytes.fromhex("0f000000 00000000 00000000 00000000")
    # A reportable failure at 6.0 is still VersionResponse2 (version_supported = 1, connection_state = 2).
    assert m.VersionResponse(version_supported=1, connection_state=2, msg_conn_id=1).to_binary(0x60000) == \
        bytes.fromhex("0f000000 00000000 01020000 01000000 00000000")


def test_gpadl_header_and_body_layout() -> None:
    hdr = m.GpadlHeader(child_relid=2, gpadl=0xE1E10, range_buflen=8 + 16, rangecount=1, ranges=((8192, 0),),
                        pfns=(0xAAAA, 0xBBBB))
    raw = hdr.to_binary()
    assert struct.unpack_from("<IIHHIIQQ", raw, 8) == (2, 0xE1E10, 24, 1, 8192, 0, 0xAAAA, 0xBBBB)
    body = m.GpadlBody(msgnumber=0, gpadl=0xE1E10, pfns=(1, 2)).to_binary()
    assert struct.unpack_from("<IIQQ", body, 8) == (0, 0xE1E10, 1, 2)


def test_describe_is_readable() -> None:
    text = m.OpenChannel(child_relid=1, openid=1, ringbuffer_gpadlhandle=0xE1E10,
                         downstream_ringbuffer_pageoffset=4).describe()
    assert text.startswith("CHANNELMSG_OPENCHANNEL(5) child_relid=1 openid=1 ringbuffer_gpadlhandle=0xe1e10")
    assert "userdata=0" in text
    body = m.GpadlBody(msgnumber=0, gpadl=1, pfns=tuple(range(10))).describe()
    assert "pfns=[0x0..0x9 (10 pfns)]" in body


# ---- messages: decode errors ---------------------------------------------------------------------------

def _body(obj: Any) -> bytes:
    return bytes(_packb(obj))


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x92\x01", b"\x81\xa1",  # not msgpack / truncated
    _body([1, 2]), _body(7), _body("x"), _body(None),  # not a map
    _body({}), _body({"msgtype": "3"}), _body({"msgtype": True}), _body({"msgtype": 3.0}),
    _body({"type": 3}),
    _body({"msgtype": 7}),  # CLOSECHANNEL without child_relid
    _body({"msgtype": 7, "child_relid": 1, "extra": 0}),  # unknown field
    _body({"msgtype": 7, "child_relid": 2**32}),  # out of u32
    _body({"msgtype": 7, "child_relid": -1}),
    _body({"msgtype": 7, "child_relid": True}),
    _body({"msgtype": 7, "child_relid": 1.0}),
    _body({"msgtype": 7, "child_relid": "1"}),
    _body({"msgtype": 7, "child_relid": None}),
    _body({"msgtype": 15, "version_supported": 256}),  # u8
    _body({"msgtype": 8, "child_relid": 1, "gpadl": 1, "range_buflen": 0x10000, "rangecount": 1}),  # u16
    _body({"msgtype": 24, "child_relid": 1, "status": 2**31}),  # i32
    _body({"msgtype": 24, "child_relid": 1, "status": -(2**31) - 1}),
    _body({"msgtype": 14, "vmbus_version_requested": 1, "interrupt_page": -1}),  # u64 (msgpack has no 2**64)
    _body({"msgtype": 1, "if_type": b"\0" * 15, "if_instance": b"\0" * 16, "child_relid": 1,
           "connection_id": 1}),  # GUID of 15 bytes
    _body({"msgtype": 1, "if_type": "0" * 16, "if_instance": b"\0" * 16, "child_relid": 1,
           "connection_id": 1}),  # GUID as str
    _body({"msgtype": 5, "child_relid": 1, "openid": 1, "ringbuffer_gpadlhandle": 1,
           "downstream_ringbuffer_pageoffset": 1, "userdata": b"\0" * 121}),  # bytes120 overflow
    _body({"msgtype": 5, "child_relid": 1, "openid": 1, "ringbuffer_gpadlhandle": 1,
           "downstream_ringbuffer_pageoffset": 1, "userdata": "text"}),
    _body({"msgtype": 9, "msgnumber": 0, "gpadl": 1, "pfns": list(range(29))}),  # 29 PFNs
    _body({"msgtype": 9, "msgnumber": 0, "gpadl": 1, "pfns": [-1]}),
    _body({"msgtype": 9, "msgnumber": 0, "gpadl": 1, "pfns": b"\0" * 8}),
    _body({"msgtype": 8, "child_relid": 1, "gpadl": 1, "range_buflen": 16, "rangecount": 1,
           "ranges": [[4096]]}),  # a range is [byte_count, byte_offset]
    _body({"msgtype": 8, "child_relid": 1, "gpadl": 1, "range_buflen": 16, "rangecount": 1,
           "ranges": [[4096, 0, 0]]}),
    _body({"msgtype": 8, "child_relid": 1, "gpadl": 1, "range_buflen": 16, "rangecount": 1,
           "ranges": [[4096, -1]]}),
    _body({"msgtype": 8, "child_relid": 1, "gpadl": 1, "range_buflen": 16, "rangecount": 1,
           "ranges": [[4096, 0]] * 28}),
    _body({"msgtype": 8, "child_relid": 1, "gpadl": 1, "range_buflen": 16, "rangecount": 1,
           "ranges": {"a": 1}}),
    _body({1: 2}),  # integer map key
    _body({"msgtype": 7, "child_relid": 1}) + b"\x00",  # trailing bytes
])
def test_decode_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(MessageError):
        m.decode(body)


@pytest.mark.parametrize("msgtype", [0, 18, 19, 20, 21, 23, 25, 26, 27, 28, 29, 30, 255, 2**32, 2**63, -1])
def test_unknown_or_unimplemented_msgtype_is_unsupported(msgtype: int) -> None:
    with pytest.raises(m.UnsupportedMessage) as info:
        m.decode(_body({"msgtype": msgtype}))
    assert info.value.msgtype == msgtype
    assert isinstance(info.value, MessageError)


def test_optional_fields_may_be_left_out() -> None:
    msg = m.decode(_body({"msgtype": 5, "child_relid": 1, "openid": 2, "ringbuffer_gpadlhandle": 3,
                          "downstream_ringbuffer_pageoffset": 4}))
    assert msg == m.OpenChannel(child_relid=1, openid=2, ringbuffer_gpadlhandle=3,
                                downstream_ringbuffer_pageoffset=4)


def test_decode_mixed_str_and_bytes_keys_is_a_message_error() -> None:
    # Regression: from_dict sorted the unknown keys to report them, and str vs bytes keys (msgpack bin keys
    # pass strict_map_key) raised TypeError out of decode().
    with pytest.raises(MessageError, match="unknown fields"):
        m.decode(_body({"msgtype": 3, b"a": 1, "b": 2}))


_keys = st.text(max_size=4) | st.binary(max_size=4) | st.sampled_from(["msgtype", "child_relid", "gpadl"])


@given(st.sampled_from([int(c.MSGTYPE) for c in ALL_CLASSES]), st.dictionaries(_keys, st.integers(0, 9), max_size=5))
@settings(max_examples=200, deadline=None)
def test_decode_of_maps_with_mixed_key_types(msgtype: int, extra: dict[Any, int]) -> None:
    obj: dict[Any, Any] = {**extra, "msgtype": msgtype}
    with contextlib.suppress(MessageError):
        m.decode(_body(obj))


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_decode_of_random_bytes_raises_only_message_error(raw: bytes) -> None:
    try:
        msg = m.decode(raw)
    except MessageError:
        return
    assert m.decode(msg.encode()) == msg


_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
            | st.text(max_size=8) | st.binary(max_size=24))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=10)
_field_names = st.sampled_from(sorted({n for c in ALL_CLASSES for n, _ in c.LAYOUT} | {"msgtype", "x"}))


@given(st.sampled_from([int(c.MSGTYPE) for c in ALL_CLASSES]) | st.integers(-2, 40),
       st.dictionaries(_field_names, _values, max_size=8))
@settings(max_examples=500, deadline=None)
def test_decode_of_random_maps_raises_only_message_error(msgtype: int, extra: dict[str, Any]) -> None:
    obj = {"msgtype": msgtype, **{k: v for k, v in extra.items() if k != "msgtype"}}
    try:
        msg = m.decode(_body(obj))
    except MessageError:
        return
    assert m.decode(msg.encode()) == msg


@given(any_message, st.data())
@settings(max_examples=300, deadline=None)
def test_one_corrupted_field_raises_only_message_error(msg: m.Message, data: st.DataObject) -> None:
    obj = msg.to_dict()
    if len(obj) > 1:
        name = data.draw(st.sampled_from(sorted(k for k in obj if k != "msgtype")))
        obj[name] = data.draw(_values)
    try:
        out = m.decode(_body(obj))
    except MessageError:
        return
    assert type(out) is type(msg)


# ---- framing -------------------------------------------------------------------------------------------

def _frame(kind: int, relid: int, body: bytes, data: bytes = b"") -> bytes:
    return b"".join(bytes(p) for p in frame_parts(kind, relid, body, data))


def test_header_layout() -> None:
    assert HEADER_SIZE == 16
    raw = _frame(FrameKind.PACKET, 7, b"body", b"DATA")
    assert HEADER.unpack_from(raw) == (8, FrameKind.PACKET, 0, 0, 7, 4)
    assert raw[16:] == b"bodyDATA"
    # encode_frame leaves the raw data to the caller (it is written separately, never copied)
    assert encode_frame(FrameKind.PACKET, 7, b"body", b"DATA") + b"DATA" == raw


_frames = st.lists(st.tuples(st.sampled_from(list(FrameKind)), st.integers(0, 2**32 - 1),
                             st.binary(max_size=40), st.binary(max_size=40)), min_size=1, max_size=6)


@given(_frames)
@settings(max_examples=100, deadline=None)
def test_frames_split_at_every_byte_boundary(frames: list[tuple[int, int, bytes, bytes]]) -> None:
    stream = b"".join(_frame(*f) for f in frames)
    expected = [(k, r, b, d) for k, r, b, d in frames]
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert [(f.kind, f.relid, bytes(f.body), bytes(f.data)) for f in got] == expected
        assert dec.buffered == 0


def test_frames_byte_by_byte_and_all_at_once() -> None:
    frames = [(FrameKind.CONTROL, 0, m.RequestOffers().encode(), b""),
              (FrameKind.PACKET, 3, b"\x95\x06\x00\x01\xc4\x00\xc0", b"x" * 5000),
              (FrameKind.SIGNAL, 3, Signal(0, read_index=8).encode(), b""),
              (FrameKind.CLOSE, 0, encode_close("bye"), b"")] * 25
    stream = b"".join(_frame(*f) for f in frames)
    dec = FrameDecoder()
    got = dec.feed(stream)
    assert len(got) == 100
    assert [(f.kind, f.relid, bytes(f.body), bytes(f.data)) for f in got] == frames
    dec = FrameDecoder()
    one = [f for i in range(len(stream)) for f in dec.feed(stream[i:i + 1])]
    assert len(one) == 100 and dec.buffered == 0
    assert one[1].data == b"x" * 5000


@given(_frames, st.lists(st.integers(0, 400), max_size=8))
@settings(max_examples=100, deadline=None)
def test_frames_stay_intact_across_later_feeds(frames: list[tuple[int, int, bytes, bytes]], cuts: list[int]) -> None:
    """Frames are zero-copy views of the chunks they arrived in; keeping them while more data (and more
    split frames, copied through the decoder's buffer) arrives must not change them."""
    stream = b"".join(_frame(*f) for f in frames) * 3
    points = sorted({0, len(stream), *(min(c, len(stream)) for c in cuts)})
    dec = FrameDecoder()
    got = []
    for a, b in itertools.pairwise(points):
        got += dec.feed(stream[a:b])
    assert [(f.kind, f.relid, bytes(f.body), bytes(f.data)) for f in got] == frames * 3


def test_a_bulk_frame_is_read_straight_into_a_buffer_of_its_own() -> None:
    """BufferedProtocol reads: once a bulk frame's header is in, the next buffer offered is exactly the rest
    of that frame, and the frame's data is a view of it (the kernel's copy is the only one)."""
    data = bytes(range(256)) * 1024  # 256 KiB
    stream = _frame(FrameKind.PACKET, 7, b"\x90", data) + _frame(FrameKind.SIGNAL, 7, b"\x80")
    dec = FrameDecoder()
    first = dec.get_buffer()
    first[:100] = stream[:100]
    assert dec.buffer_updated(100) == []
    rest = dec.get_buffer()
    assert len(rest) == HEADER_SIZE + 1 + len(data) - 100
    rest[:] = stream[100:100 + len(rest)]
    (frame,) = dec.buffer_updated(len(rest))
    assert bytes(frame.data) == data and frame.relid == 7
    assert isinstance(frame.data, memoryview) and len(frame.data.obj) == HEADER_SIZE + 1 + len(data)
    assert dec.buffered == 0
    tail = stream[100 + len(rest):]
    buf = dec.get_buffer()
    buf[:len(tail)] = tail
    assert [f.kind for f in dec.buffer_updated(len(tail))] == [FrameKind.SIGNAL]


def test_chunks_grow_while_reads_fill_them_and_shrink_when_idle() -> None:
    dec = FrameDecoder()
    assert len(dec.get_buffer()) == 4096  # an idle connection holds 4 KiB
    small = _frame(FrameKind.CONTROL, 0, b"\x80") * 2000  # 34 KB of small frames
    sizes = []
    pos = 0
    while pos < len(small):
        buf = dec.get_buffer()
        sizes.append(len(buf))
        n = min(len(buf), len(small) - pos)
        buf[:n] = small[pos:pos + n]
        dec.buffer_updated(n)
        pos += n
    assert max(sizes) > 4096 * 2  # full reads made the chunks grow
    for _ in range(8):  # then reads of one small frame each
        buf = dec.get_buffer()
        frame = _frame(FrameKind.CONTROL, 0, b"\x80")
        buf[:len(frame)] = frame
        dec.buffer_updated(len(frame))
    assert dec._size == 4096


def test_oversize_frame_fails_before_buffering() -> None:
    dec = FrameDecoder(max_frame=1 << 20)
    header = HEADER.pack(2**31, FrameKind.PACKET, 0, 0, 1, 0)  # announces 2 GiB
    with pytest.raises(FrameError, match="exceeds"):
        dec.feed(header)
    assert dec.buffered <= HEADER_SIZE
    with pytest.raises(FrameError):  # and it stays broken
        dec.feed(b"\0" * 100)


def test_frame_at_the_limit_is_accepted_and_one_over_is_not() -> None:
    limit = 4096
    ok = _frame(FrameKind.PACKET, 1, b"b" * 96, b"d" * (limit - 96))
    dec = FrameDecoder(max_frame=limit)
    for i in range(0, len(ok), 1000):
        assert dec.buffered <= limit + HEADER_SIZE
        frames = dec.feed(ok[i:i + 1000])
    assert len(frames) == 1 and len(frames[0].data) == limit - 96
    with pytest.raises(FrameError):
        FrameDecoder(max_frame=limit).feed(HEADER.pack(limit + 1, FrameKind.PACKET, 0, 0, 1, 0))


@pytest.mark.parametrize("header", [
    HEADER.pack(0, 0, 0, 0, 0, 0),  # kind 0
    HEADER.pack(0, 9, 0, 0, 0, 0),  # kind 9 (8 is EVENT)
    HEADER.pack(0, 255, 0, 0, 0, 0),
    HEADER.pack(4, FrameKind.CONTROL, 0, 1, 0, 0),  # reserved bits set
    HEADER.pack(4, FrameKind.CONTROL, 0, 0x8000, 0, 0),
    HEADER.pack(4, FrameKind.PACKET, 0, 0, 0, 5),  # data_len > length
])
def test_bad_headers(header: bytes) -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(header)


def test_good_frames_before_a_bad_header_in_one_feed() -> None:
    good = _frame(FrameKind.CONTROL, 0, b"\x80")
    dec = FrameDecoder()
    with pytest.raises(FrameError):
        dec.feed(good + HEADER.pack(0, 10, 0, 0, 0, 0))
    # The connection is dead anyway; the decoder must not have produced half-state that hides the error.
    with pytest.raises(FrameError):
        dec.feed(b"")


@given(st.lists(st.binary(max_size=64), max_size=12), st.integers(16, 4096))
@settings(max_examples=400, deadline=None)
def test_random_bytes_only_raise_frame_error(chunks: list[bytes], max_frame: int) -> None:
    dec = FrameDecoder(max_frame=max_frame)
    fed = 0
    out = []
    try:
        for c in chunks:
            out.extend(dec.feed(c))
            fed += len(c)
    except FrameError:
        return
    # Whatever parsed re-encodes to exactly the bytes it consumed.
    consumed = b"".join(HEADER.pack(len(f.body) + len(f.data), f.kind, f.flags, 0, f.relid, len(f.data))
                        + bytes(f.body) + bytes(f.data) for f in out)
    assert b"".join(chunks).startswith(consumed)
    assert dec.buffered == fed - len(consumed)
    assert dec.buffered < HEADER_SIZE + max_frame


# ---- envelope: PACKET ----------------------------------------------------------------------------------

def test_packet_round_trips() -> None:
    pkts = [
        Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, 1, b"hello"),
        Packet(PacketType.COMP, 0, 2**64 - 1, b""),
        Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 5, b"req", (GpaRange(8192, 0, (1, 2)), GpaRange(10, 4090, (3, 4))),
               data=b"d" * 8202),
        Packet(PacketType.DATA_USING_XFER_PAGES, 1, 9, b"", xfer_pageset_id=0xCAFE, xfer_ranges=((100, 0),)),
    ]
    for pkt in pkts:
        out = decode_packet(encode_packet(pkt), pkt.data, max_payload=4096)
        assert out == pkt


def _pkt_body(ptype: int, flags: int = 0, trans_id: Any = 1, payload: Any = b"", ext: Any = None) -> bytes:
    return _body([ptype, flags, trans_id, payload, ext])


@pytest.mark.parametrize(("body", "match"), [
    (_body({"type": 6}), "not \\[type"),
    (_body([6, 0, 1, b""]), "not \\[type"),
    (_pkt_body(6, trans_id="1"), "must be integers"),
    (_pkt_body(6, payload="text"), "payload must be bytes"),
    (_pkt_body(6, payload=b"x" * 65), "exceeds 64"),
    (_pkt_body(1), "not accepted"),  # SYNCH
    (_pkt_body(8), "not accepted"),  # DATA_USING_GPADL
    (_pkt_body(0xD), "not accepted"),
    (_pkt_body(6, flags=2), "flags"),
    (_pkt_body(6, flags=0x8001), "flags"),
    (_pkt_body(6, trans_id=-1), "u64"),
    (_pkt_body(6, ext=[[4096, 0, [1]]]), "carries no extension"),  # extension on in-band
    (_pkt_body(0xB, ext=[1, [[1, 0]]]), "carries no extension"),
    (_pkt_body(9), "without ranges"),
    (_pkt_body(9, ext=[]), "range_count 0"),
    (_pkt_body(9, ext=[[4096, 0]]), "GPA range must be"),
    (_pkt_body(9, ext=[[4096, 0, [-1]]]), "GPA range must be"),
    (_pkt_body(9, ext=[[4096, 0, ["1"]]]), "GPA range must be"),
    (_pkt_body(9, ext=[[0, 0, []]]), "byte_count 0"),
    (_pkt_body(9, ext=[[-5, 0, []]]), "byte_count 0"),
    (_pkt_body(9, ext=[[4096, 4096, [1, 2]]]), "not inside a page"),
    (_pkt_body(9, ext=[[1, -1, [1]]]), "not inside a page"),
    (_pkt_body(9, ext=[[4096, 0, [1, 2]]]), "needs 1 pfns, has 2"),
    (_pkt_body(9, ext=[[4096, 1, [1]]]), "needs 2 pfns, has 1"),
    (_pkt_body(7), "transfer-page PACKET needs"),
    (_pkt_body(7, ext=[1, []]), "range_count 0"),
    (_pkt_body(7, ext=[1, [[1, 2, 3]]]), "transfer-page range"),
])
def test_decode_packet_validation(body: bytes, match: str) -> None:
    with pytest.raises(PacketError, match=match):
        decode_packet(body, b"", max_payload=64)


# Regression (fixed in f178c72): the in-band fast path took a float type, the slow path bool flags / trans_id.
@pytest.mark.parametrize("body", [[6.0, 0, 1, b"x", None], [11.0, 1, 1, b"", None],
                                  [6, True, 1, b"", None], [6, 0, False, b"", None],
                                  [9, 1, True, b"", [[4096, 0, [1]]]]])
def test_decode_packet_rejects_floats_and_bools(body: list[Any]) -> None:
    with pytest.raises(PacketError):
        decode_packet(_body(body), b"", max_payload=64)


_pkt_field = (st.none() | st.booleans() | st.integers(-2, 2**64 - 1) | st.floats(allow_nan=False)
              | st.binary(max_size=8) | st.text(max_size=2))


@given(st.sampled_from([0, 1, 6, 7, 9, 11, 12, True, None, "6", b"\x06", 6.0, 11.0]) | st.integers(-1, 20),
       _pkt_field, _pkt_field, _pkt_field,
       st.none() | st.lists(_pkt_field, max_size=3))
@settings(max_examples=300, deadline=None)
def test_every_decoded_packet_is_valid(ptype: Any, flags: Any, trans_id: Any, payload: Any, ext: Any) -> None:
    """Whatever path decode_packet takes, what it returns passes Packet.validate with integer fields."""
    try:
        pkt = decode_packet(_body([ptype, flags, trans_id, payload, ext]), b"", max_payload=4)
    except ProtocolError:
        return
    pkt.validate()
    assert type(pkt.type) is int and type(pkt.flags) is int and type(pkt.trans_id) is int
    assert type(pkt.payload) is bytes and len(pkt.payload) <= 4


def test_decode_packet_garbage_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        decode_packet(b"\xc1", b"", max_payload=64)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_packet_random_bytes(raw: bytes) -> None:
    try:
        pkt = decode_packet(raw, b"", max_payload=4096)
    except ProtocolError:
        return
    pkt.validate()


# ---- envelope: SIGNAL, HELLO, CLOSE --------------------------------------------------------------------

def test_signal_round_trips() -> None:
    for sig in (Signal(0, read_index=8, interrupt_mask=1), Signal(1, write_index=0xFFFFFFF8, pending_send_sz=16),
                Signal(1, interrupt_mask=0), Signal(0), Signal(0, read_index=8, data_read_index=4096),
                Signal(1, write_index=8, pending_send_sz=0, data_pending_sz=65536)):
        assert Signal.decode(sig.encode()) == sig


@pytest.mark.parametrize("obj", [
    [0], {"ring": 2}, {"ring": -1}, {"ring": "0"}, {}, {"read_index": 1},
    {"ring": 0, "read_index": 8, "write_index": 8},  # mixes the reader's and the writer's fields
    {"ring": 0, "interrupt_mask": 1, "pending_send_sz": 8},
    {"ring": 0, "read_index": 2**32},
    {"ring": 0, "read_index": -1},
    {"ring": 0, "pending_send_sz": "8"},
    {"ring": 0, "pending_send_sz": 8.0},
    {"ring": 0, "pending_send_sz": None},
    {"ring": 0, "bogus": 1},
    {"ring": 0, "data_read_index": 8, "data_pending_sz": 8},  # the data window's reader and writer fields
    {"ring": 0, "read_index": 8, "data_pending_sz": 8},
    {"ring": 0, "data_read_index": 2**32},
])
def test_signal_decode_rejects(obj: Any) -> None:
    with pytest.raises(FrameError):
        Signal.decode(_body(obj))


def test_signal_decode_garbage() -> None:
    with pytest.raises(FrameError):
        Signal.decode(b"\xc1")


def test_hello_round_trip_and_validation() -> None:
    hello = Hello(2, "child-0", "none", data_window=2 << 20)
    assert Hello.decode(hello.encode()) == hello
    assert Hello.decode(_body({"envelope": 2, "partition": "x"})) == Hello(2, "x", "none", DEFAULT_DATA_WINDOW)
    for bad in ([1], {"partition": "x"}, {"envelope": "1", "partition": "x"}, {"envelope": 1},
                {"envelope": 1, "partition": ""}, {"envelope": 1, "partition": "x" * 65},
                {"envelope": 1, "partition": "a\nb"}, {"envelope": 1, "partition": "x", "auth": 5},
                {"envelope": 2, "partition": "x", "data_window": MIN_DATA_WINDOW - 8},
                {"envelope": 2, "partition": "x", "data_window": MAX_DATA_WINDOW + 8},
                {"envelope": 2, "partition": "x", "data_window": MIN_DATA_WINDOW + 1},
                {"envelope": 2, "partition": "x", "data_window": "big"}):
        with pytest.raises(FrameError):
            Hello.decode(_body(bad))
    with pytest.raises(FrameError):
        Hello.decode(b"\xc1")


def test_close_reason() -> None:
    assert decode_close(encode_close("going away")) == "going away"
    assert decode_close_code(encode_close("taken", "name-taken")) == ("taken", "name-taken")
    assert decode_close_code(encode_close("bye")) == ("bye", None)
    assert decode_close_code(_body({"reason": "x", "code": 7})) == ("x", None)
    assert decode_close_code(_body([1])) == ("(no reason)", None)
    assert decode_close(b"\xc1") == "(undecodable CLOSE)"
    assert decode_close(_body({"reason": 5})) == "(no reason)"


# Regression: Signal.decode took ring=True / ring=1.0 and bool values (read_index=True) for u32s.
@pytest.mark.parametrize("obj", [{"ring": True}, {"ring": 1.0}, {"ring": 0, "read_index": True},
                                 {"ring": 1, "pending_send_sz": False}])
def test_signal_decode_rejects_bools_and_floats(obj: Any) -> None:
    with pytest.raises(FrameError):
        Signal.decode(_body(obj))
