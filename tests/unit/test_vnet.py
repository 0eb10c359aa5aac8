"""virtio-net header codec (golden bytes), Internet checksums and TCP segmentation against hand-built packets."""

from __future__ import annotations

import struct

import pytest

from vmbus_proto.devices.network import vnet

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def ref_checksum(data: bytes) -> int:
    """RFC 1071 the slow way: 16-bit words, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for (w,) in struct.iter_unpack("!H", data):
        s += w
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_tcp(payload: bytes, seq: int = 1000, flags: int = 0x18 | 0x01 | 0x80, ip_id: int = 7) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 99, 5 << 4, flags, 64240, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), ip_id, 0x4000, 64, 6, 0,
                     bytes([169, 254, 0, 1]), bytes([169, 254, 0, 2]))
    return MAC_B + MAC_A + b"\x08\x00" + ip + tcp + payload


def ipv6_tcp(payload: bytes, seq: int = 5) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 99, 5 << 4, 0x18, 64240, 0, 0)
    src, dst = bytes.fromhex("fe80" + "00" * 13 + "01"), bytes.fromhex("fe80" + "00" * 13 + "02")
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, src, dst)
    return MAC_B + MAC_A + b"\x86\xdd" + ip + tcp + payload


def tcp_ok(frame: bytes) -> bool:
    """Whether the frame's TCP checksum verifies (pseudo-header from its IPv4/IPv6 header)."""
    if frame[12:14] == b"\x08\x00":
        l4 = 14 + (frame[14] & 15) * 4
        pseudo = frame[26:34] + struct.pack("!BBH", 0, 6, len(frame) - l4)
    else:
        l4 = 54
        pseudo = frame[22:54] + struct.pack("!IxxxB", len(frame) - l4, 6)
    return ref_checksum(pseudo + frame[l4:]) == 0


def test_header_golden_bytes_v1_and_v0() -> None:
    hdr = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16, 0)
    assert hdr.pack() == bytes.fromhex("0101 3600 a805 2200 1000 0000")
    assert hdr.pack(v1=False) == bytes.fromhex("0101 3600 a805 2200 1000")
    assert vnet.VnetHdr.unpack(bytes.fromhex("0101 3600 a805 2200 1000 0000")) == hdr
    assert vnet.VnetHdr.unpack(bytes.fromhex("02 84 0000 0000 0000 0000 0100")) == vnet.VnetHdr(
        vnet.F_DATA_VALID, vnet.GSO_TCPV6 | vnet.GSO_ECN, num_buffers=1)
    assert bytes(12) == vnet.NO_OFFLOAD_V1


@pytest.mark.parametrize(("raw", "message"), [
    (bytes(11), "11 bytes, need 12"),
    (bytes.fromhex("08 00") + bytes(10), "unknown flags 0x8"),
    (bytes.fromhex("00 02") + bytes(10), "unknown gso_type 0x2"),
])
def test_bad_headers_are_clear_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vnet.VnetHdr.unpack(raw)


def test_checksum_matches_rfc1071_and_a_known_ipv4_header() -> None:
    header = bytes.fromhex("4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7")
    assert vnet.checksum(header) == 0xB861
    for data in (b"", b"\x01", b"\xff\xff", bytes(range(256)) * 7 + b"\x05", b"\xff" * 33):
        assert vnet.checksum(data) == ref_checksum(data), data[:8]


def test_fill_checksum_completes_a_partial_tcp_checksum() -> None:
    frame = bytearray(ipv4_tcp(b"hello, partial checksum"))
    l4 = 34
    pseudo = frame[26:34] + struct.pack("!BBH", 0, 6, len(frame) - l4)
    # What the kernel leaves for NEEDS_CSUM: the folded pseudo-header sum, not complemented.
    struct.pack_into("!H", frame, l4 + 16, ~ref_checksum(pseudo) & 0xFFFF)
    assert not tcp_ok(bytes(frame))
    done = vnet.fill_checksum(frame, l4, 16)
    assert tcp_ok(done)
    assert done[:l4 + 16] == frame[:l4 + 16] and done[l4 + 18:] == frame[l4 + 18:]
    with pytest.raises(ValueError, match="outside"):
        vnet.fill_checksum(frame, len(frame) - 1, 16)


def test_segment_ipv4_tcp() -> None:
    payload = bytes(range(256)) * 12 + b"tail"  # 3076 bytes
    frame = ipv4_tcp(payload, seq=0xFFFFFF00)
    hdr = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1000, 34, 16)
    segs = vnet.segment_tcp(frame, hdr, mtu=1500)
    assert [len(s) - 54 for s in segs] == [1000, 1000, 1000, 76]
    assert b"".join(s[54:] for s in segs) == payload
    for i, s in enumerate(segs):
        assert ref_checksum(s[14:34]) == 0, f"segment {i}: IPv4 header checksum"
        assert struct.unpack_from("!HH", s, 16) == (len(s) - 14, 7 + i)
        assert struct.unpack_from("!I", s, 38)[0] == (0xFFFFFF00 + 1000 * i) & 0xFFFFFFFF
        assert tcp_ok(s), f"segment {i}: TCP checksum"
    # ACK on all; CWR only on the first; PSH and FIN only on the last.
    assert [s[47] for s in segs] == [0x90, 0x10, 0x10, 0x19]


def test_segment_ipv6_tcp_respects_the_mtu() -> None:
    payload = b"x" * 5000
    segs = vnet.segment_tcp(ipv6_tcp(payload), vnet.VnetHdr(0, vnet.GSO_TCPV6, 74, 9000, 0, 0), mtu=1500)
    assert [len(s) - 74 for s in segs] == [1440, 1440, 1440, 680]
    for s in segs:
        assert struct.unpack_from("!H", s, 18)[0] == len(s) - 54
        assert tcp_ok(s)


@pytest.mark.parametrize(("frame", "message"), [
    (b"\0" * 10, "shorter than an Ethernet header"),
    (MAC_B + MAC_A + b"\x08\x06" + bytes(28), "neither IPv4 nor IPv6"),
    (ipv4_tcp(b"")[:40], "truncated TCP header"),
    (MAC_B + MAC_A + b"\x08\x00" + bytes.fromhex("4500001c000000004011") + bytes(18), "is not TCP"),
])
def test_segment_rejects_what_it_cannot_cut(frame: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vnet.segment_tcp(frame, vnet.VnetHdr(0, vnet.GSO_TCPV4, 0, 1000, 0, 0))
