"""Real NBD clients as the guest's block layer: qemu-img, qemu-io, nbdcopy and nbdinfo against the NBD server, on
a Unix socket and on loopback TCP. The server runs in the test's event loop; the tools run as subprocesses
awaited with asyncio, so the loop keeps serving while they work. Missing tools fail these tests: CI installs
qemu-utils and libnbd-bin."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from child_partition.devices.storage.blockdev import MemoryBlockDevice
from child_partition.devices.storage.nbd import NbdServer
from child_partition.devices.storage.service import StorageService
from child_partition.devices.storage.vsc import ScsiLun
from child_partition.runner import ChildPartition

from .conftest import BIN, Parent, Proc, child

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SIZE = 64 * MiB
TOOLS = ("qemu-img", "qemu-io", "nbdcopy", "nbdinfo")
TOOL_TIMEOUT = 90.0


class RecordingDevice(MemoryBlockDevice):
    """A 64 MiB memory disk that remembers every write with its FUA bit."""

    def __init__(self, read_only: bool = False) -> None:
        # A max_transfer below the tools' request sizes, so the server's splitting is exercised too.
        super().__init__(SIZE, read_only, max_transfer=256 * 1024)
        self.writes: list[tuple[int, int, bool]] = []

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.writes.append((offset, len(data), fua))
        await super().write(offset, data, fua)

    def fua_of(self, offset: int, length: int) -> set[bool]:
        """The FUA bits of the device writes that touched offset..offset+length."""
        return {fua for o, n, fua in self.writes if o < offset + length and offset < o + n}


@pytest.fixture(scope="module", autouse=True)
def tools() -> dict[str, str]:
    found = {tool: shutil.which(tool) for tool in TOOLS}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        pytest.fail(f"NBD client tools missing: {', '.join(missing)}. Install them: "
                    "apt-get install -y qemu-utils libnbd-bin", pytrace=False)
    return {tool: path for tool, path in found.items() if path is not None}


async def run(*cmd: str, check: bool = True) -> tuple[int, str]:
    """Run a tool without blocking the event loop the server runs in; (exit status, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TOOL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(cmd)}: no exit within {TOOL_TIMEOUT} s") from None
    text = out.decode(errors="replace")
    assert proc.returncode is not None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text}")
    return proc.returncode, text


async def qemu_io(uri: str, *commands: str, cache: str = "writeback", read_only: bool = False) -> str:
    """qemu-io on the raw export; fails on a non-zero exit or a pattern mismatch (which some qemu-io versions
    report with exit status 0)."""
    args = ["qemu-io", "-f", "raw", "-t", cache, *(["-r"] if read_only else [])]
    for command in commands:
        args += ["-c", command]
    _, out = await run(*args, uri)
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower(), out
    return out


def sparse_image(path: Path) -> Path:
    """Data islands in a sparse file, so that nbdcopy sends zero requests as well as writes."""
    rng = random.Random(3)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in (0, 5 * MiB + 17, 40 * MiB, SIZE - MiB):
            f.seek(offset)
            f.write(rng.randbytes(MiB))
    return path


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nbdtools", dir="/tmp") as d:  # sun_path is 108 bytes
        yield Path(d)


@pytest.fixture(params=["unix", "tcp"])
async def export(request: pytest.FixtureRequest, sockdir: Path) -> AsyncIterator[tuple[NbdServer, RecordingDevice]]:
    dev = RecordingDevice()
    srv = NbdServer(dev, "vm1-disk", description="vm1 scsi disk 0")
    await srv.start(f"unix:{sockdir / 'vm1.nbd'}" if request.param == "unix" else "tcp://127.0.0.1:0")
    yield srv, dev
    await srv.close()


