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
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.recovery import StampedWriter, acknowledged, missing, run_once, written
from vmbus_proto import messages as m
from vmbus_proto.devices.registry import ALL as OFFERED
from vmbus_proto.gpadl import split

from .conftest import FAST_LIMITS, Parent, Proc, child
from .load_driver import Api
from .rawclient import RawClient

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


# -- kill -9 of a child at awkward moments -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_parent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parent]:
    """This module's parent, with its web API, and disks closed as soon as their last channel is (by default they
    stay open 30 s for a returning partition), so everything a partition held is released at once."""
    p = Parent(tmp_path_factory.mktemp("shared") / "parent", FAST_LIMITS + "\n[storage]\nidle_close = 0\n",
               extra=["--http", "127.0.0.1:0"])
    yield p
    p.stop()


@pytest.fixture(scope="module")
def api(shared_parent: Parent) -> Api:
    return Api(shared_parent.wait_event("web console and API listening")["url"])


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def gone(parent: Parent, api: Api, name: str, mark: int, baseline: int) -> None:
    """Everything ``name`` held is released: the parent said so, the API lists neither the partition nor its
    channels and GPADLs, and the parent's file descriptors are back to ``baseline``."""
    parent.wait_event("partition disconnected", start=mark, partition=name)
    api.until(lambda: name not in api.names(), f"{name} leaves /api/partitions")
    with pytest.raises(urllib.error.HTTPError) as missing:
        api.get(f"/api/partitions/{name}/gpadls")
    assert missing.value.code == 404, f"/api/partitions/{name}/gpadls answered {missing.value.code}"
    api.until(lambda: fds(parent.proc.pid) <= baseline,
              f"the parent's fds are back to {baseline} (now {fds(parent.proc.pid)})")


