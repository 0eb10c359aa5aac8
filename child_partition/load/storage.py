"""``child-partition load storage``: a load generator that drives real StorVSC channels like fio drives a disk.

Each partition is a real guest on its own VMBus connection: it negotiates, binds only the StorVSC (the
other offers are left unopened, as a guest without those drivers would), and then ``iodepth`` workers keep
requests in flight (closed loop, ``--iodepth`` as fio's) or issues them at ``--rate`` (open loop) through the
same block-device path that NBD uses: READ(10)/WRITE(10) EXECUTE_SRBs with the data in guest pages. The
engine (``engine.py``) times, counts and reports them; this module adds what fio adds: completion latency
percentiles, IOPS and bandwidth per direction. SIGINT (Ctrl-C) or SIGTERM ends the run early, as fio's does.

The parent creates a sparse image for each new partition name (``<data_dir>/<name>/lun0.img``), and every run
uses fresh names, so the tool cleans up after itself unless ``--keep-disks``: before unloading, each guest
discards its whole disk (SCSI WRITE SAME/UNMAP, as ``blkdiscard`` would), which hands the space back to the
host; with ``--data-dir`` (the parent's, on this host) it also deletes the emptied images and their
directories, which nothing in VMBus can ask the parent to do.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console

from vmbus_proto.aio import logs
from vmbus_proto.devices.storage import vstor

from ..devices.ata.driver import PIO_MODES, AtaDisk
from ..devices.ata.portio import PortIo
from ..devices.storage.vsc import ScsiLun, StorageVsc
from .args import number, parse_size, size
from .guest import Guest, started
from .workload import Done, LoadOptions, OpError, Recorder

MODES = ("read", "write", "randread", "randwrite", "randrw", "rw")
PATHS = ("synthetic", "emulated")  # StorVSC over VMBus, or the emulated IDE disk by trapped port I/O
GUEST_MEMORY = 256 * 1024 * 1024


class StoragePartition(Guest):
    """One load-generating guest with only its StorVSC bound; its workers share one sequential cursor."""

    def __init__(self, workload: StorageWorkload, name: str) -> None:
        super().__init__(workload.options.connect, name, GUEST_MEMORY,
                         logs.get(component="load").bind(partition=name), workload.options.secret)
        self.workload = workload
        self.storage: StorageVsc | None = None
        self.ata: AtaDisk | None = None
        self.io: PortIo | None = None
        self.rnd = random.Random(hash(name))
        self.cursor = 0
        self.blocks = 1
        self.payload = b""

    async def start(self) -> None:
        w = self.workload
        if w.path == "emulated":
            # The emulated disk is no VMBus device: connect, bind nothing, and probe the IDE channel.
            await self.connect()
            assert self.bus is not None
            self.io = PortIo(self.bus)
            self.ata = AtaDisk(self.io, w.pio)
            await self.ata.probe()
            self.blocks = max(1, min(w.size or self.ata.size, self.ata.size) // w.bs)
            self.payload = os.urandom(w.bs)
            return
        offer = await self.offer(lambda o: o.if_type == vstor.SPEC.class_id, "storage controller")
        assert self.bus is not None
        self.vsc = self.storage = StorageVsc(self.bus, self.memory, offer, self.log)
        await self.storage.attach()
        if 0 not in self.storage.disks:
            raise RuntimeError("the storage controller has no disk at LUN 0")
        disk = self.disk
        self.blocks = max(1, min(w.size or disk.size, disk.size) // w.bs)
        self.payload = os.urandom(w.bs)

    @property
    def disk(self) -> ScsiLun | AtaDisk:
        if self.ata is not None:
            return self.ata
        assert self.storage is not None
        return self.storage.disks[0]

    async def operation(self, rec: Recorder) -> Done:
        w = self.workload
        if w.sequential:
            offset = (self.cursor % self.blocks) * w.bs
            self.cursor += 1
        else:
            offset = int(self.rnd.random() * self.blocks) * w.bs
        is_read = self.rnd.random() < w.read_share if w.mixed else w.all_reads
        disk = self.disk
        try:
            if is_read:
                await disk.read(offset, w.bs)
            else:
                await disk.write(offset, self.payload)
        except (OSError, RuntimeError, ValueError) as exc:
            raise OpError("read" if is_read else "write", f"{self.name}: offset {offset}: {exc}") from exc
        return Done("read" if is_read else "write", w.bs)

    async def discard_disks(self) -> str:
        """Hand every writable disk's space back to the host (a whole-disk discard); what was done."""
        assert self.storage is not None
        done = []
        for lun, disk in self.storage.disks.items():
            if disk.supports_discard:
                await disk.discard(0, disk.size)
                done.append(f"LUN {lun} discarded")
        return ", ".join(done) or "nothing to discard"

    async def stop(self) -> None:
        if self.ata is not None and self.io is not None:
            c = self.io.counters
            self.workload.exits.append({"partition": self.name, "exits": c.exits, "bytes_sent": c.bytes_sent,
                                        "bytes_received": c.bytes_received, "busy_polls": self.ata.polls})
        if self.storage is not None and not self.workload.keep_disks:
            try:
                outcome = await self.discard_disks()
            except Exception as exc:
                outcome = f"discard failed: {exc}"
            self.workload.cleanup.append(f"{self.name}: {outcome}")
        await self.leave()


