"""The soak test (issue 12, "Faults survived, nothing lost"): many partitions under mixed load while a seeded
chaos loop kills -9, stops and restarts them and the parent; at the end nothing leaked and no acknowledged
write is lost.

One real ``parent-partition serve`` daemon, and as child processes of this script:

* journaling writers (``bench/soak_writer.py``): storage writes whose content derives from (partition, LBA,
  generation), each recorded as acknowledged only after its SYNCHRONIZE CACHE completed;
* ``child-partition run`` VMs: every device open, the text console drawing on the framebuffer, each pinging
  the next VM through the virtual switch and writing, flushing and reading back a block a second
  (``--disk-writes``); they reconnect by themselves;
* ``child-partition load`` processes: video frames (SYNTHVID), input events through the JSON API (the parent
  injects them into the partitions' keyboard and mouse), and churn (partitions coming and going).

The chaos loop (``random.Random(seed)``) every 1-3 s kills -9 a random child process, waits until the parent
has released its partitions (they leave ``/api/partitions``) and starts it again; now and then it SIGSTOPs a
writer or a VM for 2-5 s; and ``--parent-restarts`` times in the first 60 % of the run it kills -9 the parent
and starts it again on the same data dir (writers and VMs reconnect on their own; load clients do not, so they
are restarted, as their operator would).

Then everything stops gracefully (SIGTERM/SIGINT; each must exit 0, the parent too) and is checked:

* every block of every writer's journal whose write was acknowledged holds that generation's content in the
  parent's image file (or a later generation's that was issued when its writer was killed);
* leaks, from ``/metrics`` of the idle parent, waited for with a deadline: asyncio tasks within
  ``TASK_SLACK`` and open file descriptors within ``FD_SLACK`` of the baseline taken after a warm-up round of
  the same children, and resident memory grown by less than ``RSS_BOUND``.

``python -m bench.soak --seconds 600 --partitions 32 --seed 1 --json out.json``; ``make soak``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .machine import describe
from .parent import DEVICES, ParentProcess, _free_port, child_env, start_parent
from .soak_writer import Journal, lost_blocks

MiB = 1 << 20
# The idle parent's asyncio tasks: the scrape that reads the figure is one of them, at the baseline and at the end
# alike; 2 more allow for an aiohttp connection of a finished API request still being closed.
TASK_SLACK = 2
# File descriptors: the same listeners, executor and event loop; 2 allow for an HTTP client socket being closed.
FD_SLACK = 2
# Resident memory: CPython keeps freed memory in its arenas and the allocator's free lists, so RSS after a soak
# sits above the warm-up's; a leak of even 1 KiB per connection is 10 MiB in 10,000 connections, which
# a 10-minute soak makes. 64 MiB: several times what the measured runs grew (docs/reliability.md "Soak").
RSS_BOUND = 64 * MiB
WAIT = 120.0  # seconds any one condition gets (a loaded 2-core machine)
STOP_WAIT = 60.0  # seconds a child gets to leave after SIGTERM/SIGINT
CHAOS_GAP = (1.0, 3.0)  # seconds between chaos actions
PAUSE = (2.0, 5.0)  # seconds a SIGSTOPped child stays stopped
PARENT_CONFIG = """
[http]
listen = "127.0.0.1:{port}"

