"""Lab 5's grader: the student's sender against a real parent's echo device. It withholds the reader's credit
to see the sender fill the ring and wait (not spin, not drop), returns it to see the sender wake on the signal,
pushes thousands of packets through a one-page ring, and runs the student's measurement script. No step looks
at how fast anything was: the table's numbers are checked for shape and consistency only."""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from labs.harness import Context, Failed, Lab, Step, import_file, parent
from labs.harness import answers as read_answers
from vmbus_proto.packets import packet_ring_size
from vmbus_proto.ring import ring_data_size

HERE = Path(__file__).resolve().parent
CONFIG = (HERE / "parent.toml").read_text()


def _flowlab() -> ModuleType:
    return import_file(HERE / "flowlab.py", "_lab5_flowlab")


async def _until(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def _sender_problems(stats: Any, waiting: bool = False) -> list[str]:
    out = []
    if stats.spins:
        out.append(f"can_write() said no 3 times in a row without a wait, {stats.spins} times: a busy loop")
    if stats.overruns:
        out.append(f"write() into a full ring {stats.overruns} times (RingFull)")
    if stats.unannounced_waits:
        out.append(f"{stats.unannounced_waits} waits without pending_send_sz set: the reader had no reason to "
                   "signal")
    if stats.waits != stats.wakeups + waiting:
        out.append(f"{stats.waits} waits but {stats.wakeups} signals ended them")
    return out


async def _filled(g: Any, task: asyncio.Task[None], fits: int, size: int) -> None:
    """The sender under test, with the reader's credit withheld (until it waits) and then returned."""
    port, transport = g.port, g.bus.transport
    await _until(lambda: port.waiting or task.done() or port.stats.spins, "the sender to fill the ring and wait")
    if port.stats.spins:
        raise Failed(_sender_problems(port.stats, waiting=True)[0])
    if task.done():
        task.result()  # its exception, if it raised
        raise Failed(f"send_all returned with the reader's credit withheld: {port.stats.writes} of "
                     f"{COUNT} packets written into a ring that holds {fits}")
    s = port.stats
    if s.writes != fits:
        raise Failed(f"the sender waited after {s.writes} packets; {fits} fit an empty ring of "
                     f"{port.data_size} bytes ({size} bytes each): fill it first")
    if s.pending_sizes[-1:] != [size]:
        raise Failed(f"pending_send_sz announced: {s.pending_sizes}; the waiting packet needs {size}")
    problems = _sender_problems(s, waiting=True)
    if problems:
        raise Failed("; ".join(problems))
    transport.resume_reading()  # credit returns: the reader's signal must wake the sender
    try:
        await asyncio.wait_for(task, 60)
    except TimeoutError:
        raise Failed("send_all did not finish within 60s of the reader's credit coming back") from None
    await g.completions.wait_for(min(COUNT, port.stats.writes))
    problems = g.completions.problems(COUNT) + _sender_problems(port.stats)
    if problems:
        raise Failed("; ".join(problems))
    if not port.stats.wakeups:
        raise Failed("the sender never woke on a reader signal (wait_for_reader)")


RING_PAGES, PAYLOAD, COUNT = 4, 256, 200  # 3 data pages; 280-byte packets: 43 fit (43 * 280 < 12288 <= 44 * 280)


def backpressure(ctx: Context) -> None:
    send_all = ctx.load("sender").send_all
    fl = _flowlab()
    size = packet_ring_size(PAYLOAD)
    fits = (ring_data_size(RING_PAGES) - 1) // size

    async def scenario(url: str) -> None:
        async with fl.echo_guest(url, RING_PAGES, name="lab5-backpressure") as g:
            assert g.bus.transport is not None
            g.bus.transport.pause_reading()  # the reader's signals (its new read_index) do not reach the sender
            task = asyncio.get_running_loop().create_task(send_all(g.port, fl.packets(COUNT, PAYLOAD)))
            try:
                await _filled(g, task, fits, size)
            finally:
                if not task.done():
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    with parent(ctx.tmp, config=CONFIG) as (_, url):
        asyncio.run(scenario(url))


def many_packets(ctx: Context) -> None:
    send_all = ctx.load("sender").send_all
    fl = _flowlab()
    count, payload = 3000, 64

    async def scenario(url: str) -> None:
        async with fl.echo_guest(url, 2, name="lab5-many") as g:  # one data page: 46 packets of 88 bytes
            await asyncio.wait_for(send_all(g.port, fl.packets(count, payload)), 120)
            await g.completions.wait_for(min(count, g.port.stats.writes))  # what was dropped never comes
            problems = g.completions.problems(count) + _sender_problems(g.port.stats)
            if problems:
                raise Failed("; ".join(problems))

    with parent(ctx.tmp, config=CONFIG) as (_, url):
        try:
            asyncio.run(scenario(url))
        except TimeoutError:
            raise Failed("3000 packets through a one-page ring took over 120s: is the sender stuck?") from None


TABLE_PAGES = (2, 8, 32)
TABLE_PACKETS, TABLE_PAYLOAD = 1500, 256
COLUMNS = ("ring_pages", "data_bytes", "packets", "payload", "seconds", "packets_per_s", "mb_per_s", "blocked",
           "wakeups", "lost", "duplicated")


def table(ctx: Context) -> None:
    out = ctx.tmp / "flow.csv"
    with parent(ctx.tmp, config=CONFIG) as (_, url):
        proc = subprocess.run([sys.executable, str(ctx.code / "measure.py"), "--connect", url, "--ring-pages",
                               ",".join(map(str, TABLE_PAGES)), "--packets", str(TABLE_PACKETS), "--payload",
                               str(TABLE_PAYLOAD), "--out", str(out)],
                              capture_output=True, text=True, timeout=240, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
        raise Failed(f"measure.py exited {proc.returncode}: {last[0] if last else '(no output)'}")
    if not out.exists():
        raise Failed("measure.py did not write the --out CSV")
    rows = list(csv.DictReader(out.open()))
    if not rows or list(rows[0]) != list(COLUMNS):
        raise Failed(f"the CSV's header should be {','.join(COLUMNS)}")
    if [_int(r, "ring_pages") for r in rows] != list(TABLE_PAGES):
        raise Failed(f"one row per --ring-pages value, in order: expected {TABLE_PAGES}")
    for r in rows:
        pages = _int(r, "ring_pages")
        want = {"data_bytes": ring_data_size(pages), "packets": TABLE_PACKETS, "payload": TABLE_PAYLOAD,
                "lost": 0, "duplicated": 0}
        for k, v in want.items():
            if _int(r, k) != v:
                raise Failed(f"ring_pages {pages}: {k} is {r[k]}, expected {v}")
        seconds, pps, mbs = float(r["seconds"]), float(r["packets_per_s"]), float(r["mb_per_s"])
        if seconds <= 0 or abs(pps - TABLE_PACKETS / seconds) > 0.02 * pps + 1:
            raise Failed(f"ring_pages {pages}: packets_per_s {pps} is not packets / seconds ({TABLE_PACKETS} / "
                         f"{seconds})")
        if abs(mbs - pps * TABLE_PAYLOAD / 1e6) > 0.02 * mbs + 0.01:
            raise Failed(f"ring_pages {pages}: mb_per_s {mbs} is not packets_per_s * payload / 10**6")
        if _int(r, "blocked") < 0 or _int(r, "wakeups") < 0:
            raise Failed(f"ring_pages {pages}: negative counts")
    first = rows[0]
    if _int(first, "blocked") == 0 or _int(first, "wakeups") == 0:
        raise Failed(f"{TABLE_PACKETS} packets through a one-page ring never blocked: is blocked the sender's "
                     "pending_send_sz count and wakeups its reader signals (flowlab.Run)?")


def _int(row: dict[str, str], key: str) -> int:
    try:
        return int(row[key])
    except (KeyError, ValueError):
        raise Failed(f"column {key!r} should hold a whole number, has {row.get(key)!r}") from None


ANSWERS = {"q1_packets_before_wait": 43, "q2_pending_send_sz": 280}


def answers(ctx: Context) -> None:
    got = read_answers(ctx)
    wrong = [k for k, v in ANSWERS.items() if got.get(k) != v]
    if wrong:
        raise Failed(f"not right yet: {', '.join(wrong)}")
    short = [k for k in ("q3_table", "q4_spin", "q5_big_pending") if len(str(got.get(k, "")).split()) < 15]
    if short:
        raise Failed(f"write a few sentences for {', '.join(short)}")


LAB = Lab(5, "Flow control", "moderate", [
    Step("fills the ring, waits, wakes", 35, backpressure,
         "can_write, else set_pending_send_sz(size), then wait_for_reader until can_write"),
    Step("3000 packets, one-page ring: none lost", 25, many_packets, "re-check can_write after every wake-up"),
    Step("the measurement table", 30, table, "run measure.py yourself: see the handout's step 3"),
    Step("questions", 10, answers, "the handout's Questions section"),
], starter_fails=frozenset({"fills the ring, waits, wakes", "3000 packets, one-page ring: none lost",
                            "the measurement table", "questions"}))
