"""``child-partition load`` against a real parent: the parent's /metrics count exactly the packets the load
client says it caused, partitions split across processes are merged into one result, results of two runs
merge, and a workload file mixes storage and network in one run."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vmbus_proto.aio.keyfile import new_secret_file

from .conftest import BIN, Parent

pytestmark = pytest.mark.integration
TIMEOUT = 180


def load(*argv: str) -> tuple[subprocess.CompletedProcess[str], int]:
    proc = subprocess.Popen([str(BIN / "child-partition"), "load", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def storage_counters(url: str, device: str = "storage") -> dict[str, float]:
    """A device's channels' packets and data bytes in and out, from /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    out = {}
    for family in ("packets", "data_bytes"):
        for direction in ("in", "out"):
            m = re.search(rf'^vmbus_channel_{family}_total{{device="{device}",direction="{direction}"}} (\S+)$', text,
                          re.M)
            out[f"{family}_{direction}"] = float(m.group(1)) if m else 0.0
    return out


def ops_of(path: Path, workload: str, op: str) -> int:
    doc: dict[str, Any] = json.loads(path.read_text())
    assert doc["errors"] == [], doc["errors"]
    return int(doc["workloads"][workload]["ops"][op]["ops"])


def test_metrics_count_exactly_the_requests_the_client_made(workdir: Path) -> None:
    """Each SCSI request is one inbound packet on the storage channel and one completion out; a guest's
    attach, discard and detach add the same packets whatever the run's length. So between a run of K1 and one
    of K2 writes the parent's counters move by exactly K2 - K1 packets each way and (K2 - K1) x 4096 data bytes
    in (write data travels with the request)."""
    parent = Parent(workdir / "p", extra=["--http", "127.0.0.1:0"])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        moved, counted = [], []
        for k in (150, 400):
            before = storage_counters(url)
            out = workdir / f"run{k}.json"
            done, pid = load("storage", "--connect", parent.unix, "--rw", "randwrite", "--bs", "4k", "--iodepth", "4",
                             "--size", "16M", "--count", str(k), "--warmup", "0", "--runtime", "600",
                             "--processes", "1", "--json", str(out))
            assert done.returncode == 0, done.stdout + done.stderr
            parent.wait_event("VMBus disconnected", 30, partition=f"load-{pid}-0")
            after = storage_counters(url)
            moved.append({key: after[key] - before[key] for key in after})
            counted.append(ops_of(out, "storage", "write"))
        assert counted == [150, 400], f"the client counted {counted} writes, asked for 150 and 400"
        extra = counted[1] - counted[0]
        for key, expect in (("packets_in", extra), ("packets_out", extra), ("data_bytes_in", extra * 4096)):
            assert moved[1][key] - moved[0][key] == expect, f"{key}: the parent counted {moved[1][key]} - " \
                f"{moved[0][key]}, the client {expect}"
    finally:
        parent.stop()