async def test_qemu_img_converts_a_real_image_onto_the_disk_and_compares_it(
        export: tuple[NbdServer, RecordingDevice], tmp_path: Path) -> None:
    srv, dev = export
    dev.data[:] = random.Random(1).randbytes(SIZE)  # stale contents that the copy must overwrite, holes included
    image = tmp_path / "guest.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    await run("qemu-io", "-f", "qcow2", str(image),
              "-c", "write -P 0x5a 0 1M",
              "-c", "write -P 0xa5 3145728 65536",
              "-c", "write -P 0x11 10000001 1234567",
              "-c", "write -P 0x22 33554431 2",
              "-c", "write -P 0x33 66060288 1048576")
    await run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(image), srv.uri)
    _, out = await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), srv.uri)
    assert "Images are identical" in out

    # The same bytes as qemu-img's own raw conversion, checked on the device itself.
    raw = tmp_path / "guest.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    assert dev.data == raw.read_bytes()

    # qemu-img compare really reads the export: one changed byte is found.
    dev.data[10001001] ^= 0xFF
    status, out = await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), srv.uri, check=False)
    assert status == 1 and "Content mismatch at offset 10000896" in out, out  # reported by 512-byte sector


async def test_qemu_io_patterns_at_random_offsets(export: tuple[NbdServer, RecordingDevice]) -> None:
    srv, dev = export
    rng = random.Random(42)
    # One write per 4 MiB slot, so none overlaps another; offsets and lengths are mostly unaligned.
    spans = [(slot * 4 * MiB + rng.randrange(0, 3 * MiB), rng.randrange(1, MiB), 0x10 + slot) for slot in range(15)]
    writes = [f"write -P {pattern:#x} {offset} {length}" for offset, length, pattern in spans]
    reads = [f"read -P {pattern:#x} {offset} {length}" for offset, length, pattern in spans]
    await qemu_io(srv.uri, *writes, *reads)
    # A second client (a new connection) sees the same data, and so does the device.
    await qemu_io(srv.uri, *reads)
    for offset, length, pattern in spans:
        assert dev.data[offset:offset + length] == bytes([pattern]) * length
    # A wrong expectation is caught, i.e. the reads above really verified something.
    offset, length, pattern = spans[0]
    _, out = await run("qemu-io", "-f", "raw", "-c", f"read -P {pattern ^ 0xFF:#x} {offset} {length}", srv.uri,
                       check=False)
    assert "Pattern verification failed" in out

    # Write zeroes and discard.
    offset, length, _ = spans[1]
    await qemu_io(srv.uri, f"write -z {offset} {length}", f"read -P 0 {offset} {length}")
    assert dev.data[offset:offset + length] == bytes(length)
    await qemu_io(srv.uri, f"discard {4 * MiB * 15} {MiB}")
    assert dev.counts["discard"] > 0


async def test_qemu_io_fua_writes_reach_the_device_as_fua(export: tuple[NbdServer, RecordingDevice]) -> None:
    srv, dev = export
    _, helptext = await run("qemu-io", "-c", "help write", srv.uri)
    assert "-f, -- use Force Unit Access semantics" in helptext, helptext
    # Writeback cache: only `write -f` asks for FUA (qemu-io's default, writethrough, makes every write FUA).
    await qemu_io(srv.uri, "write -P 0x01 1000000 300000", "write -f -P 0x02 5000003 700000",
                  "read -P 0x01 1000000 300000", "read -P 0x02 5000003 700000")
    assert dev.fua_of(1000000, 300000) == {False}
    assert dev.fua_of(5000003, 700000) == {True}
    # Writethrough: every write is FUA end to end.
    dev.writes.clear()
    await qemu_io(srv.uri, "write -P 0x03 9000000 4096", cache="writethrough")
    assert dev.fua_of(9000000, 4096) == {True}


async def test_nbdcopy_copies_a_file_onto_the_disk_and_back(export: tuple[NbdServer, RecordingDevice],
                                                             tmp_path: Path) -> None:
    srv, dev = export
    dev.data[:] = b"\xee" * SIZE
    src = sparse_image(tmp_path / "src.raw")
    await run("nbdcopy", "--flush", str(src), srv.uri)
    back = tmp_path / "back.raw"
    await run("nbdcopy", srv.uri, str(back))
    assert dev.data == src.read_bytes()
    assert back.read_bytes() == src.read_bytes()
    await run("cmp", str(src), str(back))
    assert dev.counts["flush"] > 0


