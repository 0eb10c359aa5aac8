"""The engine of ``child-partition load``: runs one or more device workloads (``workload.py``) in one process,
or splits their partitions across ``--processes`` child processes of the same tool and merges their results.

What it does, in the manner of wrk2, fio and iperf3:

- brings the partitions up at a bounded concurrency (``--start-concurrency``), each with ``start_partition``;
- closed loop (default): ``--concurrency`` workers per partition, each issuing its next operation when the
  previous one completes; open loop (``--rate OPS`` per partition): operations are due at fixed intended times
  ``t0 + k / rate``, and latency counts from the intended time, so a stall delays every operation due during it
  and shows in the percentiles (the coordinated omission a closed loop hides); an operation that cannot be sent
  on time is still sent, late, and counted as late;
- ``--warmup`` seconds not counted, then a measured window bounded by ``--runtime`` and ``--count``;
- SIGINT or SIGTERM: no new operations, the ones in flight finish (bounded), the results so far are reported,
  exit 130 or 143 (``interrupt.py``);
- then every partition ``stop()``s (bounded) and the workload's ``teardown()`` adds its own results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbus_proto.aio import logs
from vmbus_proto.aio.cli import connect_endpoint
from vmbus_proto.aio.keyfile import secret_file_arg, token_file_arg
from vmbus_proto.aio.tls import add_client_options, connect_url

from ..bus import ParentRefused
from ..interrupt import Interrupt
from ..runner import MEMORY_MODE_CHOICES, MEMORY_MODE_ENV
from .args import number, output
from .report import Progress, Results, summary, this_run
from .stats import MergeError, WorkloadStats
from .workload import Done, LoadOptions, OpError, PartitionLoad, Workload

PROG = "child-partition load"
URL_HELP = ("the parent's address: tcp://HOST:PORT, tls://HOST:PORT (with --tls-ca) or unix:PATH, as given to "
            "parent-partition serve --listen")
DRAIN_TIMEOUT = 30.0  # seconds the operations in flight get to finish after the end or an interrupt
STOP_TIMEOUT = 60.0  # seconds a partition gets to leave
SETUP_TIMEOUT = 120.0  # seconds for setup(), ready(), finish() and teardown() each
GIVE_UP_AFTER = 20  # consecutive failed operations after which a partition stops issuing
YIELD_EVERY = 32  # operations a worker issues before it lets the loop run others (ops that never suspend)
PROGRESS_EVERY = 0.5
DEFAULT_HTTP = "http://127.0.0.1:8080"
DEFAULT_WARMUP, DEFAULT_RUNTIME = 0.5, 10.0
CHILD_PROGRESS_EVERY = 1.0


class UsageError(Exception):
    """A mistake in the options or the workload file: one line on stderr, exit 2."""


# ---- the run's description ----------------------------------------------------------------------------------

@dataclass(slots=True)
class Entry:
    """One workload of the run: the command's, or one ``[[workload]]`` of a mix file."""

    key: str  # its name in the results (the workload's name, or the file's label)
    cls: Any  # the Workload class
    args: argparse.Namespace  # its own options
    own: dict[str, Any]  # the own options as the JSON shows them
    partitions: int
    concurrency: int
    rate: float | None
    count: int | None

    @property
    def job(self) -> dict[str, Any]:
        return {"workload": self.cls.name, **self.own, "concurrency": self.concurrency, "rate": self.rate,
                "count": self.count}

    def share(self, index: int, of: int) -> tuple[int, int]:
        """(first partition index, partitions) of process ``index`` of ``of``."""
        if getattr(self.cls, "one_process", False):
            return (0, self.partitions) if index == 0 else (0, 0)
        first = self.partitions * index // of
        return first, self.partitions * (index + 1) // of - first


