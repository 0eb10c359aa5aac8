"""GPADLs (Guest Physical Address Descriptor Lists): splitting into GPADL_HEADER + GPADL_BODY and back.

Linux drivers/hv/channel.c ``create_gpadl_header`` (one range, byte_offset 0, PFNs in 4 KiB units; 26
PFNs in the header and 28 per body); OpenVMM vmbus_server/src/channels.rs ``GpadlState`` and
vmbus_core ``gparange::parse``; FreeBSD vmbus_reg.h ``VMBUS_CHANMSG_GPADL_CONN_PGMAX 26`` /
``..._SUBCONN_PGMAX 28``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import LocalProtocolError, MessageError
from .messages import GPADL_BODY_MAX_PFNS, GpadlBody, GpadlHeader
from .packets import PAGE_SIZE, pages_spanned

# GPADL handles are chosen by the guest from a global counter (Linux connection.c next_gpadl_handle).
FIRST_GPADL_HANDLE = 0xE1E10
HEADER_SLOTS = 27  # u64 slots after GPADL_HEADER's 20-byte fixed part in a 240-byte message
MAX_PAGES = (0xFFFF - 8) // 8


def split(relid: int, gpadl: int, pfns: list[int] | tuple[int, ...],
          byte_count: int | None = None, byte_offset: int = 0) -> tuple[GpadlHeader, list[GpadlBody]]:
    """One range over ``pfns`` as Linux sends it: a header with up to 26 PFNs, then 28-PFN bodies."""
    if not pfns:
        raise ValueError("a GPADL needs at least one page")
    if 8 + 8 * len(pfns) > 0xFFFF:
        # range_buflen is a u16 (Linux vmbus_channel_gpadl_header): 8190 pages is the most one GPADL holds.
        raise LocalProtocolError(f"a GPADL of {len(pfns)} pages does not fit range_buflen (at most {MAX_PAGES})")
    if byte_count is None:
        byte_count = len(pfns) * PAGE_SIZE
    first = HEADER_SLOTS - 1
    header = GpadlHeader(child_relid=relid, gpadl=gpadl, range_buflen=8 + 8 * len(pfns), rangecount=1,
                         ranges=((byte_count, byte_offset),), pfns=tuple(pfns[:first]))
    bodies = [GpadlBody(msgnumber=0, gpadl=gpadl, pfns=tuple(pfns[i:i + GPADL_BODY_MAX_PFNS]))
              for i in range(first, len(pfns), GPADL_BODY_MAX_PFNS)]
    return header, bodies


@dataclass(slots=True)
class GpadlAssembly:
    """A GPADL whose header arrived and whose bodies may still be coming (OpenVMM ``InProgress``)."""

    relid: int
    gpadl: int
    ranges: tuple[tuple[int, int], ...]
    expected_pfns: int
    pfns: list[int] = field(default_factory=list)

    @classmethod
    def from_header(cls, msg: GpadlHeader) -> GpadlAssembly:
        if msg.rangecount != len(msg.ranges) or not msg.ranges:
            raise MessageError(f"GPADL {msg.gpadl:#x}: rangecount {msg.rangecount} with "
                               f"{len(msg.ranges)} ranges")
        expected = 0
        for byte_count, byte_offset in msg.ranges:
            if byte_count == 0:
                raise MessageError(f"GPADL {msg.gpadl:#x}: empty range")
            if byte_offset >= PAGE_SIZE:
                raise MessageError(f"GPADL {msg.gpadl:#x}: byte_offset {byte_offset} beyond a page")
            expected += pages_spanned(byte_offset, byte_count)
        if msg.range_buflen != 8 * len(msg.ranges) + 8 * expected:
            raise MessageError(f"GPADL {msg.gpadl:#x}: range_buflen {msg.range_buflen} does not match "
                               f"{len(msg.ranges)} ranges of {expected} pages")
        if len(msg.ranges) + len(msg.pfns) > HEADER_SLOTS:
            raise MessageError(f"GPADL {msg.gpadl:#x}: header carries more than {HEADER_SLOTS} slots")
        asm = cls(msg.child_relid, msg.gpadl, msg.ranges, expected)
        asm.add(msg.pfns)
        return asm

    def add(self, pfns: tuple[int, ...]) -> None:
        if len(self.pfns) + len(pfns) > self.expected_pfns:
            raise MessageError(f"GPADL {self.gpadl:#x}: {len(self.pfns) + len(pfns)} PFNs for "
                               f"{self.expected_pfns} pages")
        self.pfns.extend(pfns)

    @property
    def complete(self) -> bool:
        return len(self.pfns) == self.expected_pfns


@dataclass(slots=True)
class Gpadl:
    """A complete GPADL as the host keeps it."""

    relid: int
    gpadl: int
    ranges: tuple[tuple[int, int], ...]
    pfns: Sequence[int]  # the host keeps them as array('Q'): 8 bytes a page, not a Python int each

    @property
    def page_count(self) -> int:
        return len(self.pfns)

    @property
    def is_ring_shaped(self) -> bool:
        """One page-aligned range of whole pages (OpenVMM gpadl_ring ``make_rings`` requirement)."""
        return (len(self.ranges) == 1 and self.ranges[0][1] == 0
                and self.ranges[0][0] == PAGE_SIZE * len(self.pfns))
