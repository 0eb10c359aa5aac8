"""RSS: the Toeplitz hash against Microsoft's published verification vectors ("Verifying the RSS Hash
Calculation", Windows driver docs), the hash input a frame gives for each hash type, and the queue the
indirection table and the send table pick."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest

from vmbus_proto.devices.network import rss

KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")

# (destination, destination port, source, source port, IP-only hash, IP + TCP hash)
IPV4 = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323E8FC2, 0x51CCC178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xD718262A, 0xC626B0EA),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xD2D0A5DE, 0x5C2B394A),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xAFC7327F),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5D1809C5, 0x10E828A2),
]
IPV6 = [
    ("3ffe:2501:200:3::1", 1766, "3ffe:2501:200:1fff::7", 2794, 0x2CC18CD5, 0x40207D3D),
    ("ff02::1", 4739, "3ffe:501:8::260:97ff:fe40:efab", 14230, 0x0F0C461C, 0xDDE51BBF),
    ("fe80::200:f8ff:fe21:67cf", 38024, "3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, 0x4B61E985, 0x02D1FEEF),
]


def tcp_frame(src: str, dst: str, sport: int, dport: int, *, vlan: bool = False, fragment: int = 0) -> bytes:
    """An Ethernet frame with an IPv4 or IPv6 header and a TCP header's ports (checksums are not looked at)."""
    s, d = ip_address(src), ip_address(dst)
    tcp = struct.pack(">HHII", sport, dport, 1, 0) + bytes(8)
    if s.version == 4:
        ip = struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, fragment, 64, 6, 0) + s.packed + d.packed
        ethertype = b"\x08\x00"
    else:
        ip = struct.pack(">IHBB", 6 << 28, len(tcp), 6, 64) + s.packed + d.packed
        ethertype = b"\x86\xdd"
    tag = b"\x81\x00\x00\x05" if vlan else b""
    return b"\x02" * 6 + b"\x04" * 6 + tag + ethertype + ip + tcp


@pytest.mark.parametrize("dst, dport, src, sport, ip_hash, tcp_hash", IPV4 + IPV6)
def test_microsoft_verification_vectors(dst: str, dport: int, src: str, sport: int, ip_hash: int,
                                        tcp_hash: int) -> None:
    toeplitz = rss.Toeplitz(KEY)
    addresses = ip_address(src).packed + ip_address(dst).packed
    assert toeplitz.hash(addresses) == ip_hash, f"IP-only hash of {src} -> {dst}"
    assert toeplitz.hash(addresses + struct.pack(">HH", sport, dport)) == tcp_hash, f"TCP hash of {src} -> {dst}"
    # The same values through a frame and the hash types Linux asks for.
    config = rss.RssConfig(rss.LINUX_HASH_INFO, KEY, (0,))
    assert config.hash(tcp_frame(src, dst, sport, dport)) == tcp_hash
    ip_only = rss.RssConfig(rss.NDIS_HASH_FUNC_TOEPLITZ | rss.NDIS_HASH_IPV4 | rss.NDIS_HASH_IPV6, KEY, (0,))
    assert ip_only.hash(tcp_frame(src, dst, sport, dport, vlan=True)) == ip_hash


def test_hash_input_per_type() -> None:
    frame = tcp_frame("10.0.0.1", "10.0.0.2", 1000, 80)
    assert rss.hash_input(frame) == bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">HH", 1000, 80)
    # A fragment has no ports to hash: the addresses only.
    assert rss.hash_input(tcp_frame("10.0.0.1", "10.0.0.2", 1000, 80, fragment=0x2000)) == bytes([10, 0, 0, 1,
                                                                                                  10, 0, 0, 2])
    assert rss.hash_input(frame, rss.NDIS_HASH_FUNC_TOEPLITZ | rss.NDIS_HASH_IPV6) is None, "no IPv4 type asked"
    arp = b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + bytes(28)
    assert rss.hash_input(arp) is None and rss.hash_input(frame[:20]) is None
    udp = bytearray(frame)
    udp[14 + 9] = 17
    assert rss.hash_input(bytes(udp)) == bytes([10, 0, 0, 1, 10, 0, 0, 2]), "UDP hashes as IPv4 (no UDP type)"
    assert rss.hash_types_text(rss.LINUX_HASH_INFO) == "ipv4,tcp4,ipv6,tcp6"


def test_queue_choice_follows_the_indirection_table() -> None:
    table = tuple(i % 4 for i in range(128))
    config = rss.RssConfig(rss.LINUX_HASH_INFO, KEY, table)
    frame = tcp_frame("66.9.149.187", "161.142.100.80", 2794, 1766)
    assert config.queue(frame) == table[0x51CCC178 % 128] == 0x51CCC178 % 4
    assert config.queue(b"\xff" * 12 + b"\x08\x06" + bytes(28)) == 0, "nothing to hash: queue 0"
    spread = {config.queue(tcp_frame("10.0.0.1", "10.0.0.2", 20000 + i, 80)) for i in range(64)}
    assert spread == {0, 1, 2, 3}, f"64 flows reached queues {spread}"
    assert rss.send_queue(tuple(i % 4 for i in range(16)), 0x51CCC178) == 0x51CCC178 % 16 % 4
    assert rss.send_queue((), 5) == 0 and rss.send_queue((1,) * 16, None) == 0
    with pytest.raises(ValueError):
        rss.RssConfig(rss.LINUX_HASH_INFO, KEY, ())
