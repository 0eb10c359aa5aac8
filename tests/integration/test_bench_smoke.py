"""Smoke test for ``python -m bench.run``: it runs end to end and writes the results it promises.

Only shape and correctness are checked (every cell measured, nothing failed, the machine described, the
per-process counters and the disk's I/O counters recorded and consistent); never timing.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.emulated_vs_synthetic import emulated_table
from bench.scale_stats import KINDS
from vmbus_proto.devices.registry import ALL

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COUNTERS = {"cpu_us", "user_us", "sys_us", "read_syscalls", "write_syscalls", "vol_cs", "invol_cs", "runq_wait_us",
            "minor_faults"}


def check_counters(where: str, per_op: dict[str, dict[str, float]], processes: set[str]) -> None:
    assert set(per_op) == processes, f"{where}: counters for {sorted(per_op)}, expected {sorted(processes)}"
    for name, c in per_op.items():
        assert set(c) >= COUNTERS, f"{where} {name}: missing counters {sorted(COUNTERS - set(c))}"
        bad = {k: v for k, v in c.items() if not (math.isfinite(v) and v >= 0)}
        assert not bad, f"{where} {name}: counters not finite and >= 0: {bad}"
        assert c["cpu_us"] > 0, f"{where} {name}: no CPU time per operation"


def check_calibration(where: str, cal: dict[str, float]) -> None:
    for key in ("python_loops_per_s", "syscall_getppid_ns", "syscall_read_devzero_ns",
                "process_wakeup_roundtrip_us", "copy_1mib_gb_per_s", "socket_64k_send_recv_us"):
        assert math.isfinite(cal[key]) and cal[key] > 0, f"{where}: calibration {key} = {cal[key]!r}"


def check_machine(meta: dict[str, Any]) -> None:
    m = meta["machine"]
    assert m["cpu"].get("model_name"), f"no CPU model name: {m['cpu']}"
    assert m["cpu"]["cpus"] >= 1, m["cpu"]
    assert isinstance(m["cpu"]["flags_of_note"], list), m["cpu"]
    assert m["kernel"] == platform.release(), f"kernel {m['kernel']!r}, uname -r says {platform.release()!r}"
    assert isinstance(m["mitigations"], dict), m["mitigations"]
    assert all(isinstance(v, str) and v for v in m["mitigations"].values()), m["mitigations"]
    assert m["clocksource"] and m["clocksource"] != "unknown", f"clocksource {m['clocksource']!r}"
    assert m["workdir_fs"]["fstype"] not in ("", "unknown"), f"work dir filesystem: {m['workdir_fs']}"
    assert m["python"]["version"] == platform.python_version(), m["python"]
    assert 0 < m["memory_available_bytes"] <= m["memory_bytes"], (m["memory_available_bytes"], m["memory_bytes"])
    check_calibration("start", m["calibration"])
    check_calibration("end", meta["calibration_at_end"])
    load = meta["loadavg_at_start"]
    assert len(load) == 3 and all(math.isfinite(x) and x >= 0 for x in load), f"load average {load}"


def check_emulated(results: dict[str, Any], stdout: str) -> None:
    """Lab 6's section: every path and direction measured, and its round trips per op the exact counts of
    docs/protocol.md §13.2 (1 for StorVSC; 24 VM exits per 4 KiB read with ``rep insw``, 2,064 word by word and
    per write, plus the busy status polls the run reports). Nothing about speed."""
    runs = results["emulated"]["runs"]
    assert len(runs) == 1, "--quick runs once"
    exact = {("synthetic", "read"): 1, ("synthetic", "write"): 1, ("emulated-string", "read"): 24}
    cells = {(path, op): d for path, ops in runs[0].items() for op, d in ops.items()}
    assert set(cells) == {(p, o) for p in ("synthetic", "emulated-string", "emulated-word") for o in ("read", "write")}
    for key, d in cells.items():
        assert d["ops"] > 0 and d["ops_per_s"] > 0 and d["latency_us"]["p50"] <= d["latency_us"]["p99"], (key, d)
        trips, busy = d["round_trips_per_op"], d["busy_polls_per_op"]
        want = exact.get(key, 2064)  # a write: 2,064 exits either way
        assert abs(trips - busy - want) < 0.11, f"{key}: {trips} round trips per op, {busy} of them busy polls"
        assert d["wire_bytes_per_op"] > 4096, f"{key}: the 4 KiB of data must cross the wire: {d}"
    ratio = results["summary"]["emulated_synthetic_over_string_pio"]
    assert set(ratio) == {"read", "write"}, ratio
    assert "emulated IDE vs StorVSC" in stdout, "the section's table was not printed"
    assert emulated_table(results["emulated"]).row_count == 6


@pytest.mark.timeout(930)
def test_bench_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # A guard against a hang, not a speed check: ~3 min quiet, over 5 beside the parallel suite and a busy loop
    # per core (storage runs whose setup outlasts the sampling window are run again).
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--partitions", "20", "--seconds", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"meta", "aims", "echo", "scale", "storage", "storage_image", "summary"} <= set(results)
    check_machine(results["meta"])
    check_emulated(results, proc.stdout)
    assert "Python loops/s" in proc.stdout and "mitigations" in proc.stdout, "no machine summary printed"

    cells = {(row["size"], row["transport"]) for row in results["echo"]}
    assert cells == {(size, t) for size in (1024, 65536) for t in ("tcp", "unix", "shared")}
    for row in results["echo"]:
        assert row["packet"] == ("inband" if row["size"] == 1024 else "gpa_direct")
        for part in ("raw", "framed", "vmbus"):
            assert row[part]["rtt_per_s"] > 0
            assert row[part]["round_trips"] > 0
            assert row[part]["rtt_per_s_min"] <= row[part]["rtt_per_s"] <= row[part]["rtt_per_s_max"]
            assert 0 <= row[part]["steal_frac"] <= 1, row[part]["steal_frac"]
            check_counters(f"echo {row['size']} {row['transport']} {part}", row[part]["per_op"], {"server", "client"})
        assert row["ratio"] > 0

    scale = results["scale"]
    assert scale["partitions"] == 20
    assert scale["errors"] == 0, scale["error_samples"]
    assert scale["partitions_ready"] == 20
    assert scale["channels_opened"] == 20 * len(ALL)
    assert scale["channels_per_s"] > 0
    assert scale["rss_connected_bytes"] > 0
    assert scale["parent_exit_code"] == 0
    # The active phase: every partition did each activity, the parent's counters saw the packets.
    (phase,) = scale["active"]
    assert phase["error_count"] == 0, phase["error_samples"]
    assert set(phase["latency"]) >= set(KINDS), f"activities without latencies: {sorted(phase['latency'])}"
    for kind in KINDS:
        assert phase["done"][kind] > 0, f"no {kind} activity done: {phase['done']}"
        s = phase["latency"][kind]
        assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"], f"{kind}: percentiles out of order: {s}"
    assert phase["packets_in_per_s"] > 0 and phase["packets_out_per_s"] > 0, phase["packets"]
    assert phase["parent_cpu_cores"] > 0 and phase["workers_cpu_cores"] > 0, phase

    storage = {(row["rw"], row["transport"]): row for row in results["storage"]}
    assert set(storage) == {(rw, t) for rw in ("randread", "randwrite", "read", "write")
                            for t in ("tcp", "unix", "shared")}
    for row in storage.values():
        assert row["vmbus"]["errors"] == []
        assert row["vmbus"]["iops"] > 0 and row["fio"]["iops"] > 0 and row["ratio_iops"] > 0
        assert row["vmbus"]["parent_us_per_io"] > 0 and row["vmbus"]["guest_us_per_io"] > 0
        where = f"storage {row['rw']} {row['transport']}"
        assert row["vmbus"]["iops_min"] <= row["vmbus"]["iops"] <= row["vmbus"]["iops_max"], where
        check_counters(where, row["vmbus"]["per_io"], {"parent", "guest"})
        for resident in row["vmbus"]["samples_cache_resident_before"]:
            assert 0 <= resident <= 1, f"{where}: resident share {resident}"
        for disk in row["vmbus"]["samples_disk"]:
            assert "error" not in disk, f"{where}: {disk}"
            reads = disk["reads_inline"] + disk["reads_pool"]
            writes = disk["writes_inline"] + disk["writes_pool"]
            assert disk["reads_nowait_refused"] <= disk["reads_pool"], f"{where}: a refused read went nowhere: {disk}"
            # Every I/O of the run reached the disk one way or the other (the scan's reads come on top).
            assert (reads if "read" in row["rw"] else writes) > 0, f"{where}: the disk counted no I/O: {disk}"
    assert results["storage_image"]["fs"]["fstype"] not in ("", "unknown"), results["storage_image"]["fs"]
    assert results["storage_image"]["cache_mode"] == "warm", results["storage_image"]
    probe = results["storage_image"]["nowait_probe"]
    assert probe["ok"] + probe["eagain"] + probe["short"] + probe["unsupported"] == probe["reads"], probe

    # The README's table renders from this run: one row per echo cell and storage job, and the range line.
    table = subprocess.run([sys.executable, "-m", "bench.table", "--ranges", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=60, check=False)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert len(rows) == len(results["echo"]) + len(results["storage"]), table.stdout
    assert "Range over 1 result file(s)" in table.stdout, table.stdout


@pytest.mark.timeout(300)
def test_workers_isolation_runs_every_case(tmp_path: Path) -> None:
    """``python -m bench.workers_isolation``: the probe measured in all four cases, beside a hog that did I/O,
    and with two workers on the worker the hog is not on. Shape only, never timing."""
    out = tmp_path / "isolation.json"
    proc = subprocess.run([sys.executable, "-m", "bench.workers_isolation", "--seconds", "0.5", "--repeat", "1",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"1w-alone", "1w-hog", "2w-alone", "2w-hog"}
    for case, (row,) in runs.items():
        assert "error" not in row, (case, row)
        assert row["probe"]["iops"] > 0 and 0 < row["probe"]["p50_us"] <= row["probe"]["p99_us"], (case, row)
        assert (row["hog"] is not None) == row["with_hog"] == case.endswith("hog"), (case, row)
        if row["hog"] is not None:
            assert row["hog"]["iops"] > 0, (case, row)
    assert runs["2w-hog"][0]["probe_worker"] != runs["2w-hog"][0]["hog_worker"]
    assert "probe IOPS" in proc.stdout, "no table printed"
