"""RNDIS: golden bytes laid out by hand from Linux hyperv_net.h / rndis.h and OpenVMM rndisprot.rs, the
PPI chain, lengths and offsets that lie, OpenVMM's OID answers, and fuzzing (only RndisError escapes)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus_proto.devices.network import rndis
from vmbus_proto.devices.network.guest import rss_parameters

MAC = bytes.fromhex("00155d0a0b0c")


def u32(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "little") for v in values)


GOLDEN: list[tuple[rndis.RndisMessage, bytes]] = [
    (rndis.Initialize(1), u32(2, 24, 1, 1, 0, 0x4000)),
    (rndis.InitializeComplete(1), u32(0x80000002, 52, 1, 0, 1, 0, 1, 0, 8, 0xEFFFFFFF, 3, 0, 0)),
    (rndis.Halt(9), u32(3, 12, 9)),
    # QUERY: req_id, oid, info_buflen, info_buf_offset (from req_id: 20, as Linux), dev_vc_handle
    (rndis.Query(2, 0x00010106), u32(4, 28, 2, 0x00010106, 0, 20, 0)),
    (rndis.Query(3, 0xFC01020D, b"\xa7\x03\x9c\x00"), u32(4, 32, 3, 0xFC01020D, 4, 20, 0) + b"\xa7\x03\x9c\x00"),
    (rndis.QueryComplete(2, 0, u32(1500)), u32(0x80000004, 28, 2, 0, 4, 16, 1500)),
    (rndis.QueryComplete(2, 0xC00000BB), u32(0x80000004, 24, 2, 0xC00000BB, 0, 16)),
    (rndis.Set(4, 0x0001010E, u32(0xD)), u32(5, 32, 4, 0x0001010E, 4, 20, 0, 0xD)),
    (rndis.SetComplete(4), u32(0x80000005, 16, 4, 0)),
    (rndis.Reset(), u32(6, 12, 0)),
    (rndis.ResetComplete(), u32(0x80000006, 16, 0, 0)),
    (rndis.IndicateStatus(0x4001000B), u32(7, 20, 0x4001000B, 0, 0)),
    (rndis.IndicateStatus(0x40010013, u32(100_000_000)), u32(7, 24, 0x40010013, 4, 12, 100_000_000)),
    (rndis.Keepalive(5), u32(8, 12, 5)),
    (rndis.KeepaliveComplete(5), u32(0x80000008, 16, 5, 0)),
]


@pytest.mark.parametrize(("message", "wire"), GOLDEN, ids=[type(m).__name__ for m, _ in GOLDEN])
def test_golden_control_messages(message: rndis.RndisMessage, wire: bytes) -> None:
    assert rndis.encode(message) == wire, f"{type(message).__name__}: {rndis.encode(message).hex()}"
    assert rndis.decode(wire) == message
    assert rndis.describe(wire).startswith("RNDIS_MSG_")


def test_golden_packet_message_with_every_ppi() -> None:
    frame = bytes(range(60))
    csum = rndis.TxChecksum(is_ipv4=True, tcp=True, tcp_header_offset=34)
    info = rndis.PacketInfo(checksum=csum.value(), lso=rndis.LsoV2(1448, 34), vlan=rndis.Vlan(5, priority=3),
                            hash_value=0xABCD, rsc=rndis.RscId(rndis.RSC_FIRST_FRAG, 7))
    # PPI records {size 16, type, ppi_offset 12, u32}; RNDIS_PKTINFO_ID is internal (bit 31) type 1.
    ppis = (u32(16, 0, 12, 1 | 4 | 34 << 16) + u32(16, 2, 12, 1448 | 34 << 20 | 1 << 30)
            + u32(16, 6, 12, 3 | 5 << 4) + u32(16, 8, 12, 0xABCD)
            + u32(16, 0x80000001, 12) + bytes([1, rndis.RSC_FIRST_FRAG]) + (7).to_bytes(2, "little"))
    body = u32(36 + len(ppis), 60, 0, 0, 0, 36, len(ppis), 0, 0) + ppis + frame
    wire = u32(1, 8 + len(body)) + body
    message = rndis.PacketMessage(frame, info)
    assert rndis.encode(message) == wire
    assert rndis.decode(wire) == message
    assert rndis.TxChecksum.from_value(info.checksum or 0) == csum
    assert rndis.describe(wire) == ("RNDIS_MSG_PACKET(1) data_len=60 checksum=0x220005 lso_mss=1448 vlan=5 "
                                    "hash=0xabcd rsc_flags=0x2")


def test_batched_packets_and_a_zero_tail() -> None:
    one = rndis.encode(rndis.PacketMessage(b"a" * 20), pad=4)
    two = rndis.encode(rndis.PacketMessage(b"b" * 30))
    frames = [m.data for m in rndis.iter_packet_messages(one + two + bytes(40))]
    assert frames == [b"a" * 20, b"b" * 30]


LIES = [
    ("msg_len past the data", u32(1, 200) + bytes(40), "does not fit"),
    ("msg_len below the header", u32(1, 4), "does not fit"),
    ("frame past the message", u32(1, 44, 36, 100, 0, 0, 0, 0, 0, 0, 0), "outside"),
    ("data offset inside the header", u32(1, 48, 4, 4, 0, 0, 0, 0, 0, 0, 0) + b"abcd", "outside"),
    ("no frame", u32(1, 44, 36, 0, 0, 0, 0, 0, 0, 0, 0), "data_len 0"),
    ("OOB data", u32(1, 48, 36, 4, 0, 4, 1, 0, 0, 0, 0) + b"abcd", "OOB"),
    ("vc_handle", u32(1, 48, 36, 4, 0, 0, 0, 0, 0, 7, 0) + b"abcd", "vc_handle"),
    ("PPI chain past the message", u32(1, 64, 52, 4, 0, 0, 0, 36, 64, 0, 0) + u32(16, 0, 12, 0) + b"abcd", "outside"),
    ("PPI record past its chain", u32(1, 64, 52, 4, 0, 0, 0, 36, 16, 0, 0) + u32(40, 0, 12, 0) + b"abcd", "overruns"),
    ("PPI record smaller than its header", u32(1, 64, 52, 4, 0, 0, 0, 36, 16, 0, 0) + u32(8, 0, 12, 0) + b"abcd",
     "overruns"),
    ("PPI data offset past its record", u32(1, 64, 52, 4, 0, 0, 0, 36, 16, 0, 0) + u32(16, 0, 20, 0) + b"abcd",
     "data offset"),
    ("PPI too short for its u32", u32(1, 60, 48, 4, 0, 0, 0, 36, 12, 0, 0) + u32(12, 0, 12) + b"abcd", "need 4"),
    ("QUERY buffer past the message", u32(4, 28, 1, 0x10106, 64, 20, 0), "outside"),
    ("INDICATE buffer offset into its fields", u32(7, 24, 0x40010013, 4, 4, 1), "outside"),
    ("unknown type", u32(0x42, 8), "unknown"),
    ("SET_EX (not implemented, as OpenVMM)", u32(9, 12, 1), "unknown"),
]


@pytest.mark.parametrize(("wire", "match"), [(w, m) for _, w, m in LIES], ids=[n for n, _, _ in LIES])
def test_lengths_and_offsets_that_lie(wire: bytes, match: str) -> None:
    with pytest.raises(rndis.RndisError, match=match):
        rndis.decode(wire)


def test_non_packet_on_the_data_path_is_refused() -> None:
    with pytest.raises(rndis.RndisError, match="need PACKET_MSG"):
        list(rndis.iter_packet_messages(rndis.encode(rndis.Keepalive(1))))


# ---- OID answers (OpenVMM handle_oid_query) ---------------------------------------------------------------

NIC = rndis.NicProperties(MAC, mtu=1514, link_speed=10_000_000_000, max_queues=4)


@pytest.mark.parametrize(("oid", "answer"), [
    (rndis.Oid.GEN_MAXIMUM_FRAME_SIZE, u32(1500)),
    (rndis.Oid.P802_3_PERMANENT_ADDRESS, MAC),
    (rndis.Oid.P802_3_CURRENT_ADDRESS, MAC),
    (rndis.Oid.GEN_MEDIA_CONNECT_STATUS, u32(0)),
    (rndis.Oid.GEN_LINK_SPEED, u32(100_000_000)),  # 100 bps units
    (rndis.Oid.GEN_VENDOR_ID, u32(0x155D)),
    (rndis.Oid.GEN_MAXIMUM_TOTAL_SIZE, u32(1514)),
    (rndis.Oid.GEN_MAXIMUM_SEND_PACKETS, u32(0xFFFFFFFF)),
    (rndis.Oid.GEN_RECEIVE_SCALE_CAPABILITIES,
     bytes([0x88, 2]) + (18).to_bytes(2, "little") + u32(0x301, 1, 4) + (128).to_bytes(2, "little")),
])
def test_oid_answers(oid: int, answer: bytes) -> None:
    assert rndis.query_oid(NIC, oid) == answer, rndis.oid_text(oid)


def test_friendly_name_and_hardware_offload() -> None:
    name = rndis.query_oid(NIC, rndis.Oid.GEN_FRIENDLY_NAME)
    assert name.decode("utf-16-le").rstrip("\0") == "Network Device" and len(name) == 512
    offload = rndis.query_oid(NIC, rndis.Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES)
    # Linux rndis_query_hwcaps: type 0xA7, revision >= 1, size >= 112, else device add fails.
    assert offload[:4] == bytes([0xA7, 3]) + (156).to_bytes(2, "little") and len(offload) == 156
    ipv4_tx = struct.unpack_from("<I", offload, 8)[0]
    assert ipv4_tx == 0x155, f"IPv4 TX checksum flags {ipv4_tx:#x}"
    lso_v4_max = struct.unpack_from("<I", offload, 84)[0]
    assert lso_v4_max == 0xF53C


def test_supported_list_depends_on_the_ndis_version() -> None:
    def listed(version: tuple[int, int]) -> set[int]:
        data = rndis.query_oid(rndis.NicProperties(MAC, ndis_version=version), rndis.Oid.GEN_SUPPORTED_LIST)
        return set(struct.unpack(f"<{len(data) // 4}I", data))
    assert rndis.Oid.GEN_RECEIVE_SCALE_CAPABILITIES in listed((6, 30))
    assert rndis.Oid.GEN_RECEIVE_SCALE_CAPABILITIES not in listed((6, 1))
    assert rndis.Oid.TCP_OFFLOAD_PARAMETERS not in listed((5, 0))
    with pytest.raises(rndis.OidError) as err:
        listed((7, 0))
    assert err.value.status == rndis.Status.BAD_VERSION


@pytest.mark.parametrize("oid", [0x12345678, rndis.Oid.P802_3_MULTICAST_LIST, rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS])
def test_unknown_oid_is_not_supported(oid: int) -> None:
    with pytest.raises(rndis.OidError) as err:
        rndis.query_oid(NIC, oid)
    assert err.value.status == rndis.Status.NOT_SUPPORTED


def test_rss_parameters_as_linux_sends_them() -> None:
    hash_info, key, table = rndis.parse_rss_parameters(rss_parameters(4), 4) or (0, b"", ())
    assert len(key) == 40 and table == tuple(i % 4 for i in range(128))
    assert hash_info == 0x1701, "Toeplitz, IPv4, TCP/IPv4, IPv6, TCP/IPv6 (Linux NDIS_HASH_* bits)"
    with pytest.raises(rndis.OidError, match="queue >= 2"):
        rndis.parse_rss_parameters(rss_parameters(4), 2)
    disabled = bytearray(rss_parameters(4))
    disabled[4] |= rndis.NDIS_RSS_PARAM_FLAG_DISABLE_RSS
    assert rndis.parse_rss_parameters(bytes(disabled), 4) is None
    bad_key = bytearray(rss_parameters(4))
    bad_key[20] = 16
    with pytest.raises(rndis.OidError, match="key of 16"):
        rndis.parse_rss_parameters(bytes(bad_key), 4)


def test_offload_parameters_and_config_parameter() -> None:
    params = struct.pack("<BBH5B7BI", 0x80, 3, 24, 4, 4, 4, 4, 4, 0, 0, 2, 2, 0, 0, 0, 0)
    assert rndis.parse_offload_parameters(params) == (4, 4, 4, 4, 4, 0, 2, 2)
    with pytest.raises(rndis.OidError, match="LSOv1"):
        rndis.parse_offload_parameters(params[:9] + b"\x02" + params[10:])
    with pytest.raises(rndis.OidError, match="header"):
        rndis.parse_offload_parameters(b"\x81" + params[1:])
    assert rndis.parse_config_parameter(rndis.pack_config_parameter("NetworkAddress", "00155D0A0B0D")) == (
        "NetworkAddress", "00155D0A0B0D")
    with pytest.raises(rndis.OidError, match="outside"):
        rndis.parse_config_parameter(u32(20, 200, 2, 20, 0))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decoders_raise_only_rndis_errors(data: bytes) -> None:
    for parse in (lambda: rndis.decode(data), lambda: list(rndis.iter_packet_messages(data)),
                  lambda: rndis.describe(data), lambda: rndis.unpack_ppis(data)):
        with contextlib.suppress(rndis.RndisError):
            parse()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2, 4, 5, 7, 8, 0x80000002, 0x80000004, 0x80000005]), st.binary(max_size=120))
def test_fuzz_bodies_with_an_honest_header(msg_type: int, body: bytes) -> None:
    wire = u32(msg_type, 8 + len(body)) + body
    with contextlib.suppress(rndis.RndisError):
        rndis.describe(wire)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(1, 8))
def test_fuzz_oid_sets_raise_only_oid_errors(info: bytes, queues: int) -> None:
    for parse in (lambda: rndis.parse_rss_parameters(info, queues), lambda: rndis.parse_offload_parameters(info),
                  lambda: rndis.parse_config_parameter(info)):
        with contextlib.suppress(rndis.OidError):
            parse()
