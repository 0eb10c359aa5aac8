"""Smoke test for ``python -m bench.run``: it runs end to end and writes the results it promises.

Only shape and correctness are checked (every cell measured, nothing failed); never timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(200)
def test_bench_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--partitions", "20", "--seconds", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"meta", "aims", "echo", "scale", "storage", "summary"} <= set(results)

    cells = {(row["size"], row["transport"]) for row in results["echo"]}
    assert cells == {(1024, "tcp"), (1024, "unix"), (65536, "tcp"), (65536, "unix")}
    for row in results["echo"]:
        assert row["packet"] == ("inband" if row["size"] == 1024 else "gpa_direct")
        for part in ("raw", "framed", "vmbus"):
            assert row[part]["rtt_per_s"] > 0
            assert row[part]["round_trips"] > 0
        assert row["ratio"] > 0

    scale = results["scale"]
    assert scale["partitions"] == 20
    assert scale["errors"] == 0, scale["error_samples"]
    assert scale["partitions_ready"] == 20
    assert scale["channels_opened"] == 20 * 5
    assert scale["channels_per_s"] > 0
    assert scale["rss_connected_bytes"] > 0
    assert scale["parent_exit_code"] == 0

    storage = {(row["rw"], row["transport"]): row for row in results["storage"]}
    assert set(storage) == {(rw, t) for rw in ("randread", "randwrite", "read", "write") for t in ("tcp", "unix")}
    for row in storage.values():
        assert row["vmbus"]["errors"] == []
        assert row["vmbus"]["iops"] > 0 and row["fio"]["iops"] > 0 and row["ratio_iops"] > 0
        assert row["vmbus"]["parent_us_per_io"] > 0 and row["vmbus"]["guest_us_per_io"] > 0
