"""Lab 2, part A: the guest's GPADL split (reference solution).

Linux drivers/hv/channel.c ``create_gpadl_header`` and ``vmbus_establish_gpadl``: one range (byte_offset 0,
byte_count = the buffer's size), 26 PFNs in the GPADL_HEADER message and 28 in each GPADL_BODY after it, each
message at most 240 bytes (include/linux/hyperv.h ``struct vmbus_channel_gpadl_header``,
``struct vmbus_channel_gpadl_body``, ``struct gpa_range``).
"""

from __future__ import annotations

import struct

from vmbus_proto.messages import GpadlBody, GpadlHeader

PAGE_SIZE = 4096
MAX_MESSAGE = 240  # HV_MESSAGE_PAYLOAD_BYTE_COUNT: what one HvPostMessage carries
MESSAGE_HEADER = struct.Struct("<II")  # struct vmbus_channel_message_header: msgtype, padding
CHANNELMSG_GPADL_HEADER = 8
CHANNELMSG_GPADL_BODY = 9
HEADER_FIXED = struct.Struct("<IIHH")  # child_relid, gpadl, range_buflen, rangecount
RANGE = struct.Struct("<II")  # struct gpa_range: byte_count, byte_offset (then its pfn_array)
BODY_FIXED = struct.Struct("<II")  # msgnumber, gpadl
PFN = struct.Struct("<Q")

# 240 - 8 - 12 = 220 bytes after the fixed part: 27 u64 slots, one of which the range header takes.
HEADER_PFNS = (MAX_MESSAGE - MESSAGE_HEADER.size - HEADER_FIXED.size - RANGE.size) // PFN.size  # 26
BODY_PFNS = (MAX_MESSAGE - MESSAGE_HEADER.size - BODY_FIXED.size) // PFN.size  # 28
MAX_PFNS = (0xFFFF - RANGE.size) // PFN.size  # range_buflen is a u16: 8190 pages


def split(relid: int, gpadl: int, pfns: list[int] | tuple[int, ...]) -> tuple[GpadlHeader, list[GpadlBody]]:
    """The messages that share ``pfns`` (4 KiB guest page numbers) with the host as GPADL ``gpadl`` of
    channel ``relid``: one GPADL_HEADER and as many GPADL_BODY messages as the rest needs."""
    if not pfns:
        raise ValueError("a GPADL needs at least one page")
    if len(pfns) > MAX_PFNS:
        raise ValueError(f"{len(pfns)} pages do not fit range_buflen (a u16): at most {MAX_PFNS}")
    header = GpadlHeader(child_relid=relid, gpadl=gpadl, range_buflen=RANGE.size + PFN.size * len(pfns),
                         rangecount=1, ranges=((len(pfns) * PAGE_SIZE, 0),), pfns=tuple(pfns[:HEADER_PFNS]))
    bodies = [GpadlBody(msgnumber=0, gpadl=gpadl, pfns=tuple(pfns[i:i + BODY_PFNS]))
              for i in range(HEADER_PFNS, len(pfns), BODY_PFNS)]
    return header, bodies


def encode_header(msg: GpadlHeader) -> bytes:
    """``msg`` as the bytes Linux posts: the message header, the fixed part, each range and its PFNs."""
    out = bytearray(MESSAGE_HEADER.pack(CHANNELMSG_GPADL_HEADER, 0))
    out += HEADER_FIXED.pack(msg.child_relid, msg.gpadl, msg.range_buflen, msg.rangecount)
    (byte_count, byte_offset), = msg.ranges
    out += RANGE.pack(byte_count, byte_offset)
    for pfn in msg.pfns:
        out += PFN.pack(pfn)
    return bytes(out)


def encode_body(msg: GpadlBody) -> bytes:
    """``msg`` as the bytes Linux posts: the message header, msgnumber, gpadl, the PFNs."""
    out = bytearray(MESSAGE_HEADER.pack(CHANNELMSG_GPADL_BODY, 0))
    out += BODY_FIXED.pack(msg.msgnumber, msg.gpadl)
    for pfn in msg.pfns:
        out += PFN.pack(pfn)
    return bytes(out)
