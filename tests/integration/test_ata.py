"""The emulated ATA disk end to end: a real parent, a guest on a real connection driving the IDE registers by
trapped port I/O (IOPORT frames) beside its StorVSC, both on the same disk image."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from msgpack import packb

from child_partition.devices.ata.driver import AtaDisk, AtaError
from child_partition.devices.ata.portio import PortIo
from child_partition.devices.storage.vsc import StorageVsc
from child_partition.load.guest import LoadGuest
from vmbus_proto.devices.ata.registers import COMMAND, DATA, ERROR, STATUS, Command, Error, Status
from vmbus_proto.devices.storage import vstor
from vmbus_proto.framing import FrameKind
from vmbus_proto.ioport import IoRequest

from .conftest import Parent
from .rawclient import RawClient

pytestmark = pytest.mark.integration
DEADLINE = 120.0

Body = Callable[[LoadGuest, StorageVsc, AtaDisk, PortIo], Awaitable[None]]


def with_guest(parent: Parent, name: str, body: Body, pio: str = "string") -> None:
    async def main() -> None:
        guest = LoadGuest(parent.tcp, name, None)
        await guest.connect()
        try:
            vsc = await guest.bind(guest.offer_of(vstor.SPEC))
            assert isinstance(vsc, StorageVsc)
            assert guest.bus is not None
            io = PortIo(guest.bus)
            ata = AtaDisk(io, pio)
            await ata.probe()
            await body(guest, vsc, ata, io)
        finally:
            await guest.leave()

    asyncio.run(asyncio.wait_for(main(), DEADLINE))


@pytest.mark.parametrize("pio", ["string", "word"])
def test_ata_and_storvsc_see_the_same_bytes(parent: Parent, pio: str) -> None:
    async def body(guest: LoadGuest, vsc: StorageVsc, ata: AtaDisk, io: PortIo) -> None:
        lun = vsc.disks[0]
        assert ata.size == lun.size, f"IDENTIFY says {ata.size} bytes, the SCSI disk {lun.size}"
        assert ata.identify is not None and ata.identify.flush_cache
        one, two = os.urandom(4096), os.urandom(4096)
        await ata.write(8192, one)
        assert await lun.read(8192, 4096) == one, "StorVSC does not read what the ATA path wrote"
        await lun.write(1 << 20, two)
        assert await ata.read(1 << 20, 4096) == two, "the ATA path does not read what StorVSC wrote"
        last = lun.size - 512
        await ata.write(last, one[:512])
        assert await lun.read(last, 512) == one[:512]

    with_guest(parent, f"ata-{pio}", body, pio)


def test_exit_counts_per_sector(parent: Parent) -> None:
    """A register access is one exit: the counts follow from the register sequence (BSY polls add more)."""
    async def body(guest: LoadGuest, vsc: StorageVsc, ata: AtaDisk, io: PortIo) -> None:
        await ata.write(0, b"\x5a" * 4096)
        word = AtaDisk(io, "word")
        word.identify = ata.identify
        counts = {}
        for name, disk in (("string", ata), ("word", word)):
            for op in ("read", "write"):
                before, polls = io.counters.exits, disk.polls
                if op == "read":
                    await disk.read(0, 4096)
                else:
                    await disk.write(0, b"\x5a" * 4096)
                counts[name, op] = (io.counters.exits - before, disk.polls - polls)
        # task file (status + 6 OUTs), then per sector: a status read and the data, then the final status.
        expect = {("string", "read"): 7 + 8 * 2 + 1, ("word", "read"): 7 + 8 * 257 + 1,
                  ("string", "write"): 7 + 8 * 257 + 1, ("word", "write"): 7 + 8 * 257 + 1}
        for key, (exits, polls) in counts.items():
            assert exits == expect[key] + polls, f"{key}: {exits} exits ({polls} busy polls), not {expect[key]}+polls"
        assert counts["string", "read"][0] < 100 < counts["word", "read"][0]

    with_guest(parent, "ata-counts", body)


def test_flush_reaches_the_image_file(parent: Parent, tmp_path: Path) -> None:
    data = os.urandom(4096)

    async def body(guest: LoadGuest, vsc: StorageVsc, ata: AtaDisk, io: PortIo) -> None:
        await ata.write(1 << 16, data, fua=True)  # WRITE SECTORS, then FLUSH CACHE
        await ata.flush()

    with_guest(parent, "ata-flush", body)
    image = tmp_path / "parent" / "var" / "ata-flush" / "lun0.img"  # the parent fixture's --data-dir
    with open(image, "rb") as fh:
        fh.seek(1 << 16)
        assert fh.read(4096) == data, f"{image} does not hold the flushed sectors"


def test_bad_register_use_gets_the_ata_answers(parent: Parent) -> None:
    async def body(guest: LoadGuest, vsc: StorageVsc, ata: AtaDisk, io: PortIo) -> None:
        assert await io.inb(0x1F8) == 0xFF, "an unclaimed port must read as all ones"
        assert await io.inw(0x170) == 0xFFFF, "the secondary channel is not decoded"
        status = await io.inb(STATUS)
        assert await io.inw(STATUS) == status | 0xFF00, "a word read of 0x1F7 reads 0x1F7 and (unclaimed) 0x1F8"
        assert await io.inw(DATA) == 0, "the data port without DRQ reads 0"
        await io.outw(DATA, 0x1234)  # no DRQ: dropped
        await io.outb(ERROR, 0x55)  # the error register is read-only: this writes Features
        assert await io.inb(STATUS) == status, "stray writes changed the status"
        with pytest.raises(AtaError) as beyond:
            await _read_past_end(ata)
        assert beyond.value.error & Error.IDNF, f"LBA past the end: {beyond.value}"
        await io.outb(COMMAND, 0x00)  # NOP is not supported by this drive: aborted
        assert await io.inb(STATUS) & Status.ERR and await io.inb(ERROR) == Error.ABRT
        one = os.urandom(512)
        await ata.write(0, one)  # the drive still works
        assert await ata.read(0, 512) == one

    with_guest(parent, "ata-bad", body)


async def _read_past_end(ata: AtaDisk) -> None:
    """READ SECTORS one sector past the end, issued by hand (the driver's own range check would refuse it)."""
    lba = ata.size // 512
    await ata._issue(Command.READ_SECTORS, lba, 1)
    await ata._data_in()


@pytest.mark.parametrize(("body", "data", "why"), [
    (packb([1, 0, 3, 0x1F0, 1]), b"", "size 3"),
    (packb([1, 2, 1, 0x1F0, 1]), b"", "direction 2"),
    (packb([1, 1, 2, 0x1F0, 1]), b"\x01", "carries 1 data bytes"),
    (packb([1, 0, 2, 0x1F0, 4096]), b"", "count 4096"),
    (packb([1, 0, 1, 0x10000, 1]), b"", "port 0x10000"),
    (b"\xc1", b"", "not msgpack"),
])
def test_malformed_ioport_frames_close_only_that_connection(parent: Parent, body: bytes, data: bytes,
                                                            why: str) -> None:
    bystander = RawClient(parent.tcp)
    bystander.hello("ata-bystander")
    c = RawClient(parent.tcp)
    c.hello("ata-raw")
    req, _ = IoRequest(7, 0, 1, STATUS).encode()
    c.send_frame(FrameKind.IOPORT, 0, req)
    reply = c.expect_kind(FrameKind.IOPORT)
    assert len(reply.data) == 1, "a good IN gets its byte back"
    c.send_frame(FrameKind.IOPORT, 0, body, data)
    reason = c.wait_closed()
    assert reason is not None and why in reason, f"closed with {reason!r}, expected it to name {why!r}"
    bystander.send_frame(FrameKind.IOPORT, 0, req)
    assert len(bystander.expect_kind(FrameKind.IOPORT).data) == 1, "the other partition lost its port I/O"
    bystander.close()


def test_ioport_before_hello_closes(parent: Parent) -> None:
    c = RawClient(parent.tcp)
    body, _ = IoRequest(1, 0, 1, STATUS).encode()
    c.send_frame(FrameKind.IOPORT, 0, body)
    reason = c.wait_closed()
    assert reason is not None and "IOPORT" in reason
