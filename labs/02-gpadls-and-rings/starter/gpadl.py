"""Lab 2, part A: the guest's GPADL split. Write the three functions below (the handout explains each field).

Mirror Linux drivers/hv/channel.c ``create_gpadl_header`` and ``vmbus_establish_gpadl``; the structs are in
include/linux/hyperv.h (``struct vmbus_channel_message_header``, ``struct vmbus_channel_gpadl_header``,
``struct vmbus_channel_gpadl_body``, ``struct gpa_range``). ``make grade LAB=2`` checks your work against the
project's own core (vmbus_proto/gpadl.py) and against numbers worked out from Linux.
"""

from __future__ import annotations

from vmbus_proto.messages import GpadlBody, GpadlHeader

PAGE_SIZE = 4096
MAX_MESSAGE = 240  # HV_MESSAGE_PAYLOAD_BYTE_COUNT: the most one channel message (HvPostMessage) carries
CHANNELMSG_GPADL_HEADER = 8
CHANNELMSG_GPADL_BODY = 9


def split(relid: int, gpadl: int, pfns: list[int] | tuple[int, ...]) -> tuple[GpadlHeader, list[GpadlBody]]:
    """The messages that share ``pfns`` (4 KiB guest page numbers, in order) with the host as GPADL ``gpadl``
    of channel ``relid``: one GPADL_HEADER and as many GPADL_BODY messages as the remaining PFNs need.

    * One range, as Linux sends it: byte_offset 0, byte_count = the pages' size in bytes.
    * ``range_buflen``: the bytes of every range descriptor plus its PFN array; ``rangecount``: 1.
    * As many PFNs in the header as fit in one 240-byte message, the rest in bodies, each as full as fits.
    * ``msgnumber``: what Linux puts there (it never sets it).
    * Raise ValueError for an empty list, and for more PFNs than ``range_buflen`` (a u16) can describe.

    Build the messages with ``GpadlHeader(child_relid=..., gpadl=..., range_buflen=..., rangecount=...,
    ranges=((byte_count, byte_offset),), pfns=(...))`` and ``GpadlBody(msgnumber=..., gpadl=..., pfns=(...))``.
    """
    raise NotImplementedError("split()")


def encode_header(msg: GpadlHeader) -> bytes:
    """``msg`` as the bytes the guest posts (little-endian, no padding between fields): the 8-byte message
    header (msgtype u32, padding u32), child_relid u32, gpadl u32, range_buflen u16, rangecount u16, then the
    range (byte_count u32, byte_offset u32) and its PFNs (u64 each)."""
    raise NotImplementedError("encode_header()")


def encode_body(msg: GpadlBody) -> bytes:
    """``msg`` as the bytes the guest posts: the 8-byte message header, msgnumber u32, gpadl u32, the PFNs."""
    raise NotImplementedError("encode_body()")