class StorageWorkload:
    """fio-style block I/O through StorVSC channels."""

    name: ClassVar[str] = "storage"
    description: ClassVar[str] = (
        "fio-style block I/O through StorVSC channels\n\n"
        "Each partition connects, opens its storage channel and keeps --iodepth SCSI requests in flight\n"
        "(or issues them at --rate per second). Before leaving, each guest discards its disk unless\n"
        "--keep-disks; with --data-dir (the parent's, on this host) the emptied images are deleted too.")
    prefix: ClassVar[str] = "load"
    default_concurrency: ClassVar[int] = 32
    concurrency_aliases: ClassVar[tuple[str, ...]] = ("--iodepth",)

    def __init__(self, options: LoadOptions, rw: str, bs: int, size: int, rwmixread: int, keep_disks: bool,
                 data_dir: str | None, path: str = "synthetic", pio: str = "string") -> None:
        if bs <= 0 or bs % 512:
            raise ValueError("--bs must be a positive multiple of 512")
        if rw not in MODES:
            raise ValueError(f"--rw {rw!r}: one of {', '.join(MODES)}")
        self.options, self.rw, self.bs, self.size = options, rw, bs, size
        self.rwmixread, self.keep_disks, self.data_dir = rwmixread, keep_disks, data_dir
        self.sequential = rw in ("read", "write", "rw")
        self.mixed = rw in ("randrw", "rw")
        self.all_reads = rw in ("read", "randread")
        self.read_share = rwmixread / 100
        self.cleanup: list[str] = []
        if path not in PATHS or pio not in PIO_MODES:
            raise ValueError(f"--path {path!r} / --pio {pio!r}: one of {PATHS} / {PIO_MODES}")
        self.path, self.pio = path, pio
        self.exits: list[dict[str, Any]] = []  # the emulated path's VM exits, per partition

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rw", default="randread", choices=MODES, help="I/O pattern, as fio's --rw")
        parser.add_argument("--bs", default="4k", metavar="SIZE", type=size,
                            help="block size, a multiple of 512 (as 4k, 1M)")
        parser.add_argument("--size", metavar="SIZE", type=size,
                            help="bytes of each disk to use, as 64M (default: the whole disk)")
        parser.add_argument("--rwmixread", metavar="PERCENT", type=number(int, 0, 100), default=50,
                            help="percent reads for randrw and rw")
        parser.add_argument("--keep-disks", action="store_true",
                            help="leave the partitions' disks as the run left them (default: discard them at the end)")
        parser.add_argument("--path", default="synthetic", choices=PATHS,
                            help="synthetic: StorVSC over VMBus; emulated: the IDE disk on trapped I/O ports "
                                 "(the same image; one partition's I/O is then QD1)")
        parser.add_argument("--pio", default="string", choices=PIO_MODES,
                            help="emulated path: rep insw/outsw (string) or one inw/outw a word (word)")
        parser.add_argument("--data-dir", metavar="DIR",
                            help="the parent's data directory (same host): also delete the images it created for "
                                 "the run")

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: LoadOptions) -> StorageWorkload:
        return cls(options, rw=args.rw, bs=parse_size(args.bs), size=parse_size(args.size) if args.size else 0,
                   rwmixread=args.rwmixread, keep_disks=args.keep_disks, data_dir=args.data_dir,
                   path=args.path, pio=args.pio)

    async def setup(self) -> None:
        return None

    async def start_partition(self, index: int) -> StoragePartition:
        part = StoragePartition(self, f"{self.options.prefix}-{index}")
        await started(part, part.start, part.stop)
        return part

    async def teardown(self) -> dict[str, Any]:
        if not self.keep_disks and self.data_dir is not None:
            first = self.options.first_index
            names = [f"{self.options.prefix}-{i}" for i in range(first, first + self.options.partitions)]
            self.cleanup.extend(remove_images(Path(self.data_dir), names))
        extra: dict[str, Any] = {"disks": self.cleanup}
        if self.path == "emulated":
            extra["exits"] = self.exits
        return extra

    @classmethod
    def render(cls, section: dict[str, Any], console: Console) -> None:
        """fio's lines: the job, then per direction IOPS, bandwidth and the completion latency percentiles."""
        o = section["options"]
        console.print(f"storage: (g=0): rw={o['rw']}, bs={o['bs']}, iodepth={o['concurrency']}, "
                      f"partitions={section['partitions']}" + (f", rate={o['rate']:g}/s" if o["rate"] else ""))
        for name in ("read", "write"):
            d = section["ops"].get(name)
            if not d or not d["ops"]:
                continue
            lat = d["latency_us"]
            bw = d["bytes_per_s"]
            seconds = d["ops"] / d["ops_per_s"] if d["ops_per_s"] else 0.0
            console.print(f"  {name}: IOPS={d['ops_per_s'] / 1000:.1f}k, BW={bw / (1 << 20):.1f}MiB/s "
                          f"({bw / 1e6:.1f}MB/s)({d['bytes'] / (1 << 20):.0f}MiB/{seconds * 1000:.0f}msec)")
            console.print(f"    clat (usec): min={lat['min']}, max={lat['max']}, avg={lat['mean']:.2f}, "
                          f"stdev={lat['stddev']:.2f}")
            console.print("    clat percentiles (usec):")
            cells = [f"{float(p):5.2f}th=[{v:6d}]" for p, v in lat["percentiles"].items()]
            for i in range(0, len(cells), 4):
                console.print("     | " + ", ".join(cells[i:i + 4]) + ("," if i + 4 < len(cells) else ""))
        for e in section["extra"].get("exits", []):
            console.print(f"  exits: {e['partition']}: {e['exits']} VM exits ({e['busy_polls']} busy polls), "
                          f"{e['bytes_sent']} bytes sent, {e['bytes_received']} received")
        for line in section["extra"].get("disks", []):
            console.print(f"  disks: {line}")


def remove_images(data_dir: Path, names: list[str]) -> list[str]:
    """Delete the images the parent created for these partitions (``<data_dir>/<name>/lun<N>.img``) and the
    directories they leave empty; the names are the tool's own (``load-<pid>-<i>``), so nothing else is hit."""
    done = []
    for name in names:
        directory = data_dir / name
        images = sorted(directory.glob("lun*.img"))
        if not images and not directory.exists():
            continue
        for image in images:
            image.unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError as exc:
            if directory.exists():
                done.append(f"{name}: removed {len(images)} image(s), kept {directory}: {exc.strerror}")
                continue
        done.append(f"{name}: removed {len(images)} image(s) from {directory}")
    return done