async def test_nbdinfo_reports_the_export(export: tuple[NbdServer, RecordingDevice]) -> None:
    srv, _ = export
    _, out = await run("nbdinfo", "--json", srv.uri)
    info = json.loads(out)
    assert info["protocol"] == "newstyle-fixed" and info["TLS"] is False
    (exp,) = info["exports"]
    assert exp["export-name"] == "vm1-disk" and exp["description"] == "vm1 scsi disk 0"
    assert exp["export-size"] == SIZE
    assert (exp["block_size_minimum"], exp["block_size_preferred"], exp["block_size_maximum"]) == (1, 4096, MiB)
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert exp[flag] is True, flag
    assert exp["is_read_only"] is False
    _, out = await run("nbdinfo", "--size", srv.uri)
    assert int(out) == SIZE
    _, out = await run("nbdinfo", "--list", "--json", srv.uri)
    assert [e["export-name"] for e in json.loads(out)["exports"]] == ["vm1-disk"]


async def test_read_only_disk_is_read_only_to_the_tools(sockdir: Path, tmp_path: Path) -> None:
    dev = RecordingDevice(read_only=True)
    dev.data[:512] = b"\x42" * 512
    srv = NbdServer(dev)
    await srv.start(f"unix:{sockdir / 'ro.nbd'}")
    try:
        info = json.loads((await run("nbdinfo", "--json", srv.uri))[1])
        assert info["exports"][0]["is_read_only"] is True
        await qemu_io(srv.uri, "read -P 0x42 0 512", read_only=True)
        # qemu will not even open a read-only export for writing; nbdcopy onto it fails as well.
        status, out = await run("qemu-io", "-f", "raw", "-c", "write -P 1 0 512", srv.uri, check=False)
        assert status != 0 and "Permission denied" in out, out
        src = tmp_path / "one.raw"
        src.write_bytes(b"\x01" * MiB)
        status, out = await run("nbdcopy", str(src), srv.uri, check=False)
        assert status != 0 and "read-only" in out, out
        assert not dev.writes and dev.data[:512] == b"\x42" * 512
    finally:
        await srv.close()
    assert not os.path.exists(sockdir / "ro.nbd")


# -- a child partition's LUNs through the whole stack: NBD -> StorVSC -> VMBus -> StorVSP -> image ---------------

LUNS_CONFIG = """
[[storage.lun]]
lun = 1
size = {size}

[[storage.lun]]
lun = 2
path = "{ro}"
read_only = true
"""
BIG = 256 * MiB


def allocated(path: Path) -> int:
    """Bytes the image really occupies on disk."""
    return os.stat(path).st_blocks * 512


def uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


@pytest.fixture
def luns_parent(tmp_path: Path) -> Iterator[tuple[Parent, Path]]:
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"\x42" * (4 * MiB))
    p = Parent(tmp_path / "parent", LUNS_CONFIG.format(size=BIG, ro=ro))
    yield p, ro
    p.stop()


def vm(workdir: Path, parent: Parent, name: str = "vm1") -> tuple[Proc, Path]:
    sock = workdir / f"{name}.nbd"
    proc = child(workdir, parent.unix, name, "--nbd", f"unix:{sock}")
    proc.wait_for(lambda r: r.get("event") == "nbd server listening", timeout=30)
    return proc, sock


