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
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from child_partition.blockdev import MemoryBlockDevice
from child_partition.nbd import NbdServer

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