@dataclass(slots=True)
class Spec:
    entries: list[Entry]
    connect: str
    http: str | None
    warmup: float
    runtime: float
    processes: int
    start_concurrency: int
    tag: str
    quiet: bool
    json: str | None
    share: tuple[int, int] = (0, 1)
    run_id: int = field(default_factory=os.getpid)
    child: bool = False
    name_prefix: str | None = None
    secret: bytes | None = None
    http_token: str | None = None

    @property
    def job(self) -> dict[str, Any]:
        return {"workloads": {e.key: e.job for e in self.entries}, "warmup": self.warmup, "runtime": self.runtime}

    def process_count(self) -> int:
        """Processes worth starting: no more than there are partitions to split."""
        splittable = max([e.partitions for e in self.entries if not getattr(e.cls, "one_process", False)] or [1])
        return max(1, min(self.processes, splittable))


def options_for(spec: Spec, entry: Entry, first: int, count: int, nth: int) -> LoadOptions:
    base = getattr(entry.cls, "prefix", None) or entry.cls.name
    host = f"{spec.name_prefix}-" if spec.name_prefix else ""
    return LoadOptions(connect=spec.connect, http=spec.http, partitions=count, first_index=first,
                       prefix=f"{host}{base}{nth if nth > 1 else ''}-{spec.run_id}", tag=spec.tag,
                       secret=spec.secret, http_token=spec.http_token)


def prefixes(entries: list[Entry]) -> list[int]:
    """The n-th use of each name prefix in the run (so two storage workloads in a mix get distinct names)."""
    seen: dict[str, int] = {}
    out = []
    for e in entries:
        base = getattr(e.cls, "prefix", None) or e.cls.name
        seen[base] = seen.get(base, 0) + 1
        out.append(seen[base])
    return out


# ---- one process's run --------------------------------------------------------------------------------------

class Window:
    """The measured window on the monotonic clock: after the warm-up, until the deadline or the stop."""

    def __init__(self, start: float, warmup: float, runtime: float) -> None:
        self.start = start
        self.measure_from = start + warmup
        self.deadline = self.measure_from + runtime
        self.end: float | None = None

    def counts(self, t: float) -> bool:
        return self.measure_from <= t < (self.end if self.end is not None else self.deadline)

    def close(self, now: float) -> None:
        if self.end is None:
            self.end = max(self.measure_from, min(now, self.deadline))


