"""The network data path's fast paths say exactly what the general codecs say (issue 9, "Speed"): NVSP
SEND_RNDIS_PKT and its completion without message objects, PACKET_MSG headers checked once and looked up,
transfer-page packets through the envelope without a step per range, the stream receive view's one-join
take, and the guest reading its receive buffer in place (and copying the pieces of a coalesced frame that
goes on in a later packet)."""

from __future__ import annotations

import pytest

from bench.net_path import Pair, tcp_frame
from parent_partition.devices.network.vsp import StreamReceiveView
from vmbus_proto.devices.network import nvsp, rndis
from vmbus_proto.devices.network.buffers import ByteBuffer
from vmbus_proto.envelope import decode_packet, encode_packet
from vmbus_proto.errors import PacketError
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, Packet, PacketType


@pytest.mark.parametrize("size", [nvsp.PACKET_SIZE_V1, nvsp.PACKET_SIZE_V61, nvsp.NVSP_MESSAGE_SIZE])
def test_send_rndis_packet_and_completion_codecs_match_the_message_classes(size: int) -> None:
    assert nvsp.pack_rndis_packet(1, 7, 300, size) == nvsp.encode(nvsp.SendRndisPacket(1, 7, 300), size)
    assert nvsp.unpack_rndis_packet(nvsp.pack_rndis_packet(0, nvsp.NO_SECTION, 0, size)) == (0, nvsp.NO_SECTION, 0)
    for status in (nvsp.Status.SUCCESS, nvsp.Status.FAIL):
        done = nvsp.rndis_packet_complete(status, size)
        assert done == nvsp.encode(nvsp.SendRndisPacketComplete(status), size)
        assert nvsp.unpack_rndis_packet_complete(done) == status


def test_other_and_short_nvsp_messages_are_not_taken_for_the_data_path() -> None:
    other = nvsp.encode(nvsp.RevokeSendBuffer(nvsp.SEND_BUFFER_ID))
    assert nvsp.unpack_rndis_packet(other) is None, "a REVOKE_SEND_BUF read as SEND_RNDIS_PKT"
    assert nvsp.unpack_rndis_packet(nvsp.pack_rndis_packet(0, 1, 2)[:12]) is None, "a short message accepted"
    assert nvsp.unpack_rndis_packet_complete(nvsp.encode(nvsp.SendSendBufferComplete(1, 6144))) is None


def test_a_known_packet_header_still_has_its_length_checked() -> None:
    chain = rndis.pack_ppis(rndis.PacketInfo(rsc=rndis.RscId(0)).ppis())
    message = rndis.pack_packet(bytes(range(200)), chain)
    frame, info = rndis.unpack_packet_view(message)  # checked, then remembered
    assert bytes(frame) == bytes(range(200)) and info.rsc == rndis.RscId(0)
    frame, _ = rndis.unpack_packet_view(message + b"tail")  # bytes after msg_len are ignored
    assert bytes(frame) == bytes(range(200))
    with pytest.raises(rndis.RndisError, match="does not fit"):
        rndis.unpack_packet_view(message[:-1])  # the same header, one byte short
    with pytest.raises(rndis.RndisError, match="OOB"):
        rndis.unpack_packet_view(message[:24] + b"\1" + message[25:])  # oob_len != 0 is never remembered


def test_transfer_page_packets_through_the_envelope() -> None:
    pkt = Packet(PacketType.DATA_USING_XFER_PAGES, FLAG_COMPLETION_REQUESTED, 17, nvsp.pack_rndis_packet(0, 0, 0),
                 xfer_pageset_id=nvsp.RECEIVE_BUFFER_ID, xfer_ranges=((100, 0), (60, 1806)))
    body = encode_packet(pkt)
    assert decode_packet(body, b"x" * 160, 64 * 1024) == Packet(pkt.type, pkt.flags, 17, pkt.payload, data=b"x" * 160,
                                                                 xfer_pageset_id=pkt.xfer_pageset_id,
                                                                 xfer_ranges=pkt.xfer_ranges)
    bad = body.replace(bytes([0x92, 100, 0]), bytes([0x93, 100, 0, 0]))  # one range of three numbers
    assert bad != body
    with pytest.raises(PacketError, match="transfer-page range"):
        decode_packet(bad, b"", 64 * 1024)


def test_stream_receive_view_takes_in_order_and_out_of_order() -> None:
    view = StreamReceiveView()
    view.write(0, b"aa")
    view.write_many([1806, 3612], [b"bbb", b"c"])
    view.write(5418, b"dd")
    assert view.read(1806, 2) == b"bb"
    assert view.take(((2, 0), (3, 1806))) == b"aabbb"  # the oldest writes, in order: one join
    assert view.take(((2, 5418), (1, 3612))) == b"ddc"  # not in write order: looked up one by one
    view.write(7224, b"never taken")
    view.write(0, b"next")
    assert view.take(((4, 0),)) == b"next", "a write left behind spoiled the next packet's bytes"
    assert view.take(((1, 9999),)) == b"", "an offset never written gave bytes"


def test_guest_reads_in_place_and_keeps_pieces_of_a_frame_that_goes_on() -> None:
    for mapped in (True, False):
        pair = Pair()
        if not mapped:
            pair.guest.recv_view = _Unmapped(pair.recv)
        frame = tcp_frame(20_000)
        pair.host.deliver([(frame, rndis.PacketInfo(checksum=rndis.RX_IP_OK | rndis.RX_TCP_OK))])
        (whole,) = pair.host.data_to_send()
        ranges = whole.xfer_ranges
        assert len(ranges) > 3, "the frame was not coalesced across sub-allocations"
        first = Packet(whole.type, whole.flags, whole.trans_id, whole.payload, xfer_pageset_id=whole.xfer_pageset_id,
                       xfer_ranges=ranges[:2])
        rest = Packet(whole.type, whole.flags, whole.trans_id + 100_000, whole.payload,
                      xfer_pageset_id=whole.xfer_pageset_id, xfer_ranges=ranges[2:])
        assert pair.guest.receive(first) == [], "a frame was reported before its last piece"
        for length, offset in ranges[:2]:
            pair.recv.data[offset:offset + length] = bytes(length)  # the host reuses the completed pieces
        (event,) = pair.guest.receive(rest)
        assert [f for f, _ in event.frames] == [frame], f"mapped={mapped}: the coalesced frame came out different"


class _Unmapped:
    """A receive buffer the guest can only ``read`` (no ``mapping``)."""

    def __init__(self, buf: ByteBuffer) -> None:
        self.buf = buf

    def read(self, offset: int, length: int) -> bytes:
        return self.buf.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.buf.write(offset, data)
