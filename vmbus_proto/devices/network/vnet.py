"""Linux's ``struct virtio_net_hdr`` / ``virtio_net_hdr_v1`` (include/uapi/linux/virtio_net.h), sans-IO.

A TAP opened with ``IFF_VNET_HDR`` prefixes every frame with this header (12 bytes after
``TUNSETVNETHDRSZ 12``): checksum offload (``NEEDS_CSUM``: the checksum at ``csum_start + csum_offset`` holds
only the pseudo-header sum and must be completed over ``csum_start``..end; ``DATA_VALID``: already verified)
and GSO (a large TCP/UDP segment of ``gso_size``-byte pieces, ``hdr_len`` bytes of headers). The fields are
little-endian (virtio 1.0 and the host order on x86/arm64).

Also the software fallbacks a receiver without those offloads needs: ``fill_checksum`` completes a partial
checksum as the kernel's ``skb_checksum_help`` does, ``segment_tcp`` cuts a TCP GSO frame into MTU-sized
frames with their IPv4/IPv6 and TCP headers and checksums fixed up as the kernel's ``tcp_gso_segment`` does.
"""

from __future__ import annotations

import dataclasses
import struct

# flags
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
F_RSC_INFO = 4
# gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

HDR_LEN = 10      # struct virtio_net_hdr
HDR_V1_LEN = 12   # struct virtio_net_hdr_v1 (num_buffers added); what TUNSETVNETHDRSZ 12 selects
_HDR = struct.Struct("<BBHHHH")
_HDR_V1 = struct.Struct("<BBHHHHH")

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80


@dataclasses.dataclass(frozen=True, slots=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @property
    def gso(self) -> bool:
        return self.gso_type & ~GSO_ECN != GSO_NONE

    def pack(self, v1: bool = True) -> bytes:
        if v1:
            return _HDR_V1.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                                self.csum_offset, self.num_buffers)
        return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset)

    @classmethod
    def unpack(cls, data: bytes | memoryview, v1: bool = True) -> VnetHdr:
        """The header at the start of ``data``; ValueError when it is short or names unknown flags or types."""
        size = HDR_V1_LEN if v1 else HDR_LEN
        if len(data) < size:
            raise ValueError(f"virtio-net header: {len(data)} bytes, need {size}")
        hdr = cls(*_HDR_V1.unpack_from(data)) if v1 else cls(*_HDR.unpack_from(data))
        if hdr.flags & ~(F_NEEDS_CSUM | F_DATA_VALID | F_RSC_INFO):
            raise ValueError(f"virtio-net header: unknown flags {hdr.flags:#x}")
        if hdr.gso_type & ~GSO_ECN not in (GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4):
            raise ValueError(f"virtio-net header: unknown gso_type {hdr.gso_type:#x}")
        return hdr


NO_OFFLOAD = VnetHdr()
NO_OFFLOAD_V1 = NO_OFFLOAD.pack()


