"""Faults survived, nothing lost (issue 12): real faults injected into a running parent and its children.

* A disk whose host filesystem is full (a 2 MiB tmpfs) and one whose filesystem fails every I/O with EIO (ext4 on
  a loop device, shut down with EXT4_IOC_SHUTDOWN, as ``xfs_io -x -c shutdown`` does; device-mapper's ``error``
  target would be the classic tool but this container's kernel has no device-mapper driver). The guest gets
  CHECK CONDITION with Linux's sense, a real tool sees ENOSPC / EIO, and the daemon keeps serving.
* kill -9 of a child in the middle of storage I/O, of a GPADL exchange and of an open: every resource of the
  partition is released, a bystander sees nothing and the same name connects again at once.

Root is needed for the mounts; every mount and loop device is undone in a ``finally``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Parent, Proc, child

pytestmark = pytest.mark.integration
MiB = 1 << 20
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for tmpfs and loop mounts")


def sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}"


def qemu_io(uri: str, *cmds: str) -> tuple[int, str]:
    args = [a for c in cmds for a in ("-c", c)]
    proc = subprocess.run(["qemu-io", "-f", "raw", *args, uri], check=False, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def nbd(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


@contextlib.contextmanager
def mounted(source: str, target: Path, *options: str) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    sh("mount", *options, source, str(target))
    try:
        yield target
    finally:
        # Lazy: a shut-down ext4 may still be pinned by a process that has not closed its fd yet.
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True, timeout=60)


def shut_down(fs: Path) -> None:
    """Make every later I/O on the filesystem at ``fs`` fail with EIO (the kernel's own forced shutdown)."""
    fd = os.open(fs, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


FAULTY_LUNS = """
[parent]
handshake_timeout = 3.0
stall_timeout = 3.0

[[storage.lun]]
lun = 1
path = "{full}"

[[storage.lun]]
lun = 2
path = "{broken}"
"""


@pytest.fixture
def faulty_disks(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(an image on a full 2 MiB tmpfs, 64 MiB sparse; the mount point of an ext4 holding a 16 MiB image)."""
    _need_root()
    if shutil.which("mkfs.ext4") is None:
        pytest.fail("mkfs.ext4 missing: apt-get install -y e2fsprogs", pytrace=False)
    backing = tmp_path / "ext4.img"
    with open(backing, "wb") as fh:
        fh.truncate(64 * MiB)
    sh("mkfs.ext4", "-q", "-F", str(backing))
    # Mount points outside pytest's tmp_path so that its clean-up never walks into a mount left behind.
    root = Path(tempfile.mkdtemp(prefix="vmbus-faults-"))
    try:
        with mounted("tmpfs", root / "full", "-t", "tmpfs", "-o", "size=2M") as full, \
                mounted(str(backing), root / "broken", "-o", "loop") as broken:
            for image, size in ((full / "lun1.img", 64 * MiB), (broken / "lun2.img", 16 * MiB)):
                with open(image, "wb") as fh:
                    fh.truncate(size)
            fill(full / "filler")
            yield full / "lun1.img", broken
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full."""
    with open(path, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while fh.write(bytes(64 * 1024)):
            pass


def failing_lines(parent: Parent, start: int) -> list[dict[str, object]]:
    return [r for r in parent.lines[start:] if str(r.get("event", "")).startswith("disk I/O failing")]


def test_full_and_failing_disks_are_scsi_errors_to_the_guest_and_the_daemon_serves_on(
        faulty_disks: tuple[Path, Path], tmp_path: Path) -> None:
    full_image, broken_fs = faulty_disks
    p = Parent(tmp_path / "parent", FAULTY_LUNS.format(full=full_image, broken=broken_fs / "lun2.img"))
    vm: Proc | None = None
    other: Proc | None = None
    try:
        other = child(tmp_path, p.unix, "other")
        other.wait_event("all offered channels open")
        sock = tmp_path / "vm1.nbd"
        vm = child(tmp_path, p.unix, "vm1", "--nbd", f"unix:{sock}")
        vm.wait_event("nbd server listening")
        mark = p.mark()

        # ENOSPC: a write into the full tmpfs. The target answers DATA PROTECT / SPACE ALLOCATION FAILED WRITE
        # PROTECT; the guest's block layer makes that ENOSPC and qemu-io says so.
        status, out = qemu_io(nbd(sock, "vm1-lun1"), "write -P 0x11 0 4M")
        assert status != 0 and "No space left on device" in out, f"qemu-io into a full disk: {out.strip()}"
        p.wait_for(lambda r: str(r.get("event", "")).startswith("disk I/O failing") and r.get("errno") == "ENOSPC",
                   start=mark)
        # The guest retries into the full disk: still one line for the whole burst.
        status, out = qemu_io(nbd(sock, "vm1-lun1"), "write -P 0x12 8M 1M", "write -P 0x13 12M 1M")
        assert status != 0 or "No space left on device" in out, out
        enospc = [r for r in failing_lines(p, mark) if r.get("errno") == "ENOSPC"]
        assert len(enospc) == 1, f"a burst of ENOSPC logged {len(enospc)} times: " + str(
            [(r["event"], r.get("lun"), r.get("opcode"), r.get("failed_commands")) for r in p.lines[mark:]
             if str(r.get("event", "")).startswith("disk I/O")])
        assert enospc[0]["sense"] == "0x7/0x27/0x07" and enospc[0]["partition"] == "vm1", enospc[0]

        # EIO: the filesystem under LUN 2 is shut down. Reads are UNRECOVERED READ ERROR, writes WRITE ERROR.
        status, out = qemu_io(nbd(sock, "vm1-lun2"), "write -P 0x22 0 64k", "flush")
        assert status == 0 and "error" not in out.lower(), f"LUN 2 before the fault: {out.strip()}"
        shut_down(broken_fs)
        status, out = qemu_io(nbd(sock, "vm1-lun2"), "read 1M 64k")
        assert "Input/output error" in out, f"qemu-io read from a failing disk: {out.strip()}"
        status, out = qemu_io(nbd(sock, "vm1-lun2"), "write -P 0x23 2M 64k")
        assert "Input/output error" in out, f"qemu-io write to a failing disk: {out.strip()}"
        eio = p.wait_for(lambda r: str(r.get("event", "")).startswith("disk I/O failing") and r.get("errno") == "EIO",
                         start=mark)
        assert eio["sense"] in ("0x3/0x11/0x00", "0x3/0x0c/0x00"), eio

        # The same guest's healthy LUN 0, another partition, and the daemon all go on.
        status, out = qemu_io(nbd(sock, "vm1"), "write -P 0x5a 1M 1M", "read -P 0x5a 1M 1M")
        assert status == 0 and "Pattern verification failed" not in out, f"LUN 0 after the faults: {out.strip()}"
        assert p.proc.poll() is None, "the parent died"
        assert not vm.events("session with the parent ended"), "the faulty disks cost vm1 its connection"
        assert not other.events("session with the parent ended"), "another partition noticed vm1's faulty disks"
        assert not [r for r in p.lines if r.get("level") == "error"], "a disk fault was logged as an error of ours"
        assert vm.stop() == 0
        assert other.stop() == 0
    finally:
        for proc in (vm, other):
            if proc is not None:
                proc.stop()
        p.stop()