def test_processes_split_the_partitions_and_their_results_merge(parent: Parent, workdir: Path) -> None:
    a, b, m = workdir / "a.json", workdir / "b.json", workdir / "m.json"
    common = ["--connect", parent.unix, "--rw", "randrw", "--iodepth", "2", "--size", "16M", "--count", "100",
              "--warmup", "0", "--runtime", "600", "--partitions", "2", "--processes", "2"]
    done, pid = load("storage", *common, "--json", str(a), "--tag", "a")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(a.read_text())
    assert len(doc["runs"]) == 2 and {r["pid"] for r in doc["runs"]} != {pid}, "not split across 2 processes"
    storage = doc["workloads"]["storage"]
    assert storage["partitions_ok"] == 2 and sum(s["ops"] for s in storage["ops"].values()) == 200, storage
    assert "partitions: 2 ok, 0 failed" in done.stdout and "clat percentiles (usec)" in done.stdout, done.stdout
    for i in range(2):  # both processes' guests, named apart by index, left cleanly
        parent.wait_event("VMBus disconnected", 30, partition=f"load-{pid}-{i}")
    done, _ = load("storage", *common, "--json", str(b), "--tag", "b")
    assert done.returncode == 0, done.stdout + done.stderr
    done, _ = load("merge", str(a), str(b), "--json", str(m))
    assert done.returncode == 0, done.stdout + done.stderr
    merged = json.loads(m.read_text())
    total = sum(s["ops"] for s in merged["workloads"]["storage"]["ops"].values())
    assert total == 400 and merged["tags"] == ["a", "b"] and len(merged["runs"]) == 4, (total, merged["tags"])
    other = workdir / "c.json"
    done, _ = load("storage", *[c if c != "randrw" else "randread" for c in common], "--json", str(other))
    assert done.returncode == 0, done.stdout + done.stderr
    done, _ = load("merge", str(a), str(other))
    assert done.returncode == 2 and "a different job (workloads.storage.rw: 'randrw' vs 'randread')" in done.stderr, \
        done.stderr
    assert not [r for r in parent.lines if r.get("level") == "error"], "the parent logged errors"