def csum_add(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's-complement sum of ``data`` (big-endian words, odd tail padded) plus ``initial``.

    Uses 2**16 = 1 (mod 0xFFFF): the end-around-carry word sum is the whole number modulo 0xFFFF, which CPython
    computes in C; 0xFFFF stands for a non-zero sum that is 0 modulo 0xFFFF.
    """
    n = int.from_bytes(data, "big") << (8 * (len(data) & 1))
    total = n + initial
    s = total % 0xFFFF
    return 0xFFFF if s == 0 and total else s


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the complement of ``csum_add``."""
    return ~csum_add(data, initial) & 0xFFFF


def fill_checksum(frame: bytes | bytearray, csum_start: int, csum_offset: int) -> bytes:
    """Complete a ``NEEDS_CSUM`` checksum: sum ``csum_start``..end (the field holds the pseudo-header sum) and
    store the complement at ``csum_start + csum_offset`` (``skb_checksum_help``)."""
    pos = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or pos + 2 > len(frame):
        raise ValueError(f"checksum offload: csum_start {csum_start} + csum_offset {csum_offset} outside the "
                         f"{len(frame)}-byte frame")
    out = bytearray(frame)
    struct.pack_into("!H", out, pos, checksum(memoryview(out)[csum_start:]))
    return bytes(out)


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    l3: int          # offset of the IP header
    l4: int          # offset of the TCP header
    payload: int     # offset of the TCP payload
    ipv4: bool


def _tcp_layout(frame: bytes | bytearray) -> _Layout:
    if len(frame) < 14:
        raise ValueError("frame shorter than an Ethernet header")
    l3 = 14
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETH_P_8021Q:
        l3 = 18
        ethertype = int.from_bytes(frame[16:18], "big")
    if ethertype == ETH_P_IP:
        if len(frame) < l3 + 20 or frame[l3] >> 4 != 4:
            raise ValueError("truncated or non-IPv4 header under an IPv4 ethertype")
        l4 = l3 + (frame[l3] & 0x0F) * 4
        proto = frame[l3 + 9]
        ipv4 = True
    elif ethertype == ETH_P_IPV6:
        if len(frame) < l3 + 40 or frame[l3] >> 4 != 6:
            raise ValueError("truncated or non-IPv6 header under an IPv6 ethertype")
        l4 = l3 + 40
        proto = frame[l3 + 6]
        ipv4 = False
    else:
        raise ValueError(f"ethertype {ethertype:#06x} is neither IPv4 nor IPv6")
    if proto != IPPROTO_TCP:
        raise ValueError(f"IP protocol {proto} is not TCP (IPv6 extension headers are not segmented)")
    if len(frame) < l4 + 20:
        raise ValueError("truncated TCP header")
    payload = l4 + (frame[l4 + 12] >> 4) * 4
    if payload < l4 + 20 or payload > len(frame):
        raise ValueError("TCP data offset outside the frame")
    return _Layout(l3, l4, payload, ipv4)


def _pseudo_sum(frame: bytes | bytearray, lay: _Layout, l4_len: int) -> int:
    addrs = frame[lay.l3 + 12:lay.l3 + 20] if lay.ipv4 else frame[lay.l3 + 8:lay.l3 + 40]
    return csum_add(addrs, IPPROTO_TCP + l4_len)


def segment_tcp(frame: bytes | bytearray, hdr: VnetHdr, mtu: int = 1500) -> list[bytes]:
    """Cut a TCP GSO frame into frames of at most ``hdr.gso_size`` payload bytes (and within ``mtu``), each with
    its IP length, IPv4 id and header checksum, TCP sequence number, flags and full TCP checksum fixed up.

    FIN and PSH stay on the last segment only and CWR on the first, as ``tcp_gso_segment`` does. ValueError for
    a frame that is not Ethernet + IPv4/IPv6 + TCP.
    """
    lay = _tcp_layout(frame)
    headers = bytes(frame[:lay.payload])
    data = memoryview(bytes(frame))[lay.payload:]
    ip_hlen = lay.l4 - lay.l3
    tcp_hlen = lay.payload - lay.l4
    mss = min(hdr.gso_size or mtu, mtu - ip_hlen - tcp_hlen)
    if mss <= 0:
        raise ValueError(f"no room for TCP payload: MTU {mtu}, headers {ip_hlen + tcp_hlen} bytes")
    seq0 = int.from_bytes(headers[lay.l4 + 4:lay.l4 + 8], "big")
    flags = headers[lay.l4 + 13]
    ip_id = int.from_bytes(headers[lay.l3 + 4:lay.l3 + 6], "big") if lay.ipv4 else 0
    out: list[bytes] = []
    count = max(1, -(-len(data) // mss))
    for i in range(count):
        chunk = data[i * mss:(i + 1) * mss]
        seg = bytearray(headers)
        seg += chunk
        l4_len = tcp_hlen + len(chunk)
        if lay.ipv4:
            struct.pack_into("!HH", seg, lay.l3 + 2, ip_hlen + l4_len, (ip_id + i) & 0xFFFF)
            struct.pack_into("!H", seg, lay.l3 + 10, 0)
            struct.pack_into("!H", seg, lay.l3 + 10, checksum(seg[lay.l3:lay.l4]))
        else:
            struct.pack_into("!H", seg, lay.l3 + 4, l4_len)
        struct.pack_into("!I", seg, lay.l4 + 4, (seq0 + i * mss) & 0xFFFFFFFF)
        f = flags
        if i < count - 1:
            f &= ~(TCP_FIN | TCP_PSH)
        if i > 0:
            f &= ~TCP_CWR
        seg[lay.l4 + 13] = f
        struct.pack_into("!H", seg, lay.l4 + 16, 0)
        csum = checksum(memoryview(seg)[lay.l4:], _pseudo_sum(seg, lay, l4_len))
        struct.pack_into("!H", seg, lay.l4 + 16, csum)
        out.append(bytes(seg))
    return out


def complete(frame: bytes, hdr: VnetHdr) -> bytes:
    """The frame with a pending ``NEEDS_CSUM`` checksum filled in (unchanged otherwise)."""
    if hdr.flags & F_NEEDS_CSUM:
        return fill_checksum(frame, hdr.csum_start, hdr.csum_offset)
    return frame