[storage]
idle_close = 1.0
"""
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


class SoakFailed(Exception):
    """A condition of the soak did not hold: one line saying which."""


@dataclass
class Child:
    """One child process the soak keeps running: a writer, a VM or a load client."""

    key: str
    kind: str  # "writer", "vm" or "load"
    argv: list[str]
    logdir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    pauses: int = 0
    logs: list[Path] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        log = self.logdir / f"{self.key}.{self.starts}.log"
        self.logs.append(log)
        argv = [a.replace("{start}", str(self.starts)) for a in self.argv]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    def holds(self, name: str) -> bool:
        """Whether partition ``name`` is one of this process's (load clients name theirs WORKLOAD-PID-INDEX)."""
        if self.kind != "load":
            return name == self.key
        return self.proc is not None and f"-{self.proc.pid}-" in name

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def events(self, event: str) -> int:
        """How many of this child's log lines (every start) are ``event``."""
        needle = f'"event": "{event}"'
        return sum(p.read_text(errors="replace").count(needle) for p in self.logs if p.exists())

    def ask_to_stop(self) -> None:
        """SIGCONT, then the child's graceful signal (``child-partition run`` unloads on SIGINT)."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGINT if self.kind == "vm" else signal.SIGTERM)

    def sessions_after_the_first(self, event: str) -> int:
        """Sessions this child's processes opened beyond each one's first: the reconnects it made by itself."""
        needle = f'"event": "{event}"'
        return sum(max(0, p.read_text(errors="replace").count(needle) - 1) for p in self.logs if p.exists())

    def stop(self) -> int:
        """Its exit code after ``ask_to_stop``; SIGKILL if it overstays."""
        if self.proc is None:
            return 0
        try:
            code = self.proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = -signal.SIGKILL
        self.exit_codes.append(code)
        return code


def scrape(text: str) -> dict[str, float]:
    """A /metrics page's samples summed by name (labels dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if (s := _SAMPLE.match(line)) is not None and not line.startswith("#"):
            out[s.group(1)] = out.get(s.group(1), 0.0) + float(s.group(3))
    return out


