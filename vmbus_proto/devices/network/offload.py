"""Offload metadata between a TAP's ``virtio_net_hdr`` (``vnet.VnetHdr``) and RNDIS per-packet info
(``rndis.PacketInfo``), both directions, sans-IO.

Mirrors what Linux's netvsc does with an skb (drivers/net/hyperv/netvsc_drv.c ``netvsc_xmit``: a GSO skb gets
the LSOv2 PPI with its ``gso_size`` as MSS and the TCP header offset, a ``CHECKSUM_PARTIAL`` skb the TCP/IP
checksum PPI; ``netvsc_recv`` / ``netvsc_alloc_recv_skb``: the RX checksum-OK bits make the skb
``CHECKSUM_UNNECESSARY``, an RSC-coalesced frame becomes one large skb) and what OpenVMM's netvsp does on the
host (``TxMetadata`` flags from the PPIs; ``RxMetadata`` checksum state to PPIs).

Semantics kept end to end: on the switch and on a TAP a GSO frame is in the kernel's convention (IP lengths
set, the TCP checksum field the pseudo-header sum with the TCP length, as ``tcp_v4_send_check`` leaves it); on
VMBus an LSOv2 frame is in NDIS's (IPv4 total length and header checksum 0, IPv6 payload length 0, the
pseudo-header sum without the TCP length, as ``netvsc_xmit`` writes it): ``to_lso_frame`` and
``from_lso_frame`` convert. A ``NEEDS_CSUM`` frame's checksum is completed only where a receiver cannot take it
partial.
"""

from __future__ import annotations

import struct

from . import rndis, vnet

TCP_CSUM_OFFSET = 16  # offsetof(struct tcphdr, check)
UDP_CSUM_OFFSET = 6   # offsetof(struct udphdr, check)
_RX_OK = rndis.RX_TCP_OK | rndis.RX_UDP_OK | rndis.RX_IP_OK
# NDIS_OFFLOAD_PARAMETERS_RX_ENABLED_TX_DISABLED (3) and _TX_RX_ENABLED (4): the guest verifies nothing itself.
_RX_ON = (3, 4)
_CSUM = struct.Struct("!H")


def _l3(frame: bytes) -> tuple[int, int]:
    """(offset of the IP header, ethertype), past one 802.1Q tag."""
    if len(frame) >= 18 and frame[12:14] == b"\x81\x00":
        return 18, int.from_bytes(frame[16:18], "big")
    return 14, int.from_bytes(frame[12:14], "big") if len(frame) >= 14 else 0


def _l4(frame: bytes) -> tuple[int, bool, int] | None:
    """(L4 offset, is IPv4, IP protocol) of an IPv4/IPv6 frame, None for anything else or a truncated one."""
    l3, ethertype = _l3(frame)
    if ethertype == vnet.ETH_P_IP and len(frame) >= l3 + 20:
        return l3 + (frame[l3] & 0x0F) * 4, True, frame[l3 + 9]
    if ethertype == vnet.ETH_P_IPV6 and len(frame) >= l3 + 40:
        return l3 + 40, False, frame[l3 + 6]
    return None


def to_info(frame: bytes, hdr: vnet.VnetHdr | None) -> rndis.PacketInfo:
    """The transmit PPIs for a frame a TAP (or the switch) gives with ``hdr``: LSOv2 for a TCP GSO frame,
    the TX checksum request for ``NEEDS_CSUM``; no PPI without offload. ValueError for metadata RNDIS cannot
    carry (UDP fragmentation offload, a checksum at an unknown offset)."""
    if hdr is None or hdr == vnet.NO_OFFLOAD:
        return rndis.NO_INFO
    kind = hdr.gso_type & ~vnet.GSO_ECN
    layout = _l4(frame)
    if kind in (vnet.GSO_TCPV4, vnet.GSO_TCPV6):
        start = hdr.csum_start if hdr.flags & vnet.F_NEEDS_CSUM else (layout[0] if layout else 0)
        if not start or not hdr.gso_size:
            raise ValueError("TCP GSO frame without its TCP header offset or MSS")
        return rndis.PacketInfo(lso=rndis.LsoV2(hdr.gso_size, start, kind == vnet.GSO_TCPV6))
    if kind != vnet.GSO_NONE:
        raise ValueError(f"GSO type {hdr.gso_type:#x} has no RNDIS per-packet info (only TCP LSOv2)")
    if not hdr.flags & vnet.F_NEEDS_CSUM:
        return rndis.NO_INFO  # DATA_VALID only means something on receive
    tcp = hdr.csum_offset == TCP_CSUM_OFFSET
    if (not tcp and hdr.csum_offset != UDP_CSUM_OFFSET) or layout is None or layout[0] != hdr.csum_start:
        raise ValueError(f"checksum offload at {hdr.csum_start}+{hdr.csum_offset} is not an IP frame's TCP/UDP")
    ipv4 = layout[1]
    return rndis.PacketInfo(checksum=rndis.TxChecksum(ipv4, not ipv4, tcp, not tcp, False, hdr.csum_start).value())


