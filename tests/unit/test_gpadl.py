"""Tier 1: GPADL split (GPADL_HEADER + GPADL_BODY chunks) and host-side reassembly (vmbus_proto.gpadl).

Linux drivers/hv/channel.c ``create_gpadl_header``: one range, byte_offset 0, 26 PFNs in the header and
28 per body; OpenVMM ``gparange::parse`` / channels.rs ``GpadlState::InProgress`` for the host checks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus_proto import messages as m
from vmbus_proto.errors import LocalProtocolError, MessageError
from vmbus_proto.gpadl import FIRST_GPADL_HANDLE, HEADER_SLOTS, MAX_PAGES, Gpadl, GpadlAssembly, split
from vmbus_proto.packets import PAGE_SIZE


def _pfns(n: int, base: int = 0x10000) -> list[int]:
    return list(range(base, base + n))


# ---- split ---------------------------------------------------------------------------------------------

def test_constants_match_the_real_message_layout() -> None:
    assert FIRST_GPADL_HANDLE == 0xE1E10  # Linux connection.c next_gpadl_handle
    assert HEADER_SLOTS == 27
    # 20-byte fixed GPADL_HEADER part + 27 u64 slots fill a 236-byte message; a body of 28 PFNs is 240.
    assert 20 + 8 * HEADER_SLOTS <= m.MAX_MESSAGE_SIZE
    assert 16 + 8 * m.GPADL_BODY_MAX_PFNS == m.MAX_MESSAGE_SIZE


@pytest.mark.parametrize(("n", "bodies"), [(1, 0), (25, 0), (26, 0), (27, 1), (26 + 28, 1), (26 + 28 + 1, 2),
                                           (26 + 28 * 3, 3), (26 + 28 * 3 + 27, 4)])
def test_split_sizes_26_then_28(n: int, bodies: int) -> None:
    header, body_msgs = split(3, 0xE1E10, _pfns(n))
    assert len(header.pfns) == min(n, 26)
    assert len(body_msgs) == bodies
    assert all(len(b.pfns) == 28 for b in body_msgs[:-1])
    if body_msgs:
        assert 1 <= len(body_msgs[-1].pfns) <= 28


@given(st.integers(1, 600))
@settings(max_examples=60, deadline=None)
def test_split_chunks_and_wire_sizes(n: int) -> None:
    pfns = _pfns(n, 0xABC000)
    header, bodies = split(7, 0x1234, pfns)
    assert (header.child_relid, header.gpadl, header.rangecount) == (7, 0x1234, 1)
    assert header.ranges == ((n * PAGE_SIZE, 0),)
    assert header.range_buflen == 8 + 8 * n  # one range header + n PFNs
    assert list(header.pfns) + [p for b in bodies for p in b.pfns] == pfns
    assert all(b.gpadl == 0x1234 and b.msgnumber == 0 for b in bodies)
    # Every chunk fits one 240-byte SynIC message; full chunks are exactly 236 and 240 bytes.
    assert len(header.to_binary()) == 20 + 8 + 8 * min(n, 26)
    for b in bodies:
        assert len(b.to_binary()) == 16 + 8 * len(b.pfns) <= m.MAX_MESSAGE_SIZE
    # and each survives the stream codec
    for msg in (header, *bodies):
        assert m.decode(msg.encode()) == msg


def test_split_of_exactly_26_plus_28k_has_only_full_bodies() -> None:
    for k in range(5):
        header, bodies = split(1, 1, _pfns(26 + 28 * k))
        assert len(header.pfns) == 26
        assert [len(b.pfns) for b in bodies] == [28] * k


def test_split_with_offset_range() -> None:
    header, bodies = split(1, 9, _pfns(3), byte_count=2 * PAGE_SIZE, byte_offset=100)
    assert header.ranges == ((2 * PAGE_SIZE, 100),)
    assert not bodies
    asm = GpadlAssembly.from_header(header)
    assert asm.complete and asm.expected_pfns == 3


def test_split_stops_where_range_buflen_overflows() -> None:
    # range_buflen is a u16: 8 + 8 * 8190 = 65528 fits, 8191 pages do not.
    header, bodies = split(1, 1, _pfns(MAX_PAGES))
    assert MAX_PAGES == 8190 and header.range_buflen == 65528 and len(bodies) == -(-(8190 - 26) // 28)
    assert m.decode(header.encode()) == header
    with pytest.raises(LocalProtocolError, match="range_buflen"):
        split(1, 1, _pfns(MAX_PAGES + 1))


def test_split_refuses_an_empty_gpadl() -> None:
    with pytest.raises(ValueError, match="at least one page"):
        split(1, 1, [])


# ---- reassembly ----------------------------------------------------------------------------------------

@given(st.integers(1, 300), st.integers(0, 2**64 - 1))
@settings(max_examples=60, deadline=None)
def test_reassembly_gives_back_the_pfns(n: int, base: int) -> None:
    pfns = [(base + i) % 2**64 for i in range(n)]
    header, bodies = split(2, 5, pfns)
    asm = GpadlAssembly.from_header(header)
    assert (asm.relid, asm.gpadl, asm.expected_pfns) == (2, 5, n)
    assert asm.complete == (not bodies)
    for i, body in enumerate(bodies):
        assert not asm.complete
        asm.add(body.pfns)
        assert asm.complete == (i == len(bodies) - 1)
    assert asm.pfns == pfns
    g = Gpadl(asm.relid, asm.gpadl, asm.ranges, tuple(asm.pfns))
    assert g.page_count == n
    assert g.is_ring_shaped


def test_multi_range_header_counts_pages_of_every_range() -> None:
    # Range 1: 100 bytes at offset 4000 spans 2 pages; range 2: one whole page.
    header = m.GpadlHeader(child_relid=1, gpadl=2, range_buflen=8 * 2 + 8 * 3, rangecount=2,
                           ranges=((100, 4000), (PAGE_SIZE, 0)), pfns=(10, 11, 12))
    asm = GpadlAssembly.from_header(header)
    assert asm.expected_pfns == 3 and asm.complete
    assert not Gpadl(1, 2, asm.ranges, tuple(asm.pfns)).is_ring_shaped


def test_body_overflow_is_refused() -> None:
    header, bodies = split(1, 1, _pfns(30))
    asm = GpadlAssembly.from_header(header)
    with pytest.raises(MessageError, match="31 PFNs for 30 pages"):
        asm.add((*bodies[0].pfns, 1))
    assert len(asm.pfns) == 26  # nothing of the refused body was kept
    asm.add(bodies[0].pfns)
    assert asm.complete
    with pytest.raises(MessageError):
        asm.add((1,))


def test_empty_body_does_not_complete() -> None:
    header, _ = split(1, 1, _pfns(27))
    asm = GpadlAssembly.from_header(header)
    asm.add(())
    assert not asm.complete


def _header(**kw: object) -> m.GpadlHeader:
    base: dict[str, object] = {"child_relid": 1, "gpadl": 2, "range_buflen": 8 + 8 * 2, "rangecount": 1,
                               "ranges": ((2 * PAGE_SIZE, 0),), "pfns": (1, 2)}
    base.update(kw)
    return m.GpadlHeader(**base)  # type: ignore[arg-type]


def test_valid_reference_header() -> None:
    assert GpadlAssembly.from_header(_header()).complete


@pytest.mark.parametrize(("kw", "match"), [
    ({"rangecount": 2}, "rangecount 2 with 1 ranges"),
    ({"rangecount": 0, "ranges": (), "range_buflen": 0, "pfns": ()}, "rangecount 0 with 0 ranges"),
    ({"ranges": ((0, 0),), "range_buflen": 8}, "empty range"),
    ({"ranges": ((PAGE_SIZE, PAGE_SIZE),)}, "byte_offset 4096 beyond a page"),
    ({"ranges": ((PAGE_SIZE, 0xFFFFFFFF),)}, "beyond a page"),
    ({"range_buflen": 8 + 8 * 3}, "range_buflen 32 does not match"),
    ({"range_buflen": 8 + 8 * 1}, "range_buflen 16 does not match"),
    ({"pfns": (1, 2, 3)}, "3 PFNs for 2 pages"),  # more PFNs in the header than the ranges span
])
def test_header_validation_errors(kw: dict[str, object], match: str) -> None:
    with pytest.raises(MessageError, match=match):
        GpadlAssembly.from_header(_header(**kw))


def test_header_with_more_than_27_slots_is_refused() -> None:
    # Two ranges of 13 pages each: 2 range headers + 26 PFNs = 28 u64 slots > 27.
    header = m.GpadlHeader(child_relid=1, gpadl=2, range_buflen=8 * 2 + 8 * 26, rangecount=2,
                           ranges=((13 * PAGE_SIZE, 0), (13 * PAGE_SIZE, 0)), pfns=tuple(range(26)))
    with pytest.raises(MessageError, match="more than 27 slots"):
        GpadlAssembly.from_header(header)
    # One page fewer fits (27 slots).
    ok = m.GpadlHeader(child_relid=1, gpadl=2, range_buflen=8 * 2 + 8 * 25, rangecount=2,
                       ranges=((13 * PAGE_SIZE, 0), (12 * PAGE_SIZE, 0)), pfns=tuple(range(25)))
    assert GpadlAssembly.from_header(ok).complete


def test_unaligned_range_needs_one_more_page() -> None:
    # 4096 bytes starting 1 byte into a page span 2 pages.
    header = _header(ranges=((PAGE_SIZE, 1),), range_buflen=8 + 16, pfns=(1,))
    asm = GpadlAssembly.from_header(header)
    assert asm.expected_pfns == 2 and not asm.complete


# ---- ring shape ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ranges", "npfns", "shaped"), [
    (((8 * PAGE_SIZE, 0),), 8, True),
    (((PAGE_SIZE, 0),), 1, True),
    (((8 * PAGE_SIZE - 8, 0),), 8, False),  # not whole pages
    (((7 * PAGE_SIZE, 8),), 8, False),  # not page aligned
    (((4 * PAGE_SIZE, 0), (4 * PAGE_SIZE, 0)), 8, False),  # two ranges
    (((9 * PAGE_SIZE, 0),), 8, False),  # byte_count does not match the page list
])
def test_is_ring_shaped(ranges: tuple[tuple[int, int], ...], npfns: int, shaped: bool) -> None:
    assert Gpadl(1, 1, ranges, tuple(range(npfns))).is_ring_shaped is shaped
