"""The soak test's journaling disk writer: one child partition that writes verifiable blocks through a real
StorVSC channel and records each write the parent acknowledged, so that a checker can find any lost one.

What a guest's filesystem journal relies on (a write, then SYNCHRONIZE CACHE, then the write counts as durable;
Linux's ``REQ_PREFLUSH``): the writer picks a block of the first ``--blocks`` 4 KiB blocks of LUN 0, appends
``I <lba> <generation>`` to its journal, WRITE(10)s the block's content for (partition, lba, generation),
SYNCHRONIZE CACHE(10)s, and only then appends ``A <lba> <generation>``. Generations only go up, across restarts
too (read back from the journal), so a block's last ``A`` names what the disk must hold, or a later write that
was issued but never acknowledged (the writer was killed between its ``I`` and its ``A``).

Like ``child-partition run``, it reconnects with backoff when the parent goes away, and leaves cleanly (close,
UNLOAD) on SIGTERM or SIGINT, exiting 0. ``python -m bench.soak_writer --connect URL --name NAME --journal PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from child_partition.devices.storage.vsc import StorageVsc
from child_partition.load.guest import Guest
from vmbus_proto.aio import logs
from vmbus_proto.devices.storage import vstor

BLOCK = 4096
SECTOR = 512
GUEST_MEMORY = 32 * 1024 * 1024
BACKOFF = (0.2, 2.0)  # seconds: first and longest wait before reconnecting


def sector(name: str, lba: int, gen: int, index: int) -> bytes:
    """Sector ``index`` of block ``lba``'s content at ``gen``: a readable header, then bytes of its digest."""
    head = f"vmbus-soak|{name}|{lba}|{gen}|{index}|".encode()
    digest = hashlib.sha256(head).digest()
    return (head + digest * (SECTOR // len(digest) + 1))[:SECTOR]


def content(name: str, lba: int, gen: int) -> bytes:
    return b"".join(sector(name, lba, gen, i) for i in range(BLOCK // SECTOR))


@dataclass
class Journal:
    """A writer's journal as the checker reads it: per block, the generations issued and acknowledged."""

    issued: dict[int, set[int]] = field(default_factory=dict)
    acked: dict[int, int] = field(default_factory=dict)  # block -> its last acknowledged generation
    acknowledged: int = 0  # acknowledged writes in all (a block's earlier ones are overwritten by later ones)
    last_gen: int = 0

    @classmethod
    def read(cls, path: Path) -> Journal:
        j = cls()
        if not path.exists():
            return j
        for line in path.read_text(encoding="ascii").splitlines():
            parts = line.split()
            if len(parts) != 3 or parts[0] not in ("I", "A"):
                continue  # a line cut short by a kill -9
            lba, gen = int(parts[1]), int(parts[2])
            j.last_gen = max(j.last_gen, gen)
            if parts[0] == "I":
                j.issued.setdefault(lba, set()).add(gen)
            else:
                j.acked[lba] = max(gen, j.acked.get(lba, 0))
                j.acknowledged += 1
        return j

    def candidates(self, lba: int) -> list[int]:
        """The generations block ``lba`` may hold: its last acknowledged one, or one issued after it."""
        last = self.acked[lba]
        return [last, *sorted(g for g in self.issued.get(lba, ()) if g > last)]


def lost_blocks(name: str, journal: Journal, image: Path) -> list[tuple[int, int, str]]:
    """Blocks whose acknowledged write the image does not hold: (lba, generation, what each bad sector holds)."""
    lost: list[tuple[int, int, str]] = []
    with open(image, "rb") as fh:
        for lba in sorted(journal.acked):
            fh.seek(lba * BLOCK)
            data = fh.read(BLOCK)
            gens = journal.candidates(lba)
            bad = []
            for i in range(BLOCK // SECTOR):
                got = data[i * SECTOR:(i + 1) * SECTOR]
                if not any(got == sector(name, lba, g, i) for g in gens):
                    bad.append(f"sector {i}: {_describe(got)}")
            if bad:
                lost.append((lba, journal.acked[lba], "; ".join(bad[:2])))
    return lost


def _describe(got: bytes) -> str:
    if not got.strip(b"\0"):
        return "zeros"
    head = got.split(b"|")
    return "|".join(x.decode(errors="replace") for x in head[1:5]) if head[0] == b"vmbus-soak" else "other bytes"


class Writer(Guest):
    """One connection's worth of journaled writes; a new one for each reconnect."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(url, name, GUEST_MEMORY, logs.get(component="soak-writer"))
        self.storage: StorageVsc | None = None

    async def start(self) -> None:
        offer = await self.offer(lambda o: o.if_type == vstor.SPEC.class_id, "storage controller")
        assert self.bus is not None
        self.vsc = self.storage = StorageVsc(self.bus, self.memory, offer, self.log)
        await asyncio.wait_for(self.storage.attach(), 30)
        if 0 not in self.storage.disks:
            raise RuntimeError("the storage controller has no disk at LUN 0")

    async def write(self, lba: int, gen: int) -> None:
        assert self.storage is not None
        disk = self.storage.disks[0]
        await asyncio.wait_for(disk.write(lba * BLOCK, content(self.name, lba, gen)), 60)
        await asyncio.wait_for(disk.flush(), 60)


async def run(args: argparse.Namespace, fh: TextIO) -> int:
    log = logs.get(component="soak-writer").bind(partition=args.name)
    journal = Journal.read(args.journal)
    gen = journal.last_gen
    rnd = random.Random(f"{args.seed}:{args.name}:{gen}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    backoff = BACKOFF[0]
    acked = 0
    while not stopping.is_set():
        w = Writer(args.connect, args.name)
        try:
            await w.start()
            log.info("writing", blocks=args.blocks, next_generation=gen + 1)
            backoff = BACKOFF[0]
            while not stopping.is_set():
                lba, gen = rnd.randrange(args.blocks), gen + 1
                fh.write(f"I {lba} {gen}\n")  # in the kernel before the write goes
                await w.write(lba, gen)
                fh.write(f"A {lba} {gen}\n")
                acked += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), args.interval)
        except Exception as exc:  # the parent went away, refused us for now, or a command failed
            log.warning("session ended; reconnecting", error=f"{type(exc).__name__}: {exc}",
                        retry_in=round(backoff, 2))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.leave(), 10)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), backoff * rnd.uniform(0.5, 1.0))
            backoff = min(BACKOFF[1], backoff * 2)
            continue
        await asyncio.wait_for(w.leave(), 30)
    log.info("unloaded cleanly", acknowledged=acked)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak_writer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", required=True, help="the parent's address: unix:PATH or tcp://HOST:PORT")
    ap.add_argument("--name", required=True, help="the partition's name (its disk is kept under it)")
    ap.add_argument("--journal", type=Path, required=True, help="append the I/A lines here")
    ap.add_argument("--blocks", type=int, default=256, help="write among the first N 4 KiB blocks of LUN 0")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between acknowledged writes")
    ap.add_argument("--seed", default="0", help="the block choices' seed (with the name and generation)")
    ap.add_argument("--json-logs", action="store_true", help="log JSON lines")
    args = ap.parse_args(argv)
    logs.setup("info", json=True if args.json_logs else None)
    with open(args.journal, "a", buffering=1, encoding="ascii") as fh:  # line-buffered
        return asyncio.run(run(args, fh))


if __name__ == "__main__":
    sys.exit(main())