def _lso_layout(frame: bytes, start: int) -> tuple[int, bool] | None:
    """(IP header offset, is IPv4) of a TCP frame whose TCP header is at ``start``; None when it is not one."""
    layout = _l4(frame)
    if layout is None or layout[0] != start or layout[2] != vnet.IPPROTO_TCP or len(frame) < start + 20:
        return None
    return _l3(frame)[0], layout[1]


def _set_lso_fields(frame: bytes, start: int, ndis: bool) -> bytes:
    found = _lso_layout(frame, start)
    if found is None:
        return frame  # not TCP where the offset says: the switch counts it when it cannot cut it
    l3, ipv4 = found
    out = bytearray(frame)
    l4_len = len(frame) - start
    if ipv4:
        struct.pack_into("!H", out, l3 + 2, 0 if ndis else len(frame) - l3)
        struct.pack_into("!H", out, l3 + 10, 0)
        if not ndis:
            struct.pack_into("!H", out, l3 + 10, vnet.checksum(memoryview(out)[l3:start]))
        addrs = frame[l3 + 12:l3 + 20]
    else:
        struct.pack_into("!H", out, l3 + 4, 0 if ndis else len(frame) - l3 - 40)
        addrs = frame[l3 + 8:l3 + 40]
    struct.pack_into("!H", out, start + TCP_CSUM_OFFSET,
                     vnet.csum_add(addrs, vnet.IPPROTO_TCP + (0 if ndis else l4_len)))
    return bytes(out)


def to_lso_frame(frame: bytes, lso: rndis.LsoV2) -> bytes:
    """A GSO frame as ``netvsc_xmit`` hands it to the host with the LSOv2 PPI: IPv4 total length and header
    checksum 0 (IPv6 payload length 0), the TCP checksum field ``~csum_tcpudp_magic(saddr, daddr, 0, TCP, 0)``."""
    return _set_lso_fields(frame, lso.tcp_header_offset, ndis=True)


def from_lso_frame(frame: bytes, lso: rndis.LsoV2) -> bytes:
    """An LSOv2 frame from a guest in the kernel's GSO convention (the lengths from the frame, the pseudo-header
    sum with the TCP length), as a host stack takes a large send: what the switch, a TAP and a coalescing
    receiver expect. Frames already in that convention come out unchanged."""
    return _set_lso_fields(frame, lso.tcp_header_offset or (_l4(frame) or (0, True, 0))[0], ndis=False)


def _gso_hdr(frame: bytes, start: int, mss: int, ipv6: bool, flags: int) -> vnet.VnetHdr:
    hdr_len = start + (frame[start + 12] >> 4) * 4 if len(frame) > start + 12 else start
    # LSOv2's mss has 20 bits, virtio-net's gso_size 16: a larger MSS than any frame cuts it the same way.
    return vnet.VnetHdr(flags, vnet.GSO_TCPV6 if ipv6 else vnet.GSO_TCPV4, hdr_len, min(mss, 0xFFFF), start,
                        TCP_CSUM_OFFSET)


