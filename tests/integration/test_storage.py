"""Storage end to end: real tools (qemu-img, qemu-io, nbdcopy) use a child partition's disk through its
NBD export, the StorVSC, VMBus, the StorVSP and a sparse image file in the parent's data directory."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmbus_proto.devices.storage import vstor
from vmbus_proto.envelope import encode_packet
from vmbus_proto.framing import FrameKind
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType

from .conftest import Parent, Proc, child
from .rawclient import RawClient

pytestmark = pytest.mark.integration
TOOLS = ("qemu-img", "qemu-io", "nbdcopy")


@pytest.fixture(autouse=True)
def _tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {missing}: apt-get install -y qemu-utils libnbd-bin (make test does)", pytrace=False)


def nbd_uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def run(*cmd: str, timeout: float = 120) -> str:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "Pattern verification failed" not in proc.stdout, proc.stdout
    return proc.stdout


def vm_with_disk(workdir: Path, url: str, name: str) -> tuple[Proc, Path]:
    sock = workdir / f"{name}.nbd"
    vm = child(workdir, url, name, "--nbd", f"unix:{sock}")
    vm.wait_event("disk exported over NBD")
    return vm, sock


def test_qemu_img_convert_and_compare_onto_the_vm_disk(parent: Parent, workdir: Path) -> None:
    vm, sock = vm_with_disk(workdir, parent.tcp, "vm1")
    src = workdir / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "96M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0xc3 40M 700k",
        "-c", "write -P 0x11 95M 1M", str(src))
    run("qemu-img", "convert", "-n", "-O", "raw", str(src), nbd_uri(sock, "vm1"))
    out = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), nbd_uri(sock, "vm1"))
    assert "Images are identical" in out
    # The bytes really are in the parent's image file: sparse, 1 GiB apparent, about the 96 MiB written
    # (convert -n writes the source's zero areas too).
    img = next((workdir / "parent" / "var").rglob("lun0.img"))
    with open(img, "rb") as fh:
        fh.seek(40 << 20)
        assert fh.read(700 * 1024) == b"\xc3" * (700 * 1024)
    st = img.stat()
    assert st.st_size == 1 << 30 and st.st_blocks * 512 <= 128 << 20
    assert vm.stop() == 0


def test_qemu_io_patterns_at_random_offsets_and_unmap(parent: Parent, workdir: Path) -> None:
    vm, sock = vm_with_disk(workdir, parent.unix, "vm1")
    rng = random.Random(7)
    cmds: list[str] = []
    spots = sorted(rng.sample(range(1, 1000), 12))
    for i, spot in enumerate(spots):
        offset, length = spot * 1024 * 1024 + 512 * rng.randrange(8), 4096 * rng.randrange(1, 40)
        cmds += ["-c", f"write -P {0x20 + i} {offset} {length}"]
    run("qemu-io", "-f", "raw", *cmds, nbd_uri(sock, "vm1"))
    reads: list[str] = []
    for c in cmds[1::2]:
        reads += ["-c", c.replace("write", "read")]
    run("qemu-io", "-f", "raw", *reads, nbd_uri(sock, "vm1"))
    # UNMAP through the whole stack punches a hole and reads back zeros.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 500M 4M", "-c", "discard 500M 4M", "-c", "read -P 0 500M 4M",
        nbd_uri(sock, "vm1"))
    assert vm.stop() == 0


def test_nbdcopy_round_trip(parent: Parent, workdir: Path) -> None:
    vm, sock = vm_with_disk(workdir, parent.unix, "vm1")
    data = os.urandom(8 << 20)
    src, back = workdir / "src.raw", workdir / "back.raw"
    src.write_bytes(data)
    run("nbdcopy", "--flush", str(src), nbd_uri(sock, "vm1"))
    run("nbdcopy", nbd_uri(sock, "vm1"), str(back))
    assert back.stat().st_size == 1 << 30
    with open(back, "rb") as fh:
        assert fh.read(len(data)) == data
    assert vm.stop() == 0


def test_flushed_writes_survive_kill_9_of_the_parent_and_a_child_reconnect(workdir: Path) -> None:
    p = Parent(workdir / "p")
    vm, sock = vm_with_disk(workdir, p.unix, "vm1")
    # FUA write and a write followed by a flush (SYNCHRONIZE CACHE -> fdatasync) before the crash.
    run("qemu-io", "-f", "raw", "-t", "writeback", "-c", "write -f -P 0xa1 8M 1M", "-c", "write -P 0xb2 16M 2M",
        "-c", "flush", nbd_uri(sock, "vm1"))
    assert p.stop(signal.SIGKILL) == -signal.SIGKILL
    vm.wait_event("session with the parent ended")
    mark = vm.mark()
    p2 = Parent(workdir / "p")
    try:
        vm.wait_event("all offered channels open", start=mark, timeout=20)
        run("qemu-io", "-f", "raw", "-c", "read -P 0xa1 8M 1M", "-c", "read -P 0xb2 16M 2M", nbd_uri(sock, "vm1"))
        # A new child process for the same partition sees the same disk.
        assert vm.stop(signal.SIGKILL) == -signal.SIGKILL
        vm2, sock2 = vm_with_disk(workdir, p2.unix, "vm1")
        run("qemu-io", "-f", "raw", "-c", "read -P 0xa1 8M 1M", nbd_uri(sock2, "vm1"))
        assert vm2.stop() == 0
    finally:
        p2.stop()


def test_partitions_only_reach_their_own_disks(parent: Parent, workdir: Path) -> None:
    vm1, s1 = vm_with_disk(workdir, parent.tcp, "vm1")
    vm2, s2 = vm_with_disk(workdir, parent.tcp, "vm2")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 1M", nbd_uri(s1, "vm1"))
    run("qemu-io", "-f", "raw", "-c", "read -P 0 0 1M", nbd_uri(s2, "vm2"))
    assert vm1.stop() == 0 and vm2.stop() == 0


def test_read_only_image_refuses_writes(workdir: Path) -> None:
    base = workdir / "base.img"
    base.write_bytes(b"\x42" * (4 << 20))
    p = Parent(workdir / "ro", f'[[storage.lun]]\nlun = 0\npath = "{base}"\nread_only = true\n')
    try:
        vm, sock = vm_with_disk(workdir, p.unix, "vm1")
        attached = vm.wait_event("disk attached")
        assert attached["read_only"] is True and attached["size"] == 4 << 20
        run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x42 0 4M", nbd_uri(sock, "vm1"))
        bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", nbd_uri(sock, "vm1")],
                             check=False, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 or "failed" in (bad.stdout + bad.stderr).lower()
        assert base.read_bytes() == b"\x42" * (4 << 20)
        assert vm.stop() == 0
    finally:
        p.stop()


def test_srb_whose_buffer_is_shorter_than_its_transfer_is_a_protocol_error(parent: Parent) -> None:
    c = RawClient(parent.tcp)
    offers = c.negotiate("badsrb")
    relid = next(r for r, o in offers.items() if o.if_type == vstor.SPEC.class_id)
    pages = vstor.SPEC.ring_bytes // 4096
    c.open(relid, pages, gpadl=0xE1E10)
    c.handshake(relid, vstor.VscHandshake())
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])  # READ(10) of 8 sectors = 4096 bytes
    srb = vstor.VmscsiRequest(cdb_length=10, data_in=vstor.DataDirection.READ, data_transfer_length=4096,
                              data=cdb.ljust(20, b"\0"))
    payload = vstor.pack_request(vstor.Operation.EXECUTE_SRB, srb.pack())
    short = Packet(PacketType.DATA_USING_GPA_DIRECT, FLAG_COMPLETION_REQUESTED, 99, payload,
                   ranges=(GpaRange(512, 0, (0x2000,)),))
    c.send_frame(FrameKind.PACKET, relid, encode_packet(short))
    reason = c.wait_closed()
    assert reason is not None and "EXECUTE_SRB for 4096 bytes with a 512-byte buffer" in reason


def test_disks_of_a_partition_that_left_are_flushed_and_closed(workdir: Path) -> None:
    p = Parent(workdir / "idle", "[storage]\nidle_close = 0.5\n")
    try:
        vm = child(workdir, p.unix, "vm1")
        vm.wait_event("all offered channels open")

        def open_images() -> list[str]:
            fds = Path(f"/proc/{p.proc.pid}/fd")
            return [os.readlink(f) for f in fds.iterdir() if os.readlink(f).endswith("lun0.img")]

        assert len(open_images()) == 1
        assert vm.stop() == 0
        p.wait_event("VMBus disconnected", partition="vm1")
        deadline = time.monotonic() + 10
        while open_images() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_images() == []
    finally:
        p.stop()


@pytest.mark.parametrize("rw", ["randrw", "write"])
def test_load_generator_reports_fio_style_results(parent: Parent, workdir: Path, rw: str) -> None:
    out = workdir / f"{rw}.json"
    proc = subprocess.run([str(Path(sys.executable).parent / "child-partition"), "load", "storage", "--connect",
                           parent.unix, "--rw", rw, "--bs", "8k", "--iodepth", "4", "--runtime", "1",
                           "--ramp", "0.2", "--partitions", "2", "--size", "64M", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clat percentiles (usec)" in proc.stdout and "partitions: 2 ok, 0 failed" in proc.stdout
    res = json.loads(out.read_text())
    storage = res["workloads"]["storage"]
    assert res["errors"] == [] and storage["partitions_ok"] == 2
    ops = storage["ops"]
    assert ops["write"]["ops"] > 0 and ops["write"]["bytes"] == ops["write"]["ops"] * 8192
    if rw == "randrw":
        assert ops["read"]["ops"] > 0
        p = ops["read"]["latency_us"]["percentiles"]
        assert 0 < p["50"] <= p["99"] <= p["99.99"]
    else:
        assert "read" not in ops, ops["read"]
    # The guests unloaded cleanly and the parent logged no errors.
    assert not [r for r in parent.lines if r.get("level") == "error"]


def test_storage_protocol_versions_are_configurable(workdir: Path) -> None:
    """A host offering only VSTOR 6.0 and 5.1: the guest's first try (6.2) is refused and it settles on 6.0."""
    p = Parent(workdir / "v60", '[storage]\nprotocol_versions = ["6.0", "5.1"]\n')
    try:
        vm = child(workdir, p.unix, "vm1")
        vm.wait_event("disk attached")
        assert p.wait_event("device protocol negotiated", device="storage")["version"] == "6.0"
        assert vm.stop() == 0
    finally:
        p.stop()


