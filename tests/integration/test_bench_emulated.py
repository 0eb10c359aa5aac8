"""``python -m bench.run --only emulated`` (lab 6's table, a section of ``make bench``): a quick run measures
every path and direction, and its round trips per op are the exact counts of docs/protocol.md §13.2 (1 for
StorVSC; 24 VM exits per 4 KiB read with ``rep insw``, 2,064 word by word and per write, plus the busy
status polls the run reports). Nothing is asserted about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.emulated_vs_synthetic import emulated_table

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_bench_emulated_section(tmp_path: Path) -> None:
    out = tmp_path / "emulated.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--only", "emulated", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=280, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, f"bench.run --only emulated exited {proc.returncode}: {proc.stderr[-2000:]}"
    results = json.loads(out.read_text())
    assert "emulated" in results and "echo" not in results, sorted(results)
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
    assert "emulated IDE vs StorVSC" in proc.stdout, "the section's table was not printed"
    assert emulated_table(results["emulated"]).row_count == 6