def wait_for(pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Until ``pred()`` holds; ``SoakFailed`` naming ``what`` if it does not within ``timeout``."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise SoakFailed(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


class Soak:
    def __init__(self, workdir: Path, seconds: float, partitions: int, seed: int, parent_restarts: int = 1,
                 pauses: bool = True, warmup: float = 5.0, log: Callable[[str], None] | None = None) -> None:
        if partitions < 8:
            raise ValueError("--partitions: at least 8 (writers, VMs, video, input and churn)")
        self.workdir, self.seconds, self.partitions, self.seed = workdir, seconds, partitions, seed
        self.parent_restarts, self.pauses, self.warmup = parent_restarts, pauses, warmup
        self.say = log or functools.partial(print, flush=True)
        self.rng = random.Random(seed)
        self.parent_dir = workdir / "parent"
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.http = f"http://127.0.0.1:{_free_port()}"
        self.parent: ParentProcess | None = None
        self.parent_starts = 0
        self.last_parent_start = 0.0
        self.children = self._children()
        self.failures: list[str] = []
        self.counts = {"child_kills": 0, "pauses": 0, "parent_restarts": 0, "load_restarts_after_parent": 0}

    # -- the processes ---------------------------------------------------------------------------------------

    def _children(self) -> list[Child]:
        p = self.partitions
        writers, vms = max(2, p * 2 // 5), max(2, p // 4)
        rest = p - writers - vms
        video = max(1, (rest - 1) // 2)
        inputs = max(1, rest - 1 - video)
        sock = f"unix:{self.parent_dir / 'vmbus.sock'}"
        py = sys.executable
        out = []
        for i in range(writers):
            out.append(Child(f"writer-{i}", "writer", [
                py, "-m", "bench.soak_writer", "--connect", sock, "--name", f"writer-{i}", "--journal",
                str(self.workdir / f"writer-{i}.journal"), "--seed", str(self.seed), "--json-logs"], self.logdir))
        for i in range(vms):
            out.append(Child(f"vm-{i}", "vm", [
                py, "-m", "child_partition", "run", "--connect", sock, "--name", f"vm-{i}", "--json-logs",
                "--address", f"10.77.0.{i + 1}/24", "--ping", f"10.77.0.{(i + 1) % vms + 1}",
                "--ping-interval", "0.5", "--disk-writes", "1"], self.logdir))
        for workload, n, extra in (("video", video, ["--rate", "10", "--frame", "rects", "--rects", "4"]),
                                   ("input", inputs, ["--rate", "10", "--events", "mixed"]),
                                   ("churn", 1, ["--rate", "1", "--data-dir", str(self.parent_dir / "var")])):
            out.append(Child(workload, "load", [
                py, "-m", "child_partition", "load", workload, "--connect", sock, "--http", self.http,
                "--partitions", str(n), "--processes", "1", "--warmup", "0", "--runtime", "86400", "--quiet",
                "--name-prefix", "soak-", "--json", str(self.logdir / f"{workload}.{{start}}.json"), *extra],
                self.logdir))
        return out

    def start_parent(self) -> None:
        self.parent_starts += 1
        old = self.parent_dir / "parent.log"
        if old.exists():  # start_parent writes a new one
            old.rename(self.parent_dir / f"parent.{self.parent_starts - 1}.log")
        port = self.http.rsplit(":", 1)[1]
        self.parent = start_parent(self.parent_dir, set(DEVICES), log_level="info",
                                   extra_config=PARENT_CONFIG.format(port=port), timeout=WAIT)
        wait_for(self._api_up, f"the parent's API answers at {self.http}")

    def _api_up(self) -> bool:
        try:
            self.get("/api/")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.http + path, headers={"Connection": "close"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
            return json.loads(body) if resp.headers.get_content_type() == "application/json" else body.decode()

    def names(self) -> set[str]:
        return {p["name"] for p in self.get("/api/partitions")}

    def metrics(self) -> dict[str, float]:
        return scrape(self.get("/metrics"))

    def up(self, child: Child) -> bool:
        """The child's partitions are connected (a load client's: at least one; churn's come and go)."""
        if child.key == "churn":
            return child.alive()
        return child.alive() and any(child.holds(n) for n in self.names())

    def wait_up(self, children: list[Child]) -> None:
        for c in children:
            wait_for(functools.partial(self.up, c), f"{c.key} connects (log: {c.logs[-1] if c.logs else '-'})")

    def wait_released(self, child: Child) -> None:
        wait_for(lambda: not any(child.holds(n) for n in self.names()),
                 f"the parent releases {child.key}'s partitions after its kill -9")

    # -- chaos -----------------------------------------------------------------------------------------------

    def kill_and_restart(self, child: Child) -> None:
        assert child.proc is not None
        child.proc.kill()
        child.proc.wait(30)
        child.kills += 1
        self.counts["child_kills"] += 1
        self.wait_released(child)
        child.start()

    def restart_parent(self) -> None:
        assert self.parent is not None
        self.parent.proc.kill()
        self.parent.proc.wait(30)
        self.counts["parent_restarts"] += 1
        self.start_parent()
        self.last_parent_start = time.monotonic()
        for c in self.children:  # load clients do not reconnect: restarted, as by their operator
            if c.kind == "load":
                if c.proc is not None:
                    c.proc.kill()
                    c.proc.wait(30)
                c.start()
                self.counts["load_restarts_after_parent"] += 1

    def chaos(self) -> None:
        start = time.monotonic()
        end = start + self.seconds
        restarts = sorted(start + self.rng.uniform(0.15, 0.6) * self.seconds for _ in range(self.parent_restarts))
        paused: dict[str, float] = {}  # child key -> when to SIGCONT
        while (now := time.monotonic()) < end:
            time.sleep(min(self.rng.uniform(*CHAOS_GAP), max(0.0, end - now)))
            now = time.monotonic()
            for key, due in list(paused.items()):
                if due <= now:
                    next(c for c in self.children if c.key == key).signal(signal.SIGCONT)
                    del paused[key]
            for c in self.children:  # every exit of ours is followed by a start: this one left by itself
                if c.proc is not None and (code := c.proc.poll()) is not None:
                    self.failures.append(f"{c.key} exited {code} by itself during the soak (log: {c.logs[-1]})")
                    c.start()
            if now >= end:
                break
            if restarts and restarts[0] <= now:
                restarts.pop(0)
                self.say(f"  {now - start:6.1f} s: kill -9 of the parent, restarted")
                self.restart_parent()
                continue
            roll = self.rng.random()
            if self.pauses and roll < 0.15:
                candidates = [c for c in self.children if c.kind != "load" and c.key not in paused and c.alive()]
                if candidates:
                    c = self.rng.choice(candidates)
                    c.signal(signal.SIGSTOP)
                    c.pauses += 1
                    self.counts["pauses"] += 1
                    paused[c.key] = now + self.rng.uniform(*PAUSE)
                continue
            candidates = [c for c in self.children if c.key not in paused]
            c = self.rng.choice(candidates)
            self.kill_and_restart(c)
        for key in paused:
            next(c for c in self.children if c.key == key).signal(signal.SIGCONT)

    # -- idle figures ----------------------------------------------------------------------------------------

    def idle(self) -> dict[str, float]:
        """The parent with no partition and no disk open: its tasks, fds and RSS."""
        wait_for(lambda: self.metrics().get("vmbus_partitions_connected", -1) == 0, "every partition leaves")
        wait_for(lambda: self.metrics().get("vmbus_storage_luns_open", 0) == 0, "the disks close (idle_close)")
        m = self.metrics()
        return {"tasks": m["vmbus_parent_tasks"], "open_fds": m["process_open_fds"],
                "rss_bytes": m["process_resident_memory_bytes"]}

    def leaks(self, base: dict[str, float]) -> dict[str, Any]:
        failures = []
        try:
            wait_for(lambda: self.metrics()["vmbus_parent_tasks"] <= base["tasks"] + TASK_SLACK,
                     f"the parent's asyncio tasks back to {base['tasks']:g} + {TASK_SLACK}")
        except SoakFailed as exc:
            failures.append(f"leaked tasks: {exc} (now {self.metrics()['vmbus_parent_tasks']:g})")
        try:
            wait_for(lambda: self.metrics()["process_open_fds"] <= base["open_fds"] + FD_SLACK,
                     f"the parent's open fds back to {base['open_fds']:g} + {FD_SLACK}")
        except SoakFailed as exc:
            failures.append(f"leaked file descriptors: {exc} (now {self.metrics()['process_open_fds']:g})")
        end = self.idle()
        growth = end["rss_bytes"] - base["rss_bytes"]
        if growth > RSS_BOUND:
            failures.append(f"the parent's RSS grew {growth / MiB:.1f} MiB, more than {RSS_BOUND // MiB} MiB")
        return {"baseline": base, "end": end, "rss_growth_bytes": growth, "bounds": {
            "tasks": TASK_SLACK, "open_fds": FD_SLACK, "rss_bytes": RSS_BOUND}, "failures": failures}

    # -- the run ---------------------------------------------------------------------------------------------

    def stop_children(self) -> list[str]:
        failures = []
        for c in self.children:  # all at once, then each waited for
            c.ask_to_stop()
        for c in self.children:
            code = c.stop()
            ok = (0, 1, 143) if c.kind == "load" else (0,)  # load: 143 after SIGTERM, 1 if an operation failed
            if code not in ok:
                failures.append(f"{c.key} exited {code} on its graceful stop (log: {c.logs[-1]})")
        return failures

    def verify(self) -> dict[str, Any]:
        writers = [c for c in self.children if c.kind == "writer"]
        acknowledged = blocks = 0
        lost: list[str] = []
        for c in writers:
            journal = Journal.read(self.workdir / f"{c.key}.journal")
            acknowledged += journal.acknowledged
            blocks += len(journal.acked)
            image = self.parent_dir / "var" / c.key / "lun0.img"
            if journal.acked and not image.exists():
                lost.append(f"{c.key}: no image at {image}")
                continue
            lost += [f"{c.key}: acknowledged write lost at LBA {lba} (generation {gen}): {what}"
                     for lba, gen, what in lost_blocks(c.key, journal, image)]
        return {"acknowledged_writes": acknowledged, "blocks_verified": blocks, "lost": lost}

    def run(self) -> dict[str, Any]:
        failures = self.failures
        began = time.monotonic()
        self.start_parent()
        try:
            # Warm-up: the same children once, then gone; the baseline is the parent idle after it.
            self.say(f"warm-up: {len(self.children)} processes, {self.partitions} partitions")
            for c in self.children:
                c.start()
            self.wait_up(self.children)
            time.sleep(self.warmup)  # load runs for a while: caches, pools and imports reach their size
            failures += self.stop_children()
            base = self.idle()
            self.say(f"baseline: {base['tasks']:g} tasks, {base['open_fds']:g} fds, "
                     f"{base['rss_bytes'] / MiB:.1f} MiB RSS")
            for c in self.children:
                c.start()
            self.wait_up(self.children)
            self.say(f"soak: {self.seconds:g} s, seed {self.seed}")
            soak_began = self.last_parent_start = time.monotonic()
            self.chaos()
            soaked = time.monotonic() - soak_began
            # The leak figures are the last parent's: it served this much of the soak.
            final_parent = time.monotonic() - self.last_parent_start
            # Everyone is back after the last action before the graceful stop.
            self.wait_up(self.children)
            failures += self.stop_children()
            leaks = self.leaks(base)
            failures += leaks["failures"]
            assert self.parent is not None
            code = self.parent.stop(STOP_WAIT)
            if code != 0:
                failures.append(f"the parent exited {code} on SIGTERM (log: {self.parent.log_path})")
            self.parent = None
        finally:
            for c in self.children:
                if c.alive():
                    assert c.proc is not None
                    c.proc.kill()
                    c.proc.wait(10)
            if self.parent is not None:
                self.parent.stop(10)
        written = self.verify()
        failures += written["lost"][:20]
        if written["acknowledged_writes"] == 0:
            failures.append("no write was acknowledged: the writers never ran")
        differs = [f"{c.key}: a disk write read back differs (log: {c.logs})" for c in self.children
                   if c.kind == "vm" and c.events("disk write read back differs")]
        failures += differs
        errors = self.parent_errors()
        failures += [f"the parent logged an error: {e}" for e in errors[:5]]
        leaks["final_parent_soak_seconds"] = round(final_parent, 1)
        return self.result(soaked, time.monotonic() - began, leaks, written, errors, failures)

    def parent_errors(self) -> list[str]:
        out = []
        for log in sorted(self.parent_dir.glob("parent*.log")):
            for line in log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict) and rec.get("level") in ("error", "critical"):
                        out.append(f"{log.name}: {rec.get('event')} {rec.get('error', '')}".strip())
        return out

    def result(self, soaked: float, total: float, leaks: dict[str, Any], written: dict[str, Any],
               errors: list[str], failures: list[str]) -> dict[str, Any]:
        vms = [c for c in self.children if c.kind == "vm"]
        writers = [c for c in self.children if c.kind == "writer"]
        loads = {c.key: _load_summary(sorted(self.logdir.glob(f"{c.key}.*.json"))) for c in self.children
                 if c.kind == "load"}
        return {
            "seed": self.seed, "partitions": self.partitions, "processes": len(self.children),
            "seconds": round(soaked, 1), "wall_seconds": round(total, 1),
            "children": {c.key: {"starts": c.starts, "kills": c.kills, "pauses": c.pauses,
                                 "exit_codes": c.exit_codes} for c in self.children},
            **self.counts,
            # Sessions a writer or VM process opened beyond its first: reconnects by itself after the parent's
            # kill -9 or a pause that cost it its connection (a restarted process's first session is not one).
            "reconnects": sum(c.sessions_after_the_first("all offered channels open") for c in vms)
            + sum(c.sessions_after_the_first("writing") for c in writers),
            "pings": {"replies": sum(c.events("ping reply") for c in vms),
                      "lost": sum(c.events("ping lost") for c in vms)},
            "vm_disk_writes": {"verified": sum(c.events("disk write") for c in vms),
                               "failed": sum(c.events("disk write failed") for c in vms),
                               "read_back_differs": sum(c.events("disk write read back differs") for c in vms)},
            "load": loads, "writes": written, "leaks": leaks, "parent_errors": errors[:20],
            "failures": failures, "passed": not failures,
        }


def _load_summary(paths: list[Path]) -> dict[str, dict[str, int]]:
    """A load client's operations and errors by name, over its runs that reported (a kill -9 leaves no JSON)."""
    out: dict[str, dict[str, int]] = {}
    for path in paths:
        with contextlib.suppress(ValueError, OSError):
            for section in json.loads(path.read_text()).get("workloads", {}).values():
                for name, d in section.get("ops", {}).items():
                    mine = out.setdefault(name, {"ops": 0, "errors": 0})
                    mine["ops"] += int(d.get("ops") or 0)
                    mine["errors"] += int(d.get("errors") or 0)
    return out


def run_soak(workdir: Path, seconds: float, partitions: int, seed: int, **kw: Any) -> dict[str, Any]:
    return Soak(workdir, seconds, partitions, seed, **kw).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="seconds of chaos (after a warm-up round)")
    ap.add_argument("--partitions", type=int, default=16, help="child partitions at once (at least 8)")
    ap.add_argument("--seed", type=int, default=1, help="the chaos loop's seed")
    ap.add_argument("--parent-restarts", type=int, default=1, help="kill -9 and restarts of the parent")
    ap.add_argument("--no-pauses", action="store_true", help="never SIGSTOP a child")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--workdir", type=Path, help="keep the parent's data, journals and logs here")
    args = ap.parse_args(argv)
    if args.partitions < 8:
        ap.error("--partitions: at least 8 (writers, VMs, video, input and churn)")
    # Without --workdir: a temporary one, deleted after a passed run and kept (and named) after a failed one.
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmbus-soak-"))
    try:
        result = run_soak(workdir, args.seconds, args.partitions, args.seed, parent_restarts=args.parent_restarts,
                          pauses=not args.no_pauses)
    except SoakFailed as exc:
        print(f"python -m bench.soak: {exc}; logs in {workdir}", file=sys.stderr)
        return 1
    if args.json:
        result["machine"] = describe(workdir)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    for f in result["failures"]:
        print(f"FAILED: {f}", file=sys.stderr)
    if not result["passed"]:
        print(f"logs, journals and the parent's data dir are in {workdir}", file=sys.stderr)
    elif args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result["passed"] else 1


def summary(r: dict[str, Any]) -> str:
    lk = r["leaks"]
    b, e = lk["baseline"], lk["end"]
    return (f"soak: {r['partitions']} partitions, {r['seconds']:g} s, seed {r['seed']}: {r['child_kills']} kills -9 "
            f"of children, {r['pauses']} pauses, {r['parent_restarts']} parent restarts, {r['reconnects']} "
            f"reconnects; {r['writes']['acknowledged_writes']} acknowledged writes, "
            f"{r['writes']['blocks_verified']} blocks verified, {len(r['writes']['lost'])} lost; "
            f"{r['pings']['replies']} ping replies; tasks {b['tasks']:g} -> {e['tasks']:g}, fds {b['open_fds']:g} -> "
            f"{e['open_fds']:g}, RSS {b['rss_bytes'] / MiB:.1f} -> {e['rss_bytes'] / MiB:.1f} MiB; "
            f"{'passed' if r['passed'] else 'FAILED'}")


if __name__ == "__main__":
    sys.exit(main())