def kill_hard(client: RawClient) -> None:
    """What the kernel does to a killed process's socket with data unread: RST, no CLOSE frame."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def healthy(parent: Parent, name: str) -> None:
    """``name`` connects, gets every offer and opens a channel over a full GPADL."""
    c = RawClient(parent.unix)
    try:
        offers = c.negotiate(name)
        assert len(offers) == len(OFFERED), f"{name} got {len(offers)} offers, not {len(OFFERED)}"
        c.open(min(offers), 4, next(_gpadl_ids))
    finally:
        c.close()


_gpadl_ids = itertools.count(0x200000)


def test_kill_9_of_a_child_with_storage_io_in_flight(shared_parent: Parent, api: Api, bystander: Proc,
                                                     tmp_path: Path) -> None:
    p = shared_parent
    baseline = fds(p.proc.pid)
    sock = tmp_path / "victim.nbd"
    vm = child(tmp_path, p.unix, "victim", "--nbd", f"unix:{sock}")
    writer: subprocess.Popen[str] | None = None
    try:
        vm.wait_event("nbd server listening")
        image = next((p.unix_path.parent.parent / "var" / "victim").glob("lun0.img"))
        # A long stream of writes: requests are always in flight on the storage channel.
        writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 768M", nbd(sock, "victim")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        api.until(lambda: image.stat().st_blocks * 512 >= 16 * MiB, "the writes reach the image")
        mark = p.mark()
        assert vm.stop(signal.SIGKILL) == -signal.SIGKILL
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode != 0 or "error" in out.lower(), f"qemu-io did not notice its disk go: {out}"
        gone(p, api, "victim", mark, baseline)
        # The same name at once: a new child of that name opens every channel and reads what was written.
        vm = child(tmp_path, p.unix, "victim", "--nbd", f"unix:{sock}")
        vm.wait_event("nbd server listening")
        status, out = qemu_io(nbd(sock, "victim"), "read -P 0x3c 0 4M")
        assert status == 0 and "Pattern verification failed" not in out, f"the first 4 MiB after the kill: {out}"
        assert vm.stop() == 0
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        vm.stop()


def test_kill_9_in_the_middle_of_a_gpadl_exchange(shared_parent: Parent, api: Api, bystander: Proc) -> None:
    p = shared_parent
    baseline = fds(p.proc.pid)
    c = RawClient(p.unix)
    offers = c.negotiate("gpadl-victim")
    c.open(min(offers), 4, next(_gpadl_ids))  # one channel open, with its ring GPADL
    # A 200-page GPADL: the header goes, its 7 bodies never do.
    header, bodies = split(max(offers), next(_gpadl_ids), list(range(0x4000, 0x4000 + 200)))
    assert len(bodies) > 1
    c.send(header)
    c.send(bodies[0])
    mark = p.mark()
    kill_hard(c)
    gone(p, api, "gpadl-victim", mark, baseline)
    healthy(p, "gpadl-victim")


def test_kill_9_between_openchannel_and_its_result(shared_parent: Parent, api: Api, bystander: Proc) -> None:
    p = shared_parent
    baseline = fds(p.proc.pid)
    c = RawClient(p.unix)
    offers = c.negotiate("open-victim")
    # Every channel's ring GPADL accepted, then every OPENCHANNEL sent (storage opens its disks), and gone
    # before a single OPENCHANNEL_RESULT is read.
    gpadls = {}
    for relid in offers:
        gpadls[relid] = next(_gpadl_ids)
        header, bodies = split(relid, gpadls[relid], list(range(0x1000, 0x1000 + 8)))
        for msg in [header, *bodies]:
            c.send(msg)
    for relid, gid in gpadls.items():
        c.expect(m.GpadlCreated)
        c.send(m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gid,
                             downstream_ringbuffer_pageoffset=4))
    mark = p.mark()
    kill_hard(c)
    gone(p, api, "open-victim", mark, baseline)
    healthy(p, "open-victim")


# -- kill -9 of the parent under write load ------------------------------------------------------------------------

def test_every_acknowledged_flush_survives_kill_9_of_the_parent_and_the_guest_resumes(tmp_path: Path) -> None:
    """bench/recovery.py's run: stamped blocks, each flushed, through qemu-io -> NBD -> StorVSC -> StorVSP; the
    parent is killed with SIGKILL mid-stream and restarted on the same data dir; the child reconnects by itself,
    its writes go on, and every block acknowledged after a flush reads back, through the guest and from the file."""
    r = run_once(tmp_path, flushed=24, blocks=2048)
    assert r["acknowledged_before_kill"] >= 24, r
    assert r["lost_blocks"] == 0, f"acknowledged blocks lost: {r['lost']}"
    assert r["guest_read_ok"], "the guest read back a block it had flushed wrongly"
    assert r["failed_commands"] == 0, f"the guest saw errors across the restart: {r['failed_sample']}"


# -- graceful SIGTERM of the parent while a child is busy ----------------------------------------------------------

def test_sigterm_with_writes_in_flight_drains_flushes_rescinds_and_exits_0(tmp_path: Path) -> None:
    p = Parent(tmp_path / "parent")
    sock = tmp_path / "vm1.nbd"
    vm = child(tmp_path, p.unix, "vm1", "--nbd", f"unix:{sock}")
    writer: StampedWriter | None = None
    p2: Parent | None = None
    try:
        vm.wait_event("nbd server listening")
        writer = StampedWriter(nbd(sock, "vm1"), 4096)
        writer.wait_acknowledged(16, 120)
        mark = vm.mark()
        assert p.stop(signal.SIGTERM) == 0, "the parent's graceful shutdown did not exit 0"
        # Offers rescinded (the child saw them go), every disk flushed and closed, nothing logged as an error.
        vm.wait_event("offer rescinded", start=mark)
        assert p.events("disk closed"), "the parent closed no disk"
        assert not [r for r in p.lines if r.get("level") == "error"], "the shutdown logged errors"
        # Every write the guest saw complete is in the image as the parent left it: drained, then flushed.
        done = written(writer.lines())
        assert len(done) >= 16
        lost = missing(tmp_path / "parent" / "var" / "vm1" / "lun0.img", done)
        assert not lost, f"completed writes missing from the image after SIGTERM: {lost[:10]}"
        # What was in flight failed cleanly or waits for the parent: it comes back and the guest goes on.
        mark = vm.mark()
        p2 = Parent(tmp_path / "parent")
        vm.wait_event("all offered channels open", start=mark)
        writer.out.wait(lambda x: x.startswith("wrote"), "a write after the restart", 120, len(writer.lines()))
        assert all("Input/output error" in x or "No space" in x for x in writer.failed()), writer.failed()
        writer.stop()
        assert not missing(tmp_path / "parent" / "var" / "vm1" / "lun0.img", acknowledged(writer.lines()))
        assert vm.stop() == 0
    finally:
        if writer is not None:
            writer.stop()
        vm.stop()
        p.stop()
        if p2 is not None:
            p2.stop()
