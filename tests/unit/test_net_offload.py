"""Offload metadata across VMBus: virtio-net header <-> RNDIS per-packet info (``offload.py``), and the NIC's
software fallback for a device without offloads."""

from __future__ import annotations

import struct

import pytest

from child_partition.devices.network.nic import LoopHub
from vmbus_proto.devices.network import offload, rndis, vnet

SRC, DST = bytes([169, 254, 1, 1]), bytes([169, 254, 1, 2])
MAC_A, MAC_B = b"\x02\x00\x00\x00\x00\x0a", b"\x02\x00\x00\x00\x00\x0b"


def tcp_frame(payload: int, partial: bool = True) -> bytes:
    """Ethernet + IPv4 + TCP (ACK|PSH) with ``payload`` bytes; the TCP checksum holds the pseudo-header sum
    (``partial``, as the kernel hands a NEEDS_CSUM frame) or the full checksum."""
    data = bytes(i & 0xFF for i in range(payload))
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 1, 5 << 4, 0x18, 65535, 0, 0)) + data
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 7, 0, 64, 6, 0, SRC, DST))
    struct.pack_into("!H", ip, 10, vnet.checksum(ip))
    pseudo = vnet.csum_add(SRC + DST, 6 + len(tcp))
    struct.pack_into("!H", tcp, 16, pseudo if partial else vnet.checksum(tcp, pseudo))
    return MAC_B + MAC_A + b"\x08\x00" + bytes(ip) + bytes(tcp)


def tcp_checksum_ok(frame: bytes) -> bool:
    tcp = frame[34:]
    return vnet.checksum(tcp, vnet.csum_add(frame[26:34], 6 + len(tcp))) == 0


CSUM = vnet.VnetHdr(vnet.F_NEEDS_CSUM, csum_start=34, csum_offset=16)


def test_needs_csum_becomes_the_tx_checksum_ppi_and_back() -> None:
    frame = tcp_frame(100)
    info = offload.to_info(frame, CSUM)
    tx = rndis.TxChecksum.from_value(info.checksum or 0)
    assert tx.is_ipv4 and tx.tcp and tx.tcp_header_offset == 34 and info.lso is None
    assert offload.from_tx_info(frame, info) == CSUM


def test_tcp_gso_becomes_lsov2_with_the_mss_and_back() -> None:
    frame = tcp_frame(20000)
    gso = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    info = offload.to_info(frame, gso)
    assert info.lso == rndis.LsoV2(1448, 34, ipv6=False)
    assert offload.from_tx_info(frame, info) == gso


def test_a_large_send_crosses_vmbus_in_ndis_convention_and_leaves_in_the_kernels() -> None:
    frame = tcp_frame(20000)
    lso = rndis.LsoV2(1448, 34)
    wire = offload.to_lso_frame(frame, lso)
    tot_len, ip_check = struct.unpack_from("!H6xH", wire, 16)
    assert (tot_len, ip_check) == (0, 0), "netvsc_xmit sends an LSOv2 frame with IP total length and checksum 0"
    assert struct.unpack_from("!H", wire, 50)[0] == vnet.csum_add(SRC + DST, 6), \
        "the TCP checksum field must be the pseudo-header sum without the TCP length"
    assert offload.from_lso_frame(wire, lso) == frame, "the host must restore the kernel's GSO convention"
    assert offload.from_lso_frame(frame, lso) == frame, "a frame already in the kernel's convention stays"
    segments = vnet.segment_tcp(offload.from_lso_frame(wire, lso), offload.from_tx_info(wire, rndis.PacketInfo(
        lso=lso)) or vnet.NO_OFFLOAD, 1500)
    assert len(segments) == 14 and all(tcp_checksum_ok(s) for s in segments)


def test_an_lso_frame_that_is_not_tcp_at_its_offset_is_left_alone() -> None:
    frame = tcp_frame(3000)
    assert offload.to_lso_frame(frame, rndis.LsoV2(1448, 40)) == frame
    assert offload.from_lso_frame(frame[:30], rndis.LsoV2(1448, 34)) == frame[:30]


def test_udp_fragmentation_offload_has_no_ppi() -> None:
    with pytest.raises(ValueError, match="only TCP LSOv2"):
        offload.to_info(tcp_frame(100), vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_UDP, 42, 1400, 34, 6))


def test_partial_checksum_towards_a_guest_with_and_without_rx_offload() -> None:
    frame = tcp_frame(100)
    same, info = offload.to_rx(frame, CSUM, rx_csum=True)
    assert same == frame and info.checksum == rndis.RX_IP_OK | rndis.RX_TCP_OK
    done, info = offload.to_rx(frame, CSUM, rx_csum=False)
    assert info == rndis.NO_INFO and tcp_checksum_ok(done), "without RX offload the checksum must be completed"


def test_checksum_ok_is_written_to_a_tap_as_a_partial_checksum() -> None:
    full = tcp_frame(100, partial=False)
    out, hdr = offload.from_rx_info(full, rndis.PacketInfo(checksum=rndis.RX_IP_OK | rndis.RX_TCP_OK), 1500)
    assert hdr == CSUM, "tun ignores DATA_VALID: a verified checksum must go as NEEDS_CSUM"
    assert out == tcp_frame(100, partial=True)
    assert offload.from_rx_info(full, rndis.NO_INFO, 1500) == (full, None)


def test_a_coalesced_frame_becomes_a_gso_frame_for_the_tap() -> None:
    big = tcp_frame(30000, partial=False)
    out, hdr = offload.from_rx_info(big, rndis.PacketInfo(checksum=rndis.RX_IP_OK | rndis.RX_TCP_OK), 1500)
    assert hdr is not None and hdr.gso_type == vnet.GSO_TCPV4 and hdr.gso_size == 1460 and hdr.hdr_len == 54
    segments = vnet.segment_tcp(out, hdr, 1500)
    assert len(segments) == 21 and all(tcp_checksum_ok(s) for s in segments)


async def test_a_nic_without_offloads_cuts_and_completes_in_software() -> None:
    hub = LoopHub()
    a, b = hub.attach(MAC_A), hub.attach(MAC_B)
    gso = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    assert a.send_nowait(tcp_frame(5000), gso)
    assert a.send_nowait(tcp_frame(100), CSUM)
    got = [await b.recv() for _ in range(5)]
    assert [len(f) - 54 for f in got] == [1448, 1448, 1448, 656, 100]
    assert all(tcp_checksum_ok(f) for f in got)
    with pytest.raises(ValueError, match="does not fit"):
        a.send_nowait(tcp_frame(5000))  # a large frame without GSO metadata