class WorkloadRun:
    """One workload's partitions in this process, their workers and their counts; the Recorder its
    partitions record into."""

    def __init__(self, entry: Entry, options: LoadOptions) -> None:
        self.entry = entry
        self.options = options
        self.stats = WorkloadStats(name=entry.cls.name, options=entry.job, partitions=options.partitions)
        self.workload: Workload | None = None
        self.parts: list[PartitionLoad] = []
        self.window: Window | None = None
        self.stopping = False
        self.dead = False  # setup or ready failed: no operations
        self.live_ops = self.live_bytes = self.live_errors = 0
        self.gave_up: set[int] = set()  # partitions that stopped issuing after repeated errors
        self.in_flight = 0

    # Recorder
    def record(self, op: str, usec: int, nbytes: int = 0, *, started: float | None = None) -> None:
        self.live_ops += 1
        self.live_bytes += nbytes
        w = self.window
        if w is not None and w.counts(time.monotonic() - usec / 1e6 if started is None else started):
            self.stats.op(op).record(usec, nbytes)

    def error(self, op: str, message: str) -> None:
        self.live_errors += 1
        self.stats.op(op).error(message)

    def measuring(self, at: float | None = None) -> bool:
        w = self.window
        return w is not None and w.counts(time.monotonic() if at is None else at)

    def halted(self) -> bool:
        return self.stopping

    async def _hook(self, what: str, hook: Any, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(hook(*args), SETUP_TIMEOUT)
        except Exception as exc:
            self.stats.fail(f"{what}: {describe(exc)}")
            return None

    async def setup(self) -> None:
        if self.options.partitions == 0:
            self.dead = True
            return
        self.workload = self.entry.cls.from_args(self.entry.args, self.options)
        try:
            await asyncio.wait_for(self.workload.setup(), SETUP_TIMEOUT)
        except Exception as exc:
            self.stats.fail(f"setup: {describe(exc)}")
            self.dead = True

    async def start(self, gate: asyncio.Semaphore, stop: asyncio.Event) -> None:
        if self.dead or self.workload is None:
            return
        workload = self.workload
        first = self.options.first_index
        names = {}

        async def one(index: int) -> PartitionLoad | None:
            async with gate:
                if stop.is_set():
                    return None
                try:
                    return await workload.start_partition(index)
                except Exception as exc:
                    names[index] = describe(exc)
                    return None

        started = await asyncio.gather(*(one(first + i) for i in range(self.options.partitions)))
        self.parts = [p for p in started if p is not None]
        for index, why in sorted(names.items()):
            self.stats.fail(f"{self.options.prefix}-{index}: did not start: {why}")
        ready = getattr(workload, "ready", None)
        if ready is not None and not stop.is_set():
            before = self.stats.error_count
            await self._hook("ready", ready, list(self.parts))
            self.dead = self.stats.error_count > before

    def workers(self, window: Window) -> list[asyncio.Task[None]]:
        self.window = window
        if self.dead:
            return []
        loop = asyncio.get_running_loop()
        tasks = []
        for i, part in enumerate(self.parts):
            budget = [self.entry.count if self.entry.count is not None else 1 << 62]
            slot = [0]
            for _ in range(self.entry.concurrency):
                coro = (self._open(i, part, budget, slot, window) if self.entry.rate
                        else self._closed(i, part, budget, window))
                tasks.append(loop.create_task(coro))
        return tasks

    def _failed(self, i: int, part: PartitionLoad, exc: Exception, consecutive: list[int]) -> bool:
        """Count a failed operation; True when the partition should stop issuing: after GIVE_UP_AFTER in a row,
        or at once when the parent refused it (churn's new connections: no retry changes a refusal)."""
        if isinstance(exc, ParentRefused):  # the partition's one failure line, not an operation's error
            if i not in self.gave_up:
                self.gave_up.add(i)
                self.stats.fail(f"{part.name}: stopped: the parent refused it: {exc.reason}")
            return True
        op = exc.op if isinstance(exc, OpError) else "operation"
        self.error(op, f"{part.name}: {exc if isinstance(exc, OpError) else describe(exc)}")
        consecutive[0] += 1
        if consecutive[0] >= GIVE_UP_AFTER and i not in self.gave_up:
            self.gave_up.add(i)
            self.stats.fail(f"{part.name}: stopped after {GIVE_UP_AFTER} failed operations in a row")
        return i in self.gave_up

    async def _closed(self, i: int, part: PartitionLoad, budget: list[int], w: Window) -> None:
        consecutive, n = [0], 0
        while not self.stopping and budget[0] > 0 and i not in self.gave_up:
            t0 = time.monotonic()
            if t0 >= w.deadline:
                return
            budget[0] -= 1
            if not await self._attempt(i, part, consecutive, w, t0):
                return
            n += 1
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    async def _attempt(self, i: int, part: PartitionLoad, consecutive: list[int], w: Window, since: float,
                       late: bool = False) -> bool:
        """One operation, its latency counted from ``since`` (started, or intended in an open loop); False
        when the partition stops issuing."""
        self.in_flight += 1
        try:
            done: Done = await part.operation(self)
        except Exception as exc:
            return not self._failed(i, part, exc, consecutive)
        finally:
            self.in_flight -= 1
        consecutive[0] = 0
        t1 = time.monotonic()
        self.live_ops += 1
        self.live_bytes += done.nbytes
        if w.counts(since):
            s = self.stats.op(done.op)
            s.record(int((t1 - since) * 1e6), done.nbytes)
            s.late += late
        return True

    async def _open(self, i: int, part: PartitionLoad, budget: list[int], slot: list[int], w: Window) -> None:
        rate = self.entry.rate
        assert rate
        interval = 1.0 / rate
        tolerance = max(0.001, interval)
        clock, consecutive, n = time.monotonic, [0], 0
        while not self.stopping and budget[0] > 0 and i not in self.gave_up:
            intended = w.start + slot[0] * interval
            if intended >= w.deadline:
                return
            slot[0] += 1
            budget[0] -= 1
            now = clock()
            while intended > now and not self.halted():  # due later: wait for its time
                await asyncio.sleep(min(intended - now, 0.05))
                now = clock()
            if self.halted():
                return
            late = now - intended > tolerance
            if not await self._attempt(i, part, consecutive, w, intended, late):
                return
            n += 1
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    async def finish(self) -> None:
        hook = getattr(self.workload, "finish", None)
        if hook is not None and self.parts and not self.dead:
            await self._hook("finish", hook)

    async def stop(self) -> None:
        async def one(part: PartitionLoad) -> bool:
            try:
                await asyncio.wait_for(part.stop(), STOP_TIMEOUT)
                return True
            except Exception as exc:
                self.stats.fail(f"{part.name}: did not stop cleanly: {describe(exc)}")
                return False

        stopped = await asyncio.gather(*(one(p) for p in self.parts))
        self.stats.partitions_ok = sum(ok and i not in self.gave_up for i, ok in enumerate(stopped))
        if self.workload is not None:
            extra = await self._hook("teardown", self.workload.teardown)
            self.stats.extra = dict(extra or {})


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_process(spec: Spec, stop: asyncio.Event, progress: Progress | None = None,
                      emit: Any = None) -> Results:
    """This process's share of the run: setup, bring-up, warm-up, the measured window, stop, teardown."""
    wall0, mono0 = time.time(), time.monotonic()
    index, of = spec.share
    runs = []
    for entry, nth in zip(spec.entries, prefixes(spec.entries), strict=True):
        first, count = entry.share(index, of)
        runs.append(WorkloadRun(entry, options_for(spec, entry, first, count, nth)))

    def snapshot() -> dict[str, tuple[int, int, int]]:
        return {r.entry.key: (r.live_ops, r.live_bytes, r.live_errors + r.stats.error_count) for r in runs}

    if progress is not None:
        progress.snapshot = snapshot
    ticker = asyncio.get_running_loop().create_task(_tick(progress, emit, snapshot, "starting"))
    window = Window(time.monotonic(), spec.warmup, spec.runtime)
    try:
        for r in runs:
            await r.setup()
        gate = asyncio.Semaphore(spec.start_concurrency)
        await asyncio.gather(*(r.start(gate, stop) for r in runs))
        window = Window(time.monotonic(), spec.warmup, spec.runtime)
        if progress is not None:
            progress.phase, progress.deadline = "warming up" if spec.warmup else "measuring", window.deadline
        workers = [t for r in runs for t in r.workers(window)] if not stop.is_set() else []
        for r in runs:
            r.window = window
        if workers:
            everything = asyncio.gather(*workers)
            stopped = asyncio.ensure_future(stop.wait())
            measuring = asyncio.get_running_loop().call_at(
                _loop_time(window.measure_from), _phase, progress, "measuring")
            try:
                waiting: list[asyncio.Future[Any]] = [everything, stopped]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                measuring.cancel()
                stopped.cancel()
            window.close(time.monotonic())
            for r in runs:
                r.stopping = True
            if progress is not None:
                progress.phase, progress.deadline = "stopping", None
            await asyncio.wait([everything], timeout=DRAIN_TIMEOUT)
            if not everything.done():
                for r in runs:
                    if r.in_flight:
                        r.stats.fail(f"{r.in_flight} operations still in flight {DRAIN_TIMEOUT:g}s after the "
                                     f"end; abandoned")
                everything.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await everything
        window.close(time.monotonic())
        for r in runs:
            await r.finish()
        await asyncio.gather(*(r.stop() for r in runs))
    finally:
        ticker.cancel()
    measured = (wall0 + window.measure_from - mono0, wall0 + (window.end or window.measure_from) - mono0)
    return Results(job=spec.job, workloads={r.entry.key: r.stats for r in runs},
                   runs=[this_run(spec.tag, wall0, time.time(), measured)], tag=spec.tag)


def _loop_time(monotonic: float) -> float:
    """A time.monotonic() instant on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic - time.monotonic())


def _phase(progress: Progress | None, phase: str) -> None:
    if progress is not None:
        progress.phase = phase


async def _tick(progress: Progress | None, emit: Any, snapshot: Any, phase: str) -> None:
    """Refresh the progress line; in a child process, also report the live totals to the parent."""
    last_emit = 0.0
    while True:
        if progress is not None:
            progress.update()
        if emit is not None and time.monotonic() - last_emit >= CHILD_PROGRESS_EVERY:
            last_emit = time.monotonic()
            # time.monotonic() is system-wide on Linux: the deadline means the same in the parent process
            emit({"phase": progress.phase if progress is not None else phase,
                  "deadline": progress.deadline if progress is not None else None, "live": snapshot()})
        await asyncio.sleep(PROGRESS_EVERY)


# ---- several processes --------------------------------------------------------------------------------------

def child_argv(argv: list[str], index: int, of: int, run_id: int, out: str) -> list[str]:
    """The same command for process ``index`` of ``of`` (later options win in argparse)."""
    return [sys.executable, "-m", "child_partition", "load", *argv, "--processes", "1", "--share", f"{index}/{of}",
            "--run-id", str(run_id), "--json", out, "--child", "--quiet"]


async def fan_out(spec: Spec, argv: list[str], interrupt: Interrupt, progress: Progress) -> Results:
    """Run the partitions split across child processes of this tool; forward SIGINT/SIGTERM to them; merge
    what they write."""
    n = spec.process_count()
    live: dict[int, dict[str, tuple[int, int, int]]] = {}

    def snapshot() -> dict[str, tuple[int, int, int]]:
        out: dict[str, tuple[int, int, int]] = {e.key: (0, 0, 0) for e in spec.entries}
        for per in live.values():
            for key, (ops, nbytes, errors) in per.items():
                o, b, e = out.get(key, (0, 0, 0))
                out[key] = (o + ops, b + nbytes, e + errors)
        return out

    progress.snapshot = snapshot
    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        files = [str(Path(tmp) / f"{i}.json") for i in range(n)]
        procs = [await asyncio.create_subprocess_exec(*child_argv(argv, i, n, spec.run_id, files[i]),
                                                      stdout=asyncio.subprocess.PIPE, start_new_session=True)
                 for i in range(n)]

        async def read(i: int, proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None
            async for line in proc.stdout:
                with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                    report = json.loads(line)
                    live[i] = {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in report["live"].items()}
                    progress.phase, progress.deadline = str(report["phase"]), report["deadline"]

        readers = [asyncio.ensure_future(read(i, p)) for i, p in enumerate(procs)]
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        stopped = asyncio.ensure_future(interrupt.event.wait())
        forwarded = False
        while not all(w.done() for w in waits):
            await asyncio.wait([*waits, stopped], timeout=PROGRESS_EVERY, return_when=asyncio.FIRST_COMPLETED)
            if interrupt.event.is_set() and not forwarded and interrupt.signal is not None:
                forwarded = True
                for p in procs:
                    if p.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.send_signal(interrupt.signal)
            progress.update()
        stopped.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        merged: Results | None = None
        notes = []
        for i, (p, path) in enumerate(zip(procs, files, strict=True)):
            try:
                res = Results.from_json(json.loads(Path(path).read_text()), f"process {i}")
            except (OSError, ValueError) as exc:
                notes.append(f"process {i} (pid {p.pid}) exited with status {p.returncode} and left no results "
                             f"({type(exc).__name__})")
                continue
            if merged is None:
                merged = res
            else:
                merged.merge(res)
    if merged is None:
        merged = Results(job=spec.job, workloads={}, runs=[], tag=spec.tag)
    merged.notes += notes
    return merged


# ---- the command line ---------------------------------------------------------------------------------------

def load_class(target: str) -> Any:
    """'module:Class' -> the class (imported now)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def add_common(parser: argparse.ArgumentParser, cls: Any | None, *, per_workload: bool = True,
               run_level: bool = True) -> None:
    """The options every workload subcommand takes. ``per_workload``: those a mix file sets per workload;
    ``run_level``: those that belong to the whole run."""
    if per_workload and cls is not None:
        low = getattr(cls, "min_partitions", 1)
        parser.add_argument("--partitions", metavar="N", type=number(int, low),
                            default=max(low, getattr(cls, "default_partitions", 1)),
                            help="partitions (guests) to run, split across the processes")
        parser.add_argument("--concurrency", *getattr(cls, "concurrency_aliases", ()), dest="concurrency",
                            metavar="N", type=number(int, 1), default=getattr(cls, "default_concurrency", 1),
                            help="workers per partition: operations in flight (closed loop) or at most in flight "
                                 "(with --rate)")
        parser.add_argument("--rate", metavar="OPS", type=number(float, 0.001),
                            help="open loop: operations per second per partition, at fixed intended times; latency "
                                 "counts from the intended time (default: closed loop, each worker as fast as "
                                 "its previous operation completes)")
        parser.add_argument("--count", metavar="N", type=number(int, 1),
                            help="at most N operations per partition, warm-up included (default: no bound but "
                                 "--runtime)")
    if not run_level:
        return
    parser.add_argument("--connect", required=cls is not None, metavar="URL", type=connect_endpoint, help=URL_HELP)
    parser.add_argument("--memory-mode", choices=MEMORY_MODE_CHOICES,
                        help="the guests' memory: shared (a memfd the parent maps; Unix sockets), stream, or auto "
                             f"(shared on unix: URLs; default: ${MEMORY_MODE_ENV}, else auto)")
    parser.add_argument("--http", metavar="URL", default=None if cls is None else DEFAULT_HTTP,
                        help="the parent's web API, for workloads that drive it")
    parser.add_argument("--processes", metavar="N", type=number(int, 1), default=os.cpu_count() or 1,
                        help="processes to split the partitions across (1: all in this process)")
    parser.add_argument("--warmup", "--ramp", dest="warmup", metavar="SECONDS", type=number(float, 0),
                        default=None if cls is None else DEFAULT_WARMUP, help="seconds of warm-up, not measured")
    parser.add_argument("--runtime", metavar="SECONDS", type=number(float, 0.1),
                        default=None if cls is None else DEFAULT_RUNTIME, help="seconds to measure")
    parser.add_argument("--start-concurrency", metavar="N", type=number(int, 1), default=16,
                        help="partitions brought up at once")
    parser.add_argument("--json", metavar="FILE", type=output, help="also write the results as JSON to FILE")
    parser.add_argument("--tag", default=socket.gethostname(),
                        help="this client's name in merged results (several hosts against one parent)")
    parser.add_argument("--name-prefix", metavar="PREFIX", type=_name_prefix,
                        help="put PREFIX in front of the partitions' names (WORKLOAD-PID-INDEX), so load clients on "
                             "several hosts, or in containers where PIDs repeat, never claim the same name")
    parser.add_argument("--secret-file", dest="secret", metavar="PATH", type=secret_file_arg,
                        help="the secret every partition of this run proves to the parent (its names are "
                             "WORKLOAD-PID-INDEX, so the parent configures it for a name pattern: "
                             "[[auth.partition]] name = \"PREFIX-*\" with --name-prefix PREFIX)")
    parser.add_argument("--http-token-file", dest="http_token", metavar="PATH", type=token_file_arg,
                        help="the token of the parent's web API ([http] token_file), sent as a Bearer token by "
                             "the workloads that drive it")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    add_client_options(parser)
    parser.add_argument("--share", type=_share, default=(0, 1), help=argparse.SUPPRESS)
    parser.add_argument("--run-id", type=int, default=os.getpid(), help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def _name_prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,24}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1-24 letters, digits, '.', '_' or '-'")
    return text


def _share(text: str) -> tuple[int, int]:
    index, _, of = text.partition("/")
    try:
        i, n = int(index), int(of)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N")
    return i, n


def own_dests(cls: Any) -> list[str]:
    """The destinations of a workload's own options."""
    probe = argparse.ArgumentParser(add_help=False)
    cls.add_arguments(probe)
    return [a.dest for a in probe._actions]


def entry_from(key: str, cls: Any, args: argparse.Namespace) -> Entry:
    own = {d: getattr(args, d) for d in own_dests(cls) if hasattr(args, d)}
    return Entry(key=key, cls=cls, args=args, own=own, partitions=args.partitions, concurrency=args.concurrency,
                 rate=args.rate, count=args.count)


def check(entry: Entry, spec: Spec) -> None:
    """Build the workload once with every partition, so options that do not fit together (network's pairs and
    an odd count) are a usage error before anything connects."""
    try:
        entry.cls.from_args(entry.args, options_for(spec, entry, 0, entry.partitions, 1))
    except ValueError as exc:
        raise UsageError(f"{entry.key}: {exc}") from None


def spec_from(args: argparse.Namespace, entries: list[Entry]) -> Spec:
    if args.memory_mode:  # every guest of this process reads it (LoadGuest), and the processes it starts inherit it
        os.environ[MEMORY_MODE_ENV] = args.memory_mode
    try:
        connect = connect_url(args, PROG, warn=not args.child)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    spec = Spec(entries=entries, connect=connect, http=args.http, warmup=args.warmup, runtime=args.runtime,
                processes=args.processes, start_concurrency=args.start_concurrency, tag=args.tag,
                quiet=args.quiet or args.child, json=args.json, share=args.share, run_id=args.run_id,
                child=args.child, name_prefix=args.name_prefix, secret=args.secret,
                http_token=args.http_token)
    for entry in entries:
        check(entry, spec)
    return spec


def renderers(spec: Spec) -> dict[str, Any]:
    return {e.key: e.cls.render for e in spec.entries if hasattr(e.cls, "render")}


def execute(spec: Spec, argv: list[str]) -> int:
    """Run ``spec`` (in this process, or split across processes), report, and return the exit status."""
    import uvloop  # noqa: PLC0415 - the load tool's loop

    logs.setup("warning")
    interrupt = Interrupt()
    progress = Progress(spec.quiet, dict)
    emit = _emitter() if spec.child else None

    async def go() -> Results:
        interrupt.install()
        with progress:
            if spec.share == (0, 1) and spec.process_count() > 1:
                return await fan_out(spec, argv, interrupt, progress)
            return await run_process(spec, interrupt.event, progress, emit)

    results = uvloop.run(go())
    if interrupt.signal is not None:
        import signal  # noqa: PLC0415

        results.interrupted = results.interrupted or signal.Signals(interrupt.signal).name
    doc = results.to_json()
    if spec.json:
        Path(spec.json).write_text(json.dumps(doc, indent=1))
    if not spec.child:
        interrupt.announce(f"{PROG} {'mix' if len(spec.entries) != 1 else spec.entries[0].key}")
        from rich.console import Console  # noqa: PLC0415

        summary(doc, Console(highlight=False, width=None if sys.stdout.isatty() else 140), renderers(spec))
    return interrupt.status(1 if results.failed else 0)


def _emitter() -> Any:
    def emit(snap: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(snap) + "\n")
        sys.stdout.flush()
    return emit


def merge_files(paths: list[str]) -> Results:
    merged: Results | None = None
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as exc:
            raise MergeError(f"{path}: {exc.strerror}") from None
        except ValueError as exc:
            raise MergeError(f"{path}: not JSON ({exc})") from None
        res = Results.from_json(doc, path)
        if merged is None:
            merged = res
        else:
            merged.merge(res, path)
    assert merged is not None
    return merged
