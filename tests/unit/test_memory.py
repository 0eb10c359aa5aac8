"""The host's guest-memory shadow, GPADL buffers, and device-held GPADLs (device-acknowledged teardown)."""

from __future__ import annotations

import asyncio

import pytest

from parent_partition.memory import GpadlBuffer, GpadlMap, ShadowMemory
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.gpadl import Gpadl
from vmbus_proto.packets import PAGE_SIZE, GpaRange


def test_shadow_reads_what_the_guest_sent_and_zeros_elsewhere() -> None:
    mem = ShadowMemory()
    rng = GpaRange(100, PAGE_SIZE - 50, (7, 9))  # 50 bytes at the end of page 7, 50 at the start of page 9
    mem.absorb([rng], bytes(range(100)))
    assert mem.read([rng]) == bytes(range(100))
    assert mem.read([GpaRange(8, 0, (9,))]) == bytes(range(50, 58))
    assert mem.read([GpaRange(16, 0, (8,))]) == bytes(16)  # never sent: zeros
    assert mem.resident_bytes == 2 * PAGE_SIZE


def test_host_writes_are_taken_once_with_the_packet_that_names_them() -> None:
    mem = ShadowMemory()
    rng = GpaRange(4, 10, (3,))
    mem.write([rng], b"abcd")
    assert mem._written == {3: None}
    assert mem.take_written([rng]) == b"abcd"
    assert not mem._written


def test_data_of_the_wrong_length_and_the_page_limit_are_the_guests_errors() -> None:
    mem = ShadowMemory(limit=2 * PAGE_SIZE)
    with pytest.raises(DeviceProtocolError, match="3 bytes of data for GPA ranges of 4 bytes"):
        mem.absorb([GpaRange(4, 0, (1,))], b"abc")
    mem.absorb([GpaRange(2 * PAGE_SIZE, 0, (1, 2))], bytes(2 * PAGE_SIZE))
    with pytest.raises(DeviceProtocolError, match="shadow limit"):
        mem.absorb([GpaRange(1, 0, (3,))], b"x")


def test_a_gpadl_buffer_maps_offsets_across_its_ranges() -> None:
    # Two ranges: 2 pages from offset 0, then 100 bytes at offset 16 of a third page.
    gpadl = Gpadl(relid=1, gpadl=5, ranges=((2 * PAGE_SIZE, 0), (100, 16)), pfns=(10, 11, 20))
    buf = GpadlBuffer(gpadl, ShadowMemory())
    assert buf.size == 2 * PAGE_SIZE + 100
    assert buf.ranges(PAGE_SIZE - 2, 4) == (GpaRange(4, PAGE_SIZE - 2, (10, 11)),)
    assert buf.ranges(2 * PAGE_SIZE - 1, 3) == (GpaRange(1, PAGE_SIZE - 1, (11,)), GpaRange(2, 16, (20,)))
    buf.write(2 * PAGE_SIZE - 1, b"xyz")
    assert buf.read(2 * PAGE_SIZE - 1, 3) == b"xyz"
    with pytest.raises(DeviceProtocolError, match="outside GPADL 0x5"):
        buf.ranges(2 * PAGE_SIZE + 99, 2)


async def test_teardown_waits_for_the_device_to_let_go() -> None:
    gpadl = Gpadl(relid=1, gpadl=0xE1E10, ranges=((PAGE_SIZE, 0),), pfns=(4,))
    gpadls = GpadlMap(lambda gid: gpadl if gid == gpadl.gpadl else None, ShadowMemory())
    asked: list[str] = []
    hold = gpadls.hold(gpadl.gpadl, on_teardown=lambda: asked.append("let go"))
    assert gpadls.held(gpadl.gpadl)
    teardown = asyncio.ensure_future(gpadls.teardown(gpadl.gpadl))
    await asyncio.sleep(0)
    assert asked == ["let go"] and not teardown.done()
    with pytest.raises(DeviceProtocolError, match="being torn down"):
        gpadls.get(gpadl.gpadl)  # no new user while it goes
    hold.release()
    await asyncio.wait_for(teardown, 5)
    assert not gpadls.held(gpadl.gpadl)


async def test_teardown_of_an_unheld_gpadl_is_immediate_and_unknown_ids_are_errors() -> None:
    gpadls = GpadlMap(lambda gid: None, ShadowMemory())
    await asyncio.wait_for(gpadls.teardown(3), 5)
    with pytest.raises(DeviceProtocolError, match="GPADL 0x3 does not exist"):
        gpadls.hold(3)


async def test_a_closed_device_releases_every_hold() -> None:
    gpadl = Gpadl(relid=1, gpadl=9, ranges=((PAGE_SIZE, 0),), pfns=(4,))
    gpadls = GpadlMap(lambda gid: gpadl, ShadowMemory())
    gpadls.hold(9)
    gpadls.hold(9)
    teardown = asyncio.ensure_future(gpadls.teardown(9))
    await asyncio.sleep(0)
    gpadls.release_all()
    await asyncio.wait_for(teardown, 5)