def test_unknown_storage_protocol_version_is_a_config_error(workdir: Path) -> None:
    cfg = workdir / "bad.toml"
    cfg.write_text('[storage]\nprotocol_versions = ["7.0"]\n')
    proc = subprocess.run([str(Path(sys.executable).parent / "parent-partition"), "serve", "--config", str(cfg)],
                          check=False, capture_output=True, text=True, timeout=60, cwd=workdir)
    assert proc.returncode == 2
    assert "[storage] protocol_versions: must be a non-empty list of '2.0', '4.2', '5.1', '6.0', '6.2'" in proc.stderr


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_load_generator_interrupted_mid_run_reports_what_it_did(parent: Parent, workdir: Path, sig: int,
                                                                 status: int) -> None:
    """Ctrl-C (or SIGTERM) mid-run: the requests in flight finish, the results so far are printed (and written
    with --json), the disk is discarded and the guest unloads; the status is 128 + the signal."""
    out = workdir / "interrupted.json"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "child-partition"), "load", "storage", "--connect",
                             parent.unix, "--rw", "randwrite", "--iodepth", "8", "--runtime", "600", "--ramp", "0",
                             "--size", "64M", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        name = f"load-{proc.pid}-0"
        image = parent.unix_path.parent.parent / "var" / name / "lun0.img"
        deadline = time.monotonic() + 90
        while not (image.exists() and image.stat().st_blocks > 0):  # the guest's writes reach its image
            assert proc.poll() is None and time.monotonic() < deadline, f"no write reached {image}"
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, f"exit status {proc.returncode}, expected {status}\n{stdout}{stderr}"
    assert f"interrupted by {signal.Signals(sig).name}" in stderr, stderr
    assert "write: IOPS=" in stdout and "partitions: 1 ok, 0 failed" in stdout, stdout
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["workloads"]["storage"]["ops"]["write"]["ops"] > 0, res
    assert res["seconds"] < 600 and res["interrupted"] == signal.Signals(sig).name, res
    parent.wait_event("VMBus disconnected", 30, partition=name)
    assert not parent.complaints(), "the parent complained"
