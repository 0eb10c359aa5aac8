"""The scale benchmark's coordinator: N child partitions from a few processes against one parent, then active.

One parent daemon runs with its real devices (every device the registry enables by default: storage,
network, video, keyboard, mouse, heartbeat) and its web console on a loopback port. ``workers`` processes
(``bench.scale_worker``) each bring up their share of partitions over TCP, every partition opening all
their channels. Measured while opening: channels opened per second (all channels / wall time from the first
connect to the last partition with all channels open), errors, the parent's RSS and open files before any
partition and with all N connected, and the time for all partitions to shut down cleanly.

Then each *active phase* (``ScaleSession.active``) runs the light mix of ``bench.scale_activity`` on every
partition for a bounded time: per-kind latency histograms merged from the workers, errors, the parent's
packets both ways (its ``/metrics`` counters ``vmbus_channel_packets_total`` before and after, by device),
and where the CPU went: the parent, the load workers and everything else, in cores.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from vmbus_proto.devices.registry import ALL

from .parent import REPO_ROOT, ParentProcess, _free_port, child_env, raise_nofile, start_parent
from .scale_stats import KINDS, merge, summarize, verdict

REAL_DEVICES = {spec.name for spec in ALL}
P99_BOUND_MS = 10.0


class Worker:
    def __init__(self, index: int, url: str, api: str, count: int, first: int, concurrency: int, timeout: float,
                 workdir: Path) -> None:
        self.index = index
        self.stderr_path = workdir / f"worker{index}.log"
        raise_nofile()  # inherited by the worker (which raises it again itself)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.scale_worker", "--url", url, "--api", api, "--count", str(count),
                 "--prefix", f"w{index}", "--index", str(index), "--first", str(first),
                 "--channels", str(len(REAL_DEVICES)), "--concurrency", str(concurrency), "--timeout", str(timeout)],
                cwd=str(REPO_ROOT), env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.ps = psutil.Process(self.proc.pid)

    def send(self, command: str) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(command.encode() + b"\n")
        stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next JSON line, which must be ``event``, within ``timeout`` seconds."""
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"scale worker {self.index} sent no {event!r} within {timeout:g}s")
        line = stdout.readline()  # the worker writes each JSON line whole, with one flush
        if not line:
            code = self.proc.wait(30)
            raise RuntimeError(f"scale worker {self.index} exited with {code} before {event!r}: "
                               f"{self.stderr_path.read_text(errors='replace')[-1500:]}")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") != event:
            raise RuntimeError(f"scale worker {self.index} sent {msg!r}, expected {event!r}")
        return msg

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def finish(self) -> int:
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def parent_counters(api: str) -> tuple[dict[str, float], dict[float, float]]:
    """From the parent's /metrics: its ring packets so far, ``DEVICE/in`` and ``DEVICE/out`` (in: guest to
    host; ``switch/frames`` and ``switch/flooded``: frames into the switch and those sent to every port), and
    its event-loop lag histogram (cumulative count by upper bound in seconds)."""
    with urllib.request.urlopen(f"{api}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    packets: dict[str, float] = {}
    lag: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "vmbus_channel_packets":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    key = f"{s.labels['device']}/{s.labels['direction']}"
                    packets[key] = packets.get(key, 0.0) + s.value
        elif fam.name in ("vmbus_network_switch_frames", "vmbus_network_switch_flooded"):
            packets["switch/" + fam.name.rsplit("_", 1)[1]] = sum(s.value for s in fam.samples
                                                                 if s.name.endswith("_total"))
        elif fam.name == "vmbus_event_loop_lag_seconds":
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    lag[float(s.labels["le"])] = s.value
    return packets, lag


def lag_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """The parent's loop lag over a window from two cumulative histograms: samples, the bucket bound that
    holds the 99th percentile, and how many samples were later than 10 ms."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    p99 = next((b for b, c in zip(bounds, counts, strict=True) if c >= 0.99 * total), float("inf")) if total else 0.0
    over = total - max((c for b, c in zip(bounds, counts, strict=True) if b <= 0.010), default=0.0)
    return {"samples": total, "p99_le_ms": round(p99 * 1000, 3), "over_10ms": over}


def _busy_cpu() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


class ScaleSession:
    """One parent, its workers and their partitions: ``start`` brings them up, ``active`` runs a measured
    phase (as many as wanted), ``finish`` shuts everything down and returns the whole record."""

    def __init__(self, workdir: Path, partitions: int, workers: int, concurrency: int, timeout: float = 120.0,
                 parent_log_level: str = "info", gc_probe: Path | None = None, parent_workers: int = 1) -> None:
        self.workdir, self.partitions, self.timeout = workdir, partitions, timeout
        self.http_port = _free_port()
        self.api = f"http://127.0.0.1:{self.http_port}"
        self.parent: ParentProcess = start_parent(
            workdir / "parent", REAL_DEVICES, log_level=parent_log_level,
            extra_config=f'\n[http]\nlisten = "127.0.0.1:{self.http_port}"\n',
            wrap=["-m", "bench.gc_probe", str(gc_probe)] if gc_probe else None, workers=parent_workers)
        self.n_workers, self.concurrency, self.gc_probe = workers, concurrency, gc_probe
        self.procs: list[Worker] = []
        self.record: dict[str, Any] = {"transport": "tcp", "partitions": partitions, "active": [],
                                       "parent_workers": parent_workers}
        self.errors: list[str] = []
        self.error_count = 0

    def freeze_parent(self) -> None:
        """With ``gc_probe``: have the parent ``gc.freeze()`` (the experiment; see bench/gc_probe.py)."""
        if self.gc_probe is not None:
            Path(str(self.gc_probe) + ".freeze").touch()
            time.sleep(0.5)

    def start(self) -> dict[str, Any]:
        parent, r = self.parent, self.record
        url = parent.endpoint("tcp")
        time.sleep(0.5)  # let the daemon settle before the baseline
        rss0, fds0 = parent.rss(), parent.ps.num_fds()
        n, w = self.partitions, self.n_workers
        shares = [n // w + (1 if i < n % w else 0) for i in range(w)]
        firsts = [sum(shares[:i]) for i in range(w)]
        self.procs = [Worker(i, url, self.api, c, firsts[i], self.concurrency, self.timeout, self.workdir)
                      for i, c in enumerate(shares) if c]
        for p in self.procs:
            p.expect("hello", 60.0)
        cpu0 = parent.cpu_seconds()
        for p in self.procs:
            p.send("go")
        ready = [p.expect("ready", self.timeout + 30.0) for p in self.procs]
        cpu1 = parent.cpu_seconds()
        time.sleep(1.0)  # let allocations settle before reading RSS
        wall = max(x["t_last"] for x in ready) - min(x["t_first"] for x in ready)
        ok = sum(int(x["ok"]) for x in ready)
        channels = sum(int(x["channels"]) for x in ready)
        self._errors([e for x in ready for e in x["errors"]], sum(int(x["error_count"]) for x in ready))
        rss_n = parent.rss()
        packets, _ = parent_counters(self.api)
        r["bring_up_switch"] = {k.split("/")[1]: v for k, v in packets.items() if k.startswith("switch/")}
        r["bring_up_parent_cpu_s"] = round(cpu1 - cpu0, 2)
        r.update({"workers": len(self.procs), "concurrency_per_worker": self.concurrency, "partitions_ready": ok,
                  "channels_opened": channels, "open_wall_s": wall,
                  "channels_per_s": channels / wall if wall > 0 else 0.0,
                  "partitions_per_s": ok / wall if wall > 0 else 0.0,
                  "parent_cpu_during_open": (cpu1 - cpu0) / wall if wall > 0 else 0.0,
                  "rss_before_bytes": rss0, "rss_connected_bytes": rss_n,
                  "rss_per_partition_bytes": (rss_n - rss0) / n if n else 0.0,
                  "parent_fds_before": fds0, "parent_fds_connected": parent.ps.num_fds()})
        return r

    def _errors(self, samples: list[str], count: int) -> None:
        self.errors.extend(samples)
        self.error_count += count

    def active(self, period: float, seconds: float, warmup: float) -> dict[str, Any]:
        """Every partition does one of each activity per ``period`` seconds; recorded for ``seconds`` after
        ``warmup``. Returns the phase's figures (also appended to the record)."""
        parent = self.parent
        for p in self.procs:
            p.send("prime")
        primed = [p.expect("primed", self.timeout) for p in self.procs]
        t_start = time.monotonic() + 0.5
        t_measure, t_end = t_start + warmup, t_start + warmup + seconds
        for p in self.procs:
            p.send(f"active {period!r} {t_start!r} {t_measure!r} {t_end!r}")
        time.sleep(max(0.0, t_measure - time.monotonic()))
        load0 = os.getloadavg()
        (pk0, lag0), c0 = parent_counters(self.api), time.monotonic()
        cpu_p0, cpu_w0, busy0 = parent.cpu_seconds(), sum(p.cpu_seconds() for p in self.procs), _busy_cpu()
        time.sleep(max(0.0, t_end - time.monotonic()))
        (pk1, lag1), c1 = parent_counters(self.api), time.monotonic()
        cpu_p1, cpu_w1, busy1 = parent.cpu_seconds(), sum(p.cpu_seconds() for p in self.procs), _busy_cpu()
        rss, fds = parent.rss(), parent.ps.num_fds()
        results = [p.expect("activity", seconds + warmup + 60.0) for p in self.procs]
        dt = c1 - c0
        kinds = summarize(merge(x["histograms"] for x in results))
        errors = {k: sum(int(x["errors"].get(k, 0)) for x in results) for k in KINDS}
        n_err = sum(errors.values())
        samples = [e for x in results for e in x["error_samples"]]
        self._errors(samples, n_err)
        packets = {k: pk1.get(k, 0.0) - pk0.get(k, 0.0) for k in sorted(pk1)}
        total_in = sum(v for k, v in packets.items() if k.endswith("/in"))
        total_out = sum(v for k, v in packets.items() if k.endswith("/out"))
        parent_cores, worker_cores = (cpu_p1 - cpu_p0) / dt, (cpu_w1 - cpu_w0) / dt
        held, why = verdict(n_err, kinds, P99_BOUND_MS, required=KINDS)
        ok, why_errors = verdict(n_err, kinds, float("inf"), required=KINDS)
        phase = {
            "partitions": self.record.get("partitions_ready", 0), "period_s": period, "seconds": seconds,
            "warmup_s": warmup, "activities_per_s": sum(int(x["done"].get(k, 0)) for x in results for k in KINDS)
            / seconds, "done": {k: sum(int(x["done"].get(k, 0)) for x in results) for k in KINDS},
            "errors": errors, "error_count": n_err, "error_samples": samples[:20], "latency": kinds,
            "packets": {k: round(v / dt, 1) for k, v in packets.items()},
            "packets_per_s": round((total_in + total_out) / dt, 1), "packets_in_per_s": round(total_in / dt, 1),
            "packets_out_per_s": round(total_out / dt, 1),
            "parent_cpu_cores": round(parent_cores, 3), "workers_cpu_cores": round(worker_cores, 3),
            "other_cpu_cores": round(max(0.0, (busy1 - busy0) / dt - parent_cores - worker_cores), 3),
            "parent_loop_lag": lag_summary(lag0, lag1),
            "arp_prime": {"seconds": round(max(float(x["seconds"]) for x in primed), 2),
                          "failures": sum(int(x["failures"]) for x in primed),
                          "failure_samples": [e for x in primed for e in x["failure_samples"]][:5]},
            "workers_gc": {"max_ms": max(float(x["gc"]["max_ms"]) for x in results),
                           "total_ms": round(sum(float(x["gc"]["total_ms"]) for x in results), 1)},
            "parent_rss_bytes": rss, "parent_fds": fds, "loadavg_at_start": list(load0),
            "held": held, "verdict": why, "zero_errors": ok, "verdict_errors": why_errors}
        self.record["active"].append(phase)
        return phase

    def finish(self) -> dict[str, Any]:
        r, parent = self.record, self.parent
        try:
            if self.procs:
                for p in self.procs:
                    p.send("stop")
                done = [p.expect("done", self.timeout + 30.0) for p in self.procs]
                codes = [p.finish() for p in self.procs]
                self._errors([e for d in done for e in d["errors"]],
                             sum(int(d["error_count"]) for d in done) + sum(1 for c in codes if c != 0))
                r["teardown_s"] = max(float(d["teardown_s"]) for d in done)
                time.sleep(0.2)
                r["rss_after_teardown_bytes"], r["parent_fds_after_teardown"] = parent.rss(), parent.ps.num_fds()
        except (TimeoutError, RuntimeError, OSError) as exc:  # a worker that hung or died: counted, then killed
            self._errors([f"teardown: {exc}"[:500]], 1)
        finally:
            self.kill_workers()
            code = parent.stop()
        lines = parent.log_lines()
        parent_errors = [str(x.get("event")) + ": " + str(x.get("error", "")) for x in lines
                         if x.get("level") == "error"]
        self._errors(parent_errors[:20], len(parent_errors) + (1 if code != 0 else 0))
        r.update({"channels_opened_parent_log": sum(1 for x in lines if x.get("event") == "channel open"),
                  "errors": self.error_count, "error_samples": self.errors[:20],
                  "parent_warnings": sum(1 for x in lines if x.get("level") == "warning"),
                  "parent_exit_code": code})
        return r

    def kill_workers(self) -> None:
        for p in self.procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(10)


def run_scale(workdir: Path, partitions: int, workers: int, concurrency: int, timeout: float = 120.0,
              parent_log_level: str = "info", period: float = 0.0, seconds: float = 0.0,
              warmup: float = 2.0, parent_workers: int = 1) -> dict[str, Any]:
    """Bring ``partitions`` up, then (with ``seconds``) one active phase at one of each activity per ``period``,
    and shut down. The returned record has the bring-up figures, ``active`` (the phases) and the errors."""
    session = ScaleSession(workdir, partitions, workers, concurrency, timeout, parent_log_level,
                           parent_workers=parent_workers)
    try:
        session.start()
        if seconds > 0:
            session.active(period, seconds, warmup)
    finally:
        record = session.finish()
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.scale --partitions 200 --workers 1,2``: the bring-up with each number of parent worker
    processes in turn, channel opens per second side by side (and the record as JSON with ``--json``)."""
    import argparse  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--partitions", type=int, default=200)
    p.add_argument("--workers", default="1,2", help="the parent's worker processes, comma-separated runs")
    p.add_argument("--load", type=int, default=4, help="load processes bringing the partitions up")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="scale-workers-") as tmp:
        for n in (int(x) for x in args.workers.split(",")):
            r = run_scale(Path(tmp) / f"w{n}", args.partitions, args.load, args.concurrency, parent_workers=n)
            runs.append(r)
            print(f"parent workers {n}: {r.get('channels_per_s', 0):8.1f} channel opens/s, "
                  f"{r.get('partitions_per_s', 0):6.1f} partitions/s, errors {r['errors']}", flush=True)
    if len(runs) > 1 and runs[0].get("channels_per_s"):
        print(f"ratio {runs[-1].get('channels_per_s', 0) / runs[0]['channels_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1, default=str))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
