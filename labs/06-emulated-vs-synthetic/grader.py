"""Lab 6's grader: the student's ATA PIO read against a real parent's IDE controller, the measurement table
from real runs of both disk paths, and the predictions and explanations.

The driver is checked by what it did, not how fast: every VM exit it took is in ``emulab.TracedPortIo``'s
trace, and the exit count of a read is exact (docs/protocol.md §13.2) once the status polls that found the
drive busy are set aside (how many of those there are depends on the disk and the machine's load). The table
is checked for shape and arithmetic, never speed. The written answers get a lenient key-term check
(``labs.harness.key_terms``): a grader cannot judge prose, and your instructor reads them.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from labs.harness import Context, Failed, Lab, Step, answer, answers, import_file, key_terms, parent
from vmbus_proto.aio import logs
from vmbus_proto.devices.ata.registers import (
    DATA,
    DEV_LBA,
    DEVICE,
    ERROR,
    LBA_HIGH,
    LBA_LOW,
    LBA_MID,
    NSECTOR,
    SECTOR,
    STATUS,
    Command,
    Error,
    Status,
)

HERE = Path(__file__).resolve().parent
TIMEOUT = 90.0
LBA = 0x012345  # three LBA bytes that differ, so a swapped register shows
TASK_FILE = (NSECTOR, LBA_LOW, LBA_MID, LBA_HIGH, DEVICE)
READS = (Command.READ_SECTORS, Command.READ_SECTORS_NORETRY)


def _emulab() -> ModuleType:
    return import_file(HERE / "emulab.py", "_lab6_emulab")


def model_exits(sectors: int, pio: str) -> int:
    """A polled PIO read with no busy status: a status read, six OUTs (five task-file registers and the command),
    per sector a status read and the data (one ``rep insw`` exit, or 256 ``inw``), a final status read."""
    return 1 + 6 + sectors * (1 + (1 if pio == "string" else 256)) + 1


def _on_guest(ctx: Context, body: Callable[[Any], Awaitable[None]]) -> None:
    """``body(g)`` on an ``emulab`` guest of a fresh parent."""
    async def main(url: str) -> None:
        async with _emulab().guest(url, "lab6-grader") as g:
            await asyncio.wait_for(body(g), TIMEOUT)

    logs.setup("warning")
    with parent(ctx.tmp) as (_, url):
        try:
            asyncio.run(main(url))
        except TimeoutError:
            raise Failed(f"read_sectors did not return within {TIMEOUT:g}s: is it polling forever?") from None


def _shape(a: Any) -> str:
    return f"{a.direction} {a.port:#x} (size {a.size}, count {a.count})"


def _check_trace(trace: list[Any], sectors: int, pio: str) -> None:
    """The exits of one read, busy polls set aside, against the register sequence the model expects."""
    seq = [a for a in trace if not a.busy]
    busy = len(trace) - len(seq)
    want = model_exits(sectors, pio)
    if len(seq) != want:
        raise Failed(f"{sectors} sector(s) with {pio} PIO took {len(seq)} exits besides {busy} busy polls; "
                     f"the model says {want}: " + ", ".join(_shape(a) for a in seq[:12])
                     + (" ..." if len(seq) > 12 else ""))
    if not (seq[0].direction == "in" and seq[0].port == STATUS):
        raise Failed(f"the first exit is {_shape(seq[0])}: read the status (0x1f7) until BSY clears first")
    outs = seq[1:7]
    if any(a.direction != "out" or a.size != 1 for a in outs) or outs[-1].port != STATUS:
        raise Failed("after the status: five byte OUTs to the task file, then the command to 0x1f7; got "
                     + ", ".join(_shape(a) for a in outs))
    regs = {a.port: a.data[0] for a in outs[:5]}
    if set(regs) != set(TASK_FILE):
        raise Failed(f"the task file is 0x1f2-0x1f6; you wrote {', '.join(hex(p) for p in regs)}")
    expect = {NSECTOR: sectors & 0xFF, LBA_LOW: LBA & 0xFF, LBA_MID: LBA >> 8 & 0xFF, LBA_HIGH: LBA >> 16 & 0xFF}
    wrong = [f"{p:#x} = {regs[p]:#04x}, expected {v:#04x}" for p, v in expect.items() if regs[p] != v]
    if not regs[DEVICE] & DEV_LBA or regs[DEVICE] & 0x1F != LBA >> 24 & 0x0F:
        wrong.append(f"device (0x1f6) = {regs[DEVICE]:#04x}: set LBA (0x40), device 0, and LBA bits 24-27 in bits 0-3")
    if outs[-1].data[0] not in READS:
        wrong.append(f"command {outs[-1].data[0]:#04x} is not READ SECTORS (0x20)")
    if wrong:
        raise Failed("; ".join(wrong))
    per = 1 if pio == "string" else 256
    for i in range(sectors):
        block = seq[7 + i * (1 + per): 7 + (i + 1) * (1 + per)]
        if block[0].direction != "in" or block[0].port != STATUS or not block[0].data[0] & Status.DRQ:
            raise Failed(f"sector {i}: read the status and see DRQ before the data port; got {_shape(block[0])}")
        want_shape = ("in", DATA, 2, 256) if pio == "string" else ("in", DATA, 2, 1)
        bad = [a for a in block[1:] if (a.direction, a.port, a.size, a.count) != want_shape]
        if bad:
            how = "one rep_ins(0x1f0, 2, 256)" if pio == "string" else "256 inw(0x1f0)"
            raise Failed(f"sector {i}: the data moves with {how}; got {_shape(bad[0])}")
    last = seq[-1]
    if last.direction != "in" or last.port != STATUS:
        raise Failed(f"the last exit is {_shape(last)}: read the status once more to see the command end "
                     "(no DRQ, no ERR)")


def _read_check(ctx: Context, sectors: int, pio: str) -> None:
    read_sectors = ctx.load("ata_pio").read_sectors
    pattern = os.urandom(sectors * SECTOR)

    async def body(g: Any) -> None:
        await g.disk("synthetic").write(LBA * SECTOR, pattern)  # through StorVSC: the same image
        g.io.trace.clear()
        got = await read_sectors(g.io, LBA, sectors, pio)
        trace = list(g.io.trace)
        if not isinstance(got, (bytes, bytearray)) or bytes(got) != pattern:
            n = len(got) if isinstance(got, (bytes, bytearray)) else None
            if n != len(pattern):
                raise Failed(f"read_sectors returned {n if n is not None else type(got).__name__} bytes, "
                             f"expected {len(pattern)}")
            first = next(i for i in range(n) if got[i] != pattern[i])
            raise Failed(f"the data differs from what StorVSC wrote at LBA {LBA:#x}, first at byte {first}")
        _check_trace(trace, sectors, pio)

    _on_guest(ctx, body)


def one_sector(ctx: Context) -> None:
    _read_check(ctx, 1, "string")


def four_kib_string(ctx: Context) -> None:
    _read_check(ctx, 8, "string")


def four_kib_word(ctx: Context) -> None:
    _read_check(ctx, 8, "word")


def past_the_end(ctx: Context) -> None:
    read_sectors = ctx.load("ata_pio").read_sectors
    err_pattern = os.urandom(SECTOR)

    async def body(g: Any) -> None:
        ata = g.disk("emulated-string")
        last = ata.size // SECTOR - 1
        g.io.trace.clear()
        try:
            await read_sectors(g.io, last, 2, "string")
        except NotImplementedError:
            raise
        except OSError:
            pass
        else:
            raise Failed(f"read_sectors returned for 2 sectors at the last LBA ({last}): the drive set ERR "
                         "(IDNF); raise an OSError (AtaReadError) when the status has ERR")
        trace = list(g.io.trace)
        if not any(a.direction == "in" and a.port == ERROR and a.data[0] & Error.IDNF for a in trace):
            raise Failed("it raised, but never read the error register (0x1f1) to say why (IDNF: past the end)")
        if any(a.port == DATA for a in trace):
            raise Failed("it touched the data port after an error: without DRQ there is no data")
        await g.disk("synthetic").write(LBA * SECTOR, err_pattern)
        if await read_sectors(g.io, LBA, 1, "string") != err_pattern:
            raise Failed("after the error, the next read_sectors did not read the right sector")

    _on_guest(ctx, body)


# ---- the table ----------------------------------------------------------------------------------------------

COLUMNS = ("path", "op", "ops", "seconds", "ops_per_s", "p50_us", "p99_us", "round_trips_per_op",
           "busy_polls_per_op", "wire_bytes_per_op")
TABLE_OPS, TABLE_SLOW_OPS = 20, 3
EXPECTED_TRIPS = {("synthetic", "read"): 1, ("synthetic", "write"): 1,
                  ("emulated-string", "read"): 24, ("emulated-string", "write"): 2064,
                  ("emulated-word", "read"): 2064, ("emulated-word", "write"): 2064}


def _num(row: dict[str, str], key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, ValueError, TypeError):
        raise Failed(f"{row.get('path')}/{row.get('op')}: column {key!r} should hold a number, has "
                     f"{row.get(key)!r}") from None


def table(ctx: Context) -> None:
    out = ctx.tmp / "emu.csv"
    with parent(ctx.tmp) as (_, url):
        proc = subprocess.run([sys.executable, str(ctx.code / "measure.py"), "--connect", url, "--ops",
                               str(TABLE_OPS), "--slow-ops", str(TABLE_SLOW_OPS), "--span", str(4 << 20), "--out",
                               str(out)], capture_output=True, text=True, timeout=240, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
        raise Failed(f"measure.py exited {proc.returncode}: {last[0] if last else '(no output)'}")
    if not out.exists():
        raise Failed("measure.py did not write the --out CSV")
    rows = list(csv.DictReader(out.open()))
    if not rows or list(rows[0]) != list(COLUMNS):
        raise Failed(f"the CSV's header should be {','.join(COLUMNS)}")
    if [(r["path"], r["op"]) for r in rows] != list(EXPECTED_TRIPS):
        raise Failed("one row per path and op, in this order: "
                     + ", ".join(f"{p}/{o}" for p, o in EXPECTED_TRIPS))
    for r in rows:
        key = (r["path"], r["op"])
        name = "/".join(key)
        ops = _num(r, "ops")
        want_ops = TABLE_OPS if key[0] == "synthetic" or key == ("emulated-string", "read") else TABLE_SLOW_OPS
        if ops != want_ops:
            raise Failed(f"{name}: ops is {r['ops']}, expected {want_ops} (--ops / --slow-ops)")
        seconds, rate = _num(r, "seconds"), _num(r, "ops_per_s")
        # ``seconds`` is rounded to 4 places: a run of a few milliseconds moves ops / seconds by several percent.
        low, high = ops / (seconds + 0.00005), ops / max(seconds - 0.00005, 1e-9)
        if seconds <= 0 or not 0.98 * low - 0.1 <= rate <= 1.02 * high + 0.1:
            raise Failed(f"{name}: ops_per_s {rate} is not ops / seconds ({ops:g} / {seconds})")
        p50, p99 = _num(r, "p50_us"), _num(r, "p99_us")
        if not 0 < p50 <= p99 or p50 > seconds * 1e6:
            raise Failed(f"{name}: latency p50 {p50} µs, p99 {p99} µs: expected 0 < p50 <= p99 <= the run's time")
        trips, busy = _num(r, "round_trips_per_op"), _num(r, "busy_polls_per_op")
        want = EXPECTED_TRIPS[key]
        if busy < 0 or abs(trips - busy - want) > 0.011:
            raise Failed(f"{name}: {trips} round trips per op of which {busy} busy polls; the rest should be "
                         f"exactly {want}")
        wire = _num(r, "wire_bytes_per_op")
        if not 4096 <= wire <= 4096 + 50 * trips + 1024:
            raise Failed(f"{name}: {wire} wire bytes per op: 4096 bytes of data plus the frames' headers "
                         f"({trips} round trips) expected")
    wire = {(r["path"], r["op"]): _num(r, "wire_bytes_per_op") for r in rows}
    if not wire[("synthetic", "read")] < wire[("emulated-string", "read")] < wire[("emulated-word", "read")]:
        raise Failed("wire bytes per read should grow from StorVSC to rep insw to inw: is wire_bytes_per_op the "
                     "difference of Counts.wire_bytes over the run, divided by ops?")


# ---- questions ----------------------------------------------------------------------------------------------

PREDICTIONS = {"predict.read_word": 2064, "predict.read_string": 24, "predict.write_word": 2064,
               "predict.write_string": 2064, "predict.read_one_sector_string": 10, "predict.read_64k_string": 264,
               "predict.storvsc_round_trips": 1}
EXPLAIN: dict[str, list[tuple[str, ...]]] = {
    "explain.gap": [("exit", "trap", "round trip", "round-trip"), ("request", "completion")],
    "explain.writes": [("rep outs", "outsw", "outs "), ("per word", "each word", "every word", "unit", "256",
                                                        "read ahead", "read-ahead", "1024", "cache")],
    "explain.batching": [("batch", "several", "many", "multiple", "queue"), ("ring", "virtqueue", "shared"),
                         ("signal", "interrupt", "notif", "doorbell", "kick")],
    "explain.ahci": [("dma",), ("mmio", "register", "doorbell", "command list", "fis", "exit")],
}


def questions(ctx: Context) -> None:
    a = answers(ctx)
    wrong = []
    for key, want in PREDICTIONS.items():
        got = answer(a, key)
        if got != want:
            wrong.append(key)
    if wrong:
        raise Failed("not right yet: " + ", ".join(wrong))
    for key, groups in EXPLAIN.items():
        key_terms(answer(a, key), groups, key, min_words=15)


LAB = Lab(6, "Why VSP/VSC beats emulation", "moderate", [
    Step("read one sector: the register sequence", 20, one_sector,
         "wait for BSY to clear, task file, command, then per sector: DRQ, data; then the status once more"),
    Step("read 4 KiB with rep insw: 24 exits", 15, four_kib_string, "one rep_ins(DATA, 2, 256) per sector"),
    Step("read 4 KiB word by word: 2064 exits", 10, four_kib_word, "256 inw(DATA) per sector"),
    Step("a read past the end: ERR", 10, past_the_end,
         "after each status read: ERR set means read 0x1f1 and raise AtaReadError"),
    Step("the measurement table", 30, table, "run measure.py yourself: see the handout's step 3"),
    Step("predictions and explanations", 15, questions, "the handout's Questions section"),
], starter_fails=frozenset({"read one sector: the register sequence", "read 4 KiB with rep insw: 24 exits",
                            "read 4 KiB word by word: 2064 exits", "a read past the end: ERR",
                            "the measurement table", "predictions and explanations"}))