def from_tx_info(frame: bytes, info: rndis.PacketInfo) -> vnet.VnetHdr | None:
    """What a guest's transmit PPIs mean for the switch: a TCP GSO frame for LSOv2, ``NEEDS_CSUM`` for a TX
    checksum request on TCP/UDP; None when the frame is complete as it is."""
    if info.lso is not None:
        lso = info.lso
        start = lso.tcp_header_offset or (_l4(frame) or (0, True, 0))[0]
        return _gso_hdr(frame, start, lso.mss, lso.ipv6, vnet.F_NEEDS_CSUM)
    if info.checksum is None:
        return None
    tx = rndis.TxChecksum.from_value(info.checksum)
    if not (tx.tcp or tx.udp):
        return None
    layout = _l4(frame)
    start = tx.tcp_header_offset or (layout[0] if layout else 0)
    if not start:
        return None
    return vnet.VnetHdr(vnet.F_NEEDS_CSUM, csum_start=start,
                        csum_offset=TCP_CSUM_OFFSET if tx.tcp else UDP_CSUM_OFFSET)


def rx_checksum_offloaded(offload: tuple[int, ...]) -> bool:
    """Whether the guest's SET OFFLOAD_PARAMETERS turned on TCP receive checksum offload (IPv4 or IPv6)."""
    return len(offload) >= 4 and (offload[1] in _RX_ON or offload[3] in _RX_ON)


def to_rx(frame: bytes, hdr: vnet.VnetHdr | None, rx_csum: bool) -> tuple[bytes, rndis.PacketInfo]:
    """A frame from the switch for a guest (not a GSO frame; those are cut or coalesced first): with RX
    checksum offload a partial or verified checksum is reported OK in the checksum PPI, as Hyper-V reports
    what the vSwitch knows; without it a partial checksum is completed in software."""
    if hdr is None or not hdr.flags & (vnet.F_NEEDS_CSUM | vnet.F_DATA_VALID):
        return frame, rndis.NO_INFO
    if not rx_csum:
        return vnet.complete(frame, hdr), rndis.NO_INFO
    layout = _l4(frame)
    if layout is None:
        return vnet.complete(frame, hdr), rndis.NO_INFO
    bits = rndis.RX_IP_OK if layout[1] else 0
    if layout[2] == vnet.IPPROTO_TCP:
        bits |= rndis.RX_TCP_OK
    elif layout[2] == vnet.IPPROTO_UDP:
        bits |= rndis.RX_UDP_OK
    return frame, rndis.PacketInfo(checksum=bits)


def from_rx_info(frame: bytes, info: rndis.PacketInfo, mtu: int) -> tuple[bytes, vnet.VnetHdr | None]:
    """A received frame and its PPIs as a TAP takes them. A TAP ignores ``DATA_VALID`` on write (only
    virtio-net's receive path honours it), so a TCP/UDP frame whose checksum the host reported OK is written
    ``NEEDS_CSUM`` with its checksum field reset to the pseudo-header sum (``CHECKSUM_PARTIAL``: the kernel
    takes it as verified, and completes it correctly should it forward the frame). A coalesced (RSC) TCP frame
    longer than the MTU becomes a TCP GSO frame (MSS from the MTU), one GRO packet for the kernel."""
    ok = info.checksum is not None and bool(info.checksum & _RX_OK)
    l3, _ = _l3(frame)
    large = len(frame) - l3 > mtu
    if not ok and not large:
        return frame, None
    layout = _l4(frame)
    if layout is None:
        return frame, None
    start, ipv4, proto = layout
    if proto == vnet.IPPROTO_TCP and len(frame) >= start + 20:
        offset = TCP_CSUM_OFFSET
        if large:
            hdr_len = start + (frame[start + 12] >> 4) * 4  # _gso_hdr's header length, MSS from the MTU
            hdr = _gso_hdr(frame, start, mtu - (hdr_len - l3), not ipv4, vnet.F_NEEDS_CSUM)
        else:
            hdr = vnet.VnetHdr(vnet.F_NEEDS_CSUM, csum_start=start, csum_offset=offset)
    elif proto == vnet.IPPROTO_UDP and not large and len(frame) >= start + 8:
        offset = UDP_CSUM_OFFSET
        hdr = vnet.VnetHdr(vnet.F_NEEDS_CSUM, csum_start=start, csum_offset=offset)
    else:
        return frame, None  # a large non-TCP frame, or checksums the TAP cannot be told about: as it is
    addrs = frame[l3 + 12:l3 + 20] if ipv4 else frame[l3 + 8:l3 + 40]
    at = start + offset  # the checksum field, rewritten in the one copy the frame gets
    csum = _CSUM.pack(vnet.csum_add(addrs, proto + len(frame) - start))
    return b"".join((memoryview(frame)[:at], csum, memoryview(frame)[at + 2:])), hdr