async def test_every_lun_is_an_export_with_its_size_and_read_only_flag(luns_parent: tuple[Parent, Path],
                                                                        tmp_path: Path) -> None:
    parent, ro = luns_parent
    proc, sock = vm(tmp_path, parent)
    try:
        _, out = await run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}")
        exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
        assert sorted(exports) == ["vm1", "vm1-lun1", "vm1-lun2"], exports
        assert [exports[n]["export-size"] for n in ("vm1", "vm1-lun1", "vm1-lun2")] == [1 << 30, BIG, 4 * MiB]
        assert [exports[n]["is_read_only"] for n in ("vm1", "vm1-lun1", "vm1-lun2")] == [False, False, True]
        assert exports["vm1-lun1"]["can_trim"] is True and exports["vm1-lun2"]["can_trim"] is False
        # The read-only LUN reads the image and refuses writes at the NBD layer.
        await qemu_io(uri(sock, "vm1-lun2"), "read -P 0x42 0 4M", read_only=True)
        status, out = await run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri(sock, "vm1-lun2"), check=False)
        assert status != 0 and "Permission denied" in out, out
        assert ro.read_bytes() == b"\x42" * (4 * MiB)
        # Each LUN is its own image: a pattern on LUN 1 is not on LUN 0.
        await qemu_io(uri(sock, "vm1-lun1"), "write -P 0x6c 1M 64k")
        await qemu_io(uri(sock, "vm1"), "read -P 0 1M 64k")
        assert proc.stop() == 0
    finally:
        proc.stop()


async def test_write_zeroes_and_trim_punch_holes_in_the_parents_image(luns_parent: tuple[Parent, Path],
                                                                       tmp_path: Path) -> None:
    parent, _ = luns_parent
    proc, sock = vm(tmp_path, parent)
    image = tmp_path / "parent" / "var" / "vm1" / "lun1.img"
    try:
        target = uri(sock, "vm1-lun1")
        # Stale data over the first 64 MiB, that the conversion has to zero.
        await qemu_io(target, "write -P 0xee 0 64M")
        assert allocated(image) >= 64 * MiB
        src = tmp_path / "sparse.qcow2"
        await run("qemu-img", "create", "-q", "-f", "qcow2", str(src), str(BIG))
        await run("qemu-io", "-f", "qcow2", str(src), "-c", "write -P 0x11 0 4M", "-c", "write -P 0x22 100M 4M",
                  "-c", "write -P 0x33 255M 1M")
        await run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), target)
        _, out = await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), target)
        assert "Images are identical" in out
        # 9 MiB of data; zeroing the rest punched holes instead of writing 247 MiB of zeros.
        assert allocated(image) <= 16 * MiB, f"{allocated(image) // MiB} MiB allocated after the conversion"
        # WRITE_ZEROES with NO_HOLE (qemu-io write -z without -u) keeps the range allocated; with -u it may punch.
        before = allocated(image)
        await qemu_io(target, "write -z 200M 8M")
        assert allocated(image) >= before + 8 * MiB - 64 * 1024, "write -z (NO_HOLE) punched a hole"
        await qemu_io(target, "write -z -u 200M 8M", "read -P 0 200M 8M")
        assert allocated(image) <= before + 64 * 1024, "write -z -u did not punch a hole"
        # TRIM (qemu-io discard) deallocates too.
        await qemu_io(target, "discard 0 4M", "read -P 0 0 4M")
        assert allocated(image) <= before - 4 * MiB + 64 * 1024
    finally:
        proc.stop()


async def test_nbdinfo_map_shows_the_images_data_and_holes(luns_parent: tuple[Parent, Path], tmp_path: Path) -> None:
    parent, _ = luns_parent
    proc, sock = vm(tmp_path, parent)
    try:
        target = uri(sock, "vm1-lun1")
        await qemu_io(target, "write -P 0x01 8M 2M", "write -P 0x02 100M 1M", "write -P 0x03 255M 1M")
        _, out = await run("nbdinfo", "--map", "--json", target)
        extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
        data, hole = 0, 3  # base:allocation: 3 = hole|zero
        assert extents == [(0, 8 * MiB, hole), (8 * MiB, 2 * MiB, data), (10 * MiB, 90 * MiB, hole),
                           (100 * MiB, MiB, data), (101 * MiB, 154 * MiB, hole), (255 * MiB, MiB, data)], extents
        # The same through qemu-img map, which reads base:allocation too.
        _, out = await run("qemu-img", "map", "--output=json", "-f", "raw", target)
        mapped = [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]
        assert mapped == [(8 * MiB, 2 * MiB), (100 * MiB, MiB), (255 * MiB, MiB)], mapped
    finally:
        proc.stop()


