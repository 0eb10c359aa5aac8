"""The emulated ATA disk end to end: a real parent, a guest on a real connection driving the IDE registers by
trapped port I/O (IOPORT frames) beside its StorVSC, both on the same disk image."""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from msgpack import packb

from child_partition.devices.ata.driver import AtaDisk, AtaError
from child_partition.devices.ata.portio import ExitCounters, PortIo
from child_partition.devices.storage.vsc import StorageVsc
from child_partition.load.guest import LoadGuest
from vmbus_proto.devices.ata.registers import COMMAND, DATA, ERROR, STATUS, Command, Error, Status
from vmbus_proto.devices.storage import vstor
from vmbus_proto.framing import FrameKind
from vmbus_proto.ioport import IoRequest

from .conftest import Parent
from .rawclient import RawClient
from .test_load_engine import load, ops_of

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


def _metric(text: str, name: str, **labels: str) -> float:
    """One series of a /metrics page (0 if absent): ``name{k="v",...}`` with exactly these labels."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}(?:{{{re.escape(want)}}})? (\S+)$" if want else rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_and_api_count_the_exits_the_guest_took(workdir: Path) -> None:
    """The ATA device's counters in /metrics and in the API's partition view agree with the guest's own count
    of its exits, by port and direction; commands, errors and bytes follow from what the guest did; and the
    totals stay when the partition leaves (counters never go down)."""
    parent = Parent(workdir / "p", extra=["--http", "127.0.0.1:0"])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        seen: dict[str, object] = {}

        async def body(guest: LoadGuest, vsc: StorageVsc, ata: AtaDisk, io: PortIo) -> None:
            await ata.read(0, 4096)  # after IDENTIFY: 2 commands, 1 + 8 rep insw exits on the data port
            with pytest.raises(AtaError):
                await _read_past_end(ata)  # 1 error
            seen["guest"] = io.counters.snapshot()
            seen["metrics"] = await asyncio.to_thread(_get, f"{url}/metrics")
            seen["api"] = json.loads(await asyncio.to_thread(_get, f"{url}/api/partitions/ata-metrics"))

        with_guest(parent, "ata-metrics", body)
        guest, text, api = seen["guest"], str(seen["metrics"]), seen["api"]
        assert isinstance(guest, ExitCounters) and isinstance(api, dict)
        ins = sum(_metric(text, "vmbus_ata_exits_total", port=f"{p:#x}", direction="in") for p in ATA_PORTS)
        outs = sum(_metric(text, "vmbus_ata_exits_total", port=f"{p:#x}", direction="out") for p in ATA_PORTS)
        assert (ins, outs) == (guest.ins, guest.outs), f"/metrics counts {ins} in, {outs} out; the guest {guest}"
        assert _metric(text, "vmbus_ata_exits_total", port="0x1f0", direction="in") == 9, "1 + 8 sectors of rep insw"
        assert _metric(text, "vmbus_ata_commands_total") == 3, "IDENTIFY, READ SECTORS, the READ past the end"
        assert _metric(text, "vmbus_ata_errors_total") == 1
        assert _metric(text, "vmbus_ata_read_bytes_total") == 4096
        assert _metric(text, "vmbus_ata_port_bytes_total", direction="in") >= 512 + 4096
        emu = api["emulated"]
        assert (emu["exits_in"], emu["exits_out"]) == (guest.ins, guest.outs), f"API: {emu}"
        assert emu["ata"]["exits_total{port=0x1f0,direction=in}"] == 9 and emu["ata"]["errors_total"] == 1, emu
        parent.wait_event("VMBus disconnected", 30, partition="ata-metrics")
        after = _get(f"{url}/metrics")
        gone = sum(_metric(after, "vmbus_ata_exits_total", port=f"{p:#x}", direction=d) for p in ATA_PORTS
                   for d in ("in", "out"))
        assert gone == guest.exits, f"after the partition left, /metrics counts {gone} exits, not {guest.exits}"
        assert _metric(after, "vmbus_ata_partitions_attached") == 0
    finally:
        parent.stop()


ATA_PORTS = (*range(0x1F0, 0x1F8), 0x3F6)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return str(resp.read().decode())


def test_load_storage_emulated_end_to_end(workdir: Path) -> None:
    """``child-partition load storage --path emulated``: a real load client drives the IDE disk; every op is
    counted, the exits it reports are exactly the probe's and 24 per 4 KiB read (plus the busy polls it
    reports), the parent's /metrics counted the same exits, and --data-dir removes the run's image."""
    data = workdir / "p" / "var"
    parent = Parent(workdir / "p", extra=["--http", "127.0.0.1:0", "--data-dir", str(data)])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        out, n = workdir / "emulated.json", 40
        done, pid = load("storage", "--connect", parent.unix, "--path", "emulated", "--rw", "randread", "--bs", "4k",
                         "--iodepth", "1", "--size", "8M", "--count", str(n), "--warmup", "0", "--runtime", "600",
                         "--processes", "1", "--data-dir", str(data), "--json", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "VM exits" in done.stdout, f"the report shows no exits line:\n{done.stdout}"
        assert ops_of(out, "storage", "read") == n
        exits = json.loads(out.read_text())["workloads"]["storage"]["extra"]["exits"]
        assert len(exits) == 1, exits
        e = exits[0]
        probe = 2 + 1 + 7 + 2 + 1  # nIEN and device select, status; IDENTIFY: status + 6 OUTs, DRQ + data, status
        assert e["exits"] == probe + 24 * n + e["busy_polls"], f"{e}: expected {probe} + 24 x {n} + busy polls"
        parent.wait_event("VMBus disconnected", 30, partition=f"load-{pid}-0")
        text = _get(f"{url}/metrics")
        counted = sum(_metric(text, "vmbus_ata_exits_total", port=f"{p:#x}", direction=d) for p in ATA_PORTS
                      for d in ("in", "out"))
        assert counted == e["exits"], f"the parent counted {counted} exits, the client {e['exits']}"
        assert _metric(text, "vmbus_ata_read_bytes_total") == n * 4096, "the reads' bytes (IDENTIFY is not a read)"
        assert not (data / f"load-{pid}-0").exists(), "--data-dir did not remove the run's image"
    finally:
        parent.stop()
