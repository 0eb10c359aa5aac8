"""A partition's memory map bounds the pages it may name (issue 12, isolation): the HELLO ``memory`` key, the
GPA-direct ranges of a PACKET and the PFN lists of a GPADL; and partition names map to directory names that
never collide, even where a file system ignores case or a trailing dot."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from parent_partition.devices.storage.scsi import (
    LunConfig,
    legacy_partition_dir_name,
    open_disks,
    partition_dir_name,
)
from vmbus_proto import messages as m
from vmbus_proto import server as s
from vmbus_proto.envelope import Hello, decode_packet, encode_packet
from vmbus_proto.errors import FrameError, PacketError
from vmbus_proto.gpadl import split
from vmbus_proto.guids import SCSI
from vmbus_proto.packets import PAGE_SIZE, GpaRange, Packet, PacketType
from vmbus_proto.versions import Version

MiB = 1 << 20


def test_hello_memory_is_optional_whole_pages() -> None:
    hello = Hello(2, "vm1", memory=257 * MiB)
    assert Hello.decode(hello.encode()) == hello
    assert b"memory" not in Hello(2, "vm1").encode(), "a HELLO without memory is byte for byte the old one"
    assert Hello.decode(Hello(2, "vm1").encode()).memory is None
    for bad in (0, PAGE_SIZE + 1, -PAGE_SIZE, "1G", 1 << 53, True):
        body = msgpack.packb({"envelope": 2, "partition": "x", "memory": bad})
        with pytest.raises(FrameError, match="memory"):
            Hello.decode(body)


@pytest.mark.parametrize("pfns", [[0x100], [0x100, 0x101, 0x102]])
def test_gpa_direct_ranges_beyond_the_memory_map_are_refused(pfns: list[int]) -> None:
    count = len(pfns) * PAGE_SIZE
    inside = Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 7, b"req", (GpaRange(count, 0, tuple(pfns)),))
    assert decode_packet(encode_packet(inside), b"", 4096, pfn_bound=pfns[-1] + 1).ranges == inside.ranges
    with pytest.raises(PacketError, match="outside the partition's guest memory"):
        decode_packet(encode_packet(inside), b"", 4096, pfn_bound=pfns[-1])
    # Two ranges take the general path: the bound holds there too.
    two = Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 7, b"req",
                 (GpaRange(PAGE_SIZE, 0, (0x100,)), GpaRange(count, 0, tuple(pfns))))
    with pytest.raises(PacketError, match="outside the partition's guest memory"):
        decode_packet(encode_packet(two), b"", 4096, pfn_bound=pfns[-1])
    assert decode_packet(encode_packet(two), b"", 4096).ranges == two.ranges, "no bound by default"


def _connected(pfn_bound: int) -> s.HostConnection:
    core = s.HostConnection([s.OfferSpec("storage", SCSI, SCSI)], limits=s.Limits(pfn_bound=pfn_bound))
    core.receive(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    core.receive(m.RequestOffers())
    core.actions()
    return core


@pytest.mark.parametrize("pages", [3, 200])  # a GPADL_HEADER alone, and one with GPADL_BODY chunks
def test_a_gpadl_naming_a_page_beyond_the_memory_map_fails(pages: int) -> None:
    core = _connected(pfn_bound=0x1000)
    relid = next(iter(core.channels))
    results: dict[int, tuple[int, list[str]]] = {}
    for gid, first in ((1, 0x1000 - pages), (2, 0x1000 - pages + 1)):
        header, bodies = split(relid, gid, list(range(first, first + pages)))
        acts: list[s.Action] = []
        for msg in (header, *bodies):
            core.receive(m.decode(msg.encode()))
            acts += core.actions()
        created = [a.message for a in acts if isinstance(a, s.Send) and isinstance(a.message, m.GpadlCreated)]
        assert len(created) == 1
        results[gid] = (created[0].creation_status,
                        [a.kind.value for a in acts if isinstance(a, s.Dropped)])
    assert results[1] == (0, []), "a GPADL inside the memory map is created"
    status, drops = results[2]
    assert status != 0 and drops == ["gpa_outside_memory"], f"the last page is outside: {results[2]}"
    assert core.gpadl(relid, 2) is None and core.gpadl_pages == pages


def test_partition_dir_names_do_not_collide_where_case_or_a_trailing_dot_is_ignored() -> None:
    names = ["vm1", "VM1", "Vm1", "vm1.", "vm1..", "é", "É", "a%41", "aA", "vm-1.test", "x" * 64, "X" * 64]
    dirs = [partition_dir_name(n) for n in names]
    folded = {d.casefold().rstrip(".") for d in dirs}
    assert len(folded) == len(names), f"two names share a directory where case is ignored: {dirs}"
    assert partition_dir_name("vm1") == "vm1" and partition_dir_name("vm-1.test") == "vm-1.test"
    assert legacy_partition_dir_name("VM1") == "VM1"


async def test_a_legacy_directory_is_adopted_but_never_anothers(tmp_path: Path) -> None:
    data = tmp_path / "var"
    (data / "VM1").mkdir(parents=True)
    (data / "VM1" / "lun0.img").write_bytes(b"V" * 4096)
    ctl = await open_disks(data, "VM1", [LunConfig(0, size_bytes=4096)])
    await ctl.close()
    moved = data / partition_dir_name("VM1") / "lun0.img"
    assert moved.read_bytes() == b"V" * 4096 and not (data / "VM1").exists(), "VM1's disk moved to its new name"
    # 'vm1' has its own directory; 'Vm1' (legacy name 'Vm1', not listed) does not take it.
    (data / "vm1").mkdir()
    (data / "vm1" / "lun0.img").write_bytes(b"v" * 4096)
    ctl = await open_disks(data, "Vm1", [LunConfig(0, size_bytes=4096)])
    await ctl.close()
    assert (data / "vm1" / "lun0.img").read_bytes() == b"v" * 4096
    assert (data / partition_dir_name("Vm1") / "lun0.img").read_bytes() == bytes(4096)