def test_a_workload_file_mixes_storage_and_network_in_one_run(parent: Parent, workdir: Path) -> None:
    mix = workdir / "mix.toml"
    mix.write_text('warmup = 0\nruntime = 600\n\n'
                   '[[workload]]\nname = "storage"\npartitions = 1\ncount = 50\nrw = "randwrite"\nsize = "16M"\n'
                   'iodepth = 2\n\n'
                   '[[workload]]\nname = "network"\npartitions = 2\ncount = 100\nflows = "pairs"\nframe_size = 128\n')
    out = workdir / "mix.json"
    done, _ = load("mix", str(mix), "--connect", parent.unix, "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert ops_of(out, "storage", "write") == 50 and ops_of(out, "network", "send") == 200
    doc = json.loads(out.read_text())
    assert doc["workloads"]["network"]["extra"]["sent"] == 200
    assert "storage: partitions: 1 ok, 0 failed" in done.stdout and "network: partitions: 2 ok" in done.stdout
    bad = workdir / "bad.toml"
    bad.write_text('[[workload]]\nname = "storage"\nrw = "sideways"\n')
    done, _ = load("mix", str(bad), "--connect", parent.unix)
    assert done.returncode == 2 and "[[workload]] #1 (storage): argument --rw: invalid choice" in done.stderr, \
        done.stderr


@pytest.mark.parametrize(("workload", "device", "direction", "op", "argv"), [
    ("video", "video", "in", "dirt", ["--frame", "rects", "--rects", "3"]),  # a DIRT is one packet to the host
    ("input", "keyboard", "out", "key", ["--events", "keys"]),  # a key event is one packet to the guest
    ("input", "mouse", "out", "mouse", ["--events", "mouse"]),
])
def test_metrics_agree_with_the_video_and_input_workloads(workdir: Path, workload: str, device: str, direction: str,
                                                         op: str, argv: list[str]) -> None:
    """As for storage: between a run of K1 and one of K2 operations, the parent's packet counter for the
    device moves by exactly what the client counted (each run's handshakes cancel out)."""
    parent = Parent(workdir / "p", extra=["--http", "127.0.0.1:0"])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        moved, counted = [], []
        for k in (20, 60):
            before = storage_counters(url, device)
            out = workdir / f"{workload}{k}.json"
            done, pid = load(workload, "--connect", parent.unix, "--http", url, *argv, "--count", str(k),
                             "--warmup", "0", "--runtime", "600", "--processes", "1", "--json", str(out))
            assert done.returncode == 0, done.stdout + done.stderr
            parent.wait_event("VMBus disconnected", 30, partition=f"{workload}-{pid}-0")
            moved.append(storage_counters(url, device)[f"packets_{direction}"] - before[f"packets_{direction}"])
            counted.append(ops_of(out, workload, op))
        assert counted[1] - counted[0] >= 40, f"the client counted {counted} {op} operations for 20 and 60"
        assert moved[1] - moved[0] == counted[1] - counted[0], \
            f"{device} packets {direction}: the parent counted {moved}, the client {counted}"
    finally:
        parent.stop()


def test_churn_cycles_through_the_command_line_leave_nothing_behind(workdir: Path) -> None:
    parent = Parent(workdir / "p", extra=["--http", "127.0.0.1:0"])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        out = workdir / "churn.json"
        done, _ = load("churn", "--connect", parent.unix, "--partitions", "3", "--count", "5", "--warmup", "0",
                       "--runtime", "600", "--processes", "1", "--json", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        assert ops_of(out, "churn", "cycle") == 15 and ops_of(out, "churn", "open") == 15
        deadline, left = time.monotonic() + 30, None
        while left != [] and time.monotonic() < deadline:  # the last UNLOADs may still be in the parent's hands
            left = json.loads(urllib.request.urlopen(f"{url}/api/partitions", timeout=30).read())
            time.sleep(0.1)
        assert left == [], f"partitions left on the parent after the churn: {left}"
    finally:
        parent.stop()


def test_the_every_device_workload_file_runs_clean(workdir: Path) -> None:
    """docs/load-mix-all.toml, as the README gives it: all five workloads at once against one parent."""
    parent = Parent(workdir / "p", extra=["--http", "127.0.0.1:0"])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        out = workdir / "all.json"
        done, _ = load("mix", str(Path(__file__).parents[2] / "docs" / "load-mix-all.toml"), "--connect",
                       parent.unix, "--http", url, "--warmup", "0.2", "--runtime", "2", "--json", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        doc = json.loads(out.read_text())
        quiet = [w for w, res in doc["workloads"].items() if not sum(s["ops"] for s in res["ops"].values())]
        assert set(doc["workloads"]) == {"storage", "network", "video", "input", "churn"} and not quiet, \
            f"workloads {sorted(doc['workloads'])}, without a measured operation: {quiet}"
    finally:
        parent.stop()


def test_the_input_workload_sends_the_api_token_it_is_given(workdir: Path) -> None:
    """A parent whose API needs a token ([http] token_file): ``--http-token-file`` makes the input workload's
    API calls carry it; without it the run fails with the API's one-line refusal."""
    token_file = new_secret_file(workdir / "http.key")
    parent = Parent(workdir / "p", extra=["--http", "127.0.0.1:0", "--http-token-file", str(token_file)])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        common = ["--connect", parent.unix, "--http", url, "--events", "keys", "--count", "10", "--warmup", "0",
                  "--runtime", "600", "--processes", "1"]
        out = workdir / "input.json"
        done, _ = load("input", *common, "--http-token-file", str(token_file), "--json", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        assert ops_of(out, "input", "key") == 10, f"the client counted {ops_of(out, 'input', 'key')} keys, not 10"
        refused, _ = load("input", *common)
        assert refused.returncode == 1 and "HTTP 401" in refused.stdout + refused.stderr, \
            f"without the token: status {refused.returncode}: {refused.stdout + refused.stderr}"
    finally:
        parent.stop()


def test_churn_stops_at_the_parents_first_refusal(workdir: Path) -> None:
    """A parent that takes only authenticated partitions, and a churn run without a secret: each partition
    stops at its first refused connection with the refusal's one line, instead of cycling on."""
    parent = Parent(workdir / "p", extra=["--auth-mode", "required"])
    try:
        done, _ = load("churn", "--connect", parent.unix, "--partitions", "2", "--warmup", "0", "--runtime", "600",
                       "--processes", "1", "--quiet")
        text = done.stdout + done.stderr
        stopped = re.findall(r"stopped: the parent refused it: authentication required", text)
        assert done.returncode == 1 and len(stopped) == 2 and "in a row" not in text, \
            f"status {done.returncode}, expected each of 2 partitions stopped by the refusal: {text}"
    finally:
        parent.stop()