async def test_nbd_on_a_busy_port_is_one_line_before_the_vm_comes_up(parent: Parent, tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        mark = parent.mark()
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "child-partition"), "run", "--connect", parent.unix, "--name", "vm1", "--nbd",
            f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), TOOL_TIMEOUT)
        text = err.decode()
        assert proc.returncode == 1, text
        expected = f"child-partition: error: cannot listen for NBD on 127.0.0.1:{port}: Address already in use"
        assert text.strip() == expected, text
        assert not [r for r in parent.lines[mark:] if r.get("event") == "partition connected"], "the VM came up"
    finally:
        busy.close()


async def test_data_protect_from_the_target_reaches_a_real_tool(luns_parent: tuple[Parent, Path],
                                                                 sockdir: Path) -> None:
    """The read-only LUN exported WITHOUT the NBD read-only flag, in this test only, through a device that sends
    qemu-io's writes as raw WRITE(10)s (a SCSI pass-through, as sg_raw would): the guest's own write-protect
    check is skipped, the StorVSP's SCSI target answers DATA PROTECT / WRITE PROTECTED, and qemu-io sees EPERM."""
    parent, ro = luns_parent
    guest = ChildPartition(parent.unix, "vm-pt", reconnect=False)
    stop = asyncio.Event()
    running = asyncio.create_task(guest.run(stop))
    try:
        await asyncio.wait_for(guest.ready.wait(), 30)
        lun = guest.service(StorageService).disks[2]
        assert lun.read_only and lun.disk is not None
        passthrough = PassThrough(lun.disk)
        srv = NbdServer(passthrough, "lun2-passthrough")
        await srv.start(f"unix:{sockdir / 'pt.nbd'}")
        try:
            assert json.loads((await run("nbdinfo", "--json", srv.uri))[1])["exports"][0]["is_read_only"] is False
            status, out = await run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri, check=False)
            assert status != 0 and "Operation not permitted" in out, out
        finally:
            await srv.close()
        assert passthrough.senses and all(s[2] & 0x0F == 0x7 and s[12] == 0x27 for s in passthrough.senses), \
            f"no DATA PROTECT / WRITE PROTECTED sense seen: {passthrough.senses}"
        assert ro.read_bytes() == b"\x42" * (4 * MiB)
    finally:
        stop.set()
        assert await asyncio.wait_for(running, 30) == 0


class PassThrough(MemoryBlockDevice):
    """A LUN whose writes go out as raw WRITE(10) CDBs, recording the sense of each refusal."""

    def __init__(self, lun: ScsiLun) -> None:
        super().__init__(lun.size, max_transfer=lun.max_transfer)
        self.lun = lun
        self.senses: list[bytes] = []

    async def read(self, offset: int, length: int) -> bytes:
        return await self.lun.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        cdb = struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, offset // 512, 0, len(data) // 512, 0)
        reply = await self.lun.command(cdb, data_out=data)
        if not reply.ok:
            self.senses.append(reply.sense)
            raise reply.error(f"WRITE(10) at {offset}")


async def test_load_storage_cleans_up_its_disks_unless_kept(parent: Parent, tmp_path: Path) -> None:
    data_dir = tmp_path / "parent" / "var"

    def dirs() -> set[Path]:
        return set(data_dir.iterdir()) if data_dir.exists() else set()

    base = [str(BIN / "child-partition"), "load", "storage", "--connect", parent.unix, "--rw", "write", "--bs",
            "64k", "--iodepth", "4", "--runtime", "0.5", "--ramp", "0", "--size", "16M"]
    seen = dirs()
    _, out = await run(*base, "--keep-disks")
    (kept,) = dirs() - seen
    assert allocated(kept / "lun0.img") >= MiB, f"--keep-disks: the written data is gone\n{out}"
    seen = dirs()
    _, out = await run(*base)  # without the data dir: the disk is discarded, its space handed back
    (discarded,) = dirs() - seen
    assert "LUN 0 discarded" in out and allocated(discarded / "lun0.img") < MiB, out
    seen = dirs()
    _, out = await run(*base, "--data-dir", str(data_dir))  # and with it, the image and its directory go
    assert dirs() == seen and "removed 1 image(s)" in out, out
