"""The load engine with a workload that needs no parent: open-loop latency counted from the intended time (a
stall shows in the percentiles, as coordinated omission would hide), merging results equals one run over
all of them, and the exit statuses (errors 1, usage 2, SIGINT 130)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any, ClassVar

import pytest

from child_partition.load import WORKLOADS
from child_partition.load.command import main
from child_partition.load.report import Results
from child_partition.load.stats import MergeError, OpStats, WorkloadStats
from child_partition.load.workload import Done, LoadOptions, OpError, Recorder

from .loadrun import run

STALL_AT, STALL = 10, 0.5  # the 11th operation of a partition takes half a second


class Ticker:
    """A partition whose operation completes at once, except the one that stalls, or fails every ``fail``."""

    def __init__(self, name: str, fail: int, interrupt_at: int | None) -> None:
        self.name, self.fail, self.interrupt_at, self.n = name, fail, interrupt_at, 0

    async def operation(self, rec: Recorder) -> Done:
        self.n += 1
        if self.n == STALL_AT + 1:
            await asyncio.sleep(STALL)
        if self.interrupt_at is not None and self.n == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0)
        if self.fail and self.n % self.fail == 0:
            raise OpError("tick", f"tick {self.n} failed on purpose")
        return Done("tick", 100)

    async def stop(self) -> None:
        return None


class FakeWorkload:
    name: ClassVar[str] = "fake"
    description: ClassVar[str] = "operations that need no parent"

    def __init__(self, options: LoadOptions, fail: int, interrupt_at: int | None) -> None:
        self.options, self.fail, self.interrupt_at = options, fail, interrupt_at

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fail", type=int, default=0, help="every N-th operation fails")
        parser.add_argument("--interrupt-at", type=int, help="SIGINT this process at that operation")

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: LoadOptions) -> FakeWorkload:
        return cls(options, args.fail, args.interrupt_at)

    async def setup(self) -> None:
        return None

    async def start_partition(self, index: int) -> Ticker:
        return Ticker(f"{self.options.prefix}-{index}", self.fail, self.interrupt_at)

    async def teardown(self) -> dict[str, Any]:
        return {"partitions_seen": self.options.partitions}


def test_open_loop_latency_counts_from_the_intended_time_so_a_stall_shows() -> None:
    # 100 ops due every 10 ms; op 10 stalls 0.5 s, so ops 11..58 are sent late and wait for it: from their
    # intended time, 26 of them (11..35) waited at least 0.25 s. A closed loop would see one slow op.
    res = run(FakeWorkload, ["--rate", "100", "--count", "100", "--warmup", "0", "--runtime", "600"])
    tick = res.workloads["fake"].ops["tick"]
    h = tick.histogram()
    assert tick.ops == 100 and tick.errors == 0, (tick.ops, tick.messages)
    assert h.get_max_value() >= STALL * 1e6 * 0.999, f"max {h.get_max_value()} µs hides the {STALL}s stall"
    assert h.get_value_at_percentile(99) >= 250_000 and h.get_value_at_percentile(90) >= 250_000, \
        f"p90 {h.get_value_at_percentile(90)} µs, p99 {h.get_value_at_percentile(99)} µs: the stall is hidden"
    assert tick.late >= 40, f"only {tick.late} operations counted as sent late"


def test_closed_loop_counts_every_operation_and_the_warmup_is_not_measured() -> None:
    res = run(FakeWorkload, ["--count", "50", "--concurrency", "4", "--partitions", "3", "--warmup", "0",
                             "--runtime", "600"])
    w = res.workloads["fake"]
    assert (w.ops["tick"].ops, w.partitions, w.partitions_ok) == (150, 3, 3)
    assert w.ops["tick"].bytes == 150 * 100 and w.extra == {"partitions_seen": 3}
    assert w.ops["tick"].late == 0, "a closed loop has no intended times to be late for"


def _stats(values: list[int]) -> OpStats:
    s = OpStats()
    for v in values:
        s.record(v, 10)
    return s


def _results(values: list[int], window: tuple[float, float], tag: str) -> Results:
    w = WorkloadStats(name="fake", partitions=1, partitions_ok=1, ops={"tick": _stats(values)},
                      extra={"n": len(values), "rows": [tag]})
    run_ = {"tag": tag, "host": tag, "pid": 1, "start": window[0], "end": window[1], "window": list(window)}
    return Results(job={"workloads": {"fake": {"rate": None}}}, workloads={"fake": w}, runs=[run_], tag=tag)


def test_merging_two_results_equals_one_run_over_both() -> None:
    a, b = [5, 7, 100, 3000, 3001], [1, 2_000_000, 64, 64]
    first = Results.from_json(json.loads(json.dumps(_results(a, (0.0, 1.0), "a").to_json())), "a.json")
    second = Results.from_json(json.loads(json.dumps(_results(b, (1.0, 2.0), "b").to_json())), "b.json")
    first.merge(second)
    merged = first.to_json()["workloads"]["fake"]
    one = _results(a + b, (0.0, 2.0), "a").to_json()["workloads"]["fake"]
    m_tick, o_tick = merged["ops"]["tick"], one["ops"]["tick"]
    assert m_tick.pop("histogram") and o_tick.pop("histogram")
    assert m_tick == o_tick, f"merged {m_tick}\n one run {o_tick}"
    assert merged["extra"] == {"n": 9, "rows": ["a", "b"]} and merged["partitions"] == 2
    assert first.seconds == 2.0 and first.to_json()["tags"] == ["a", "b"]


def test_merge_refuses_results_of_another_job() -> None:
    a = _results([1], (0.0, 1.0), "a")
    other = _results([1], (0.0, 1.0), "b")
    other.job = {"workloads": {"fake": {"rate": 100.0}}}
    with pytest.raises(MergeError, match="different job"):
        a.merge(other, "b.json")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(WORKLOADS, "fake", "tests.unit.test_load_engine:FakeWorkload")
    return tmp_path


def _main(tmp: Path, name: str, *argv: str) -> tuple[int, dict[str, Any]]:
    out = tmp / f"{name}.json"
    code = main(["fake", "--connect", "unix:/nowhere", "--processes", "1", "--warmup", "0", "--runtime", "600",
                 "--quiet", "--json", str(out), *argv])
    return code, json.loads(out.read_text())


def test_exit_status_is_0_clean_1_on_errors_2_on_usage_and_130_on_sigint(fake: Path) -> None:
    code, doc = _main(fake, "clean", "--count", "20")
    assert code == 0 and doc["errors"] == [], doc["errors"]
    code, doc = _main(fake, "errors", "--count", "20", "--fail", "5")
    tick = doc["workloads"]["fake"]["ops"]["tick"]
    assert code == 1 and tick["errors"] == 4 and tick["ops"] == 16, (code, tick)
    assert "tick 5 failed on purpose" in doc["errors"][0], doc["errors"]
    with pytest.raises(SystemExit) as usage:
        main(["fake", "--connect", "unix:/nowhere", "--rate", "0"])
    assert usage.value.code == 2
    code, doc = _main(fake, "interrupted", "--interrupt-at", "30")
    assert code == 130 and doc["interrupted"] == "SIGINT" and doc["seconds"] < 600, (code, doc["interrupted"])
    assert doc["workloads"]["fake"]["ops"]["tick"]["ops"] >= 29


def test_merge_command_merges_files_and_refuses_other_jobs(fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _main(fake, "a", "--count", "30", "--tag", "a")
    _main(fake, "b", "--count", "30", "--tag", "b")
    assert main(["merge", str(fake / "a.json"), str(fake / "b.json"), "--json", str(fake / "m.json")]) == 0
    m = json.loads((fake / "m.json").read_text())
    assert m["workloads"]["fake"]["ops"]["tick"]["ops"] == 60 and m["tags"] == ["a", "b"]
    assert "fake      tick" in capsys.readouterr().out
    _main(fake, "c", "--count", "30", "--concurrency", "2")
    assert main(["merge", str(fake / "a.json"), str(fake / "c.json")]) == 2
    assert "a different job (workloads.fake.concurrency: 1 vs 2)" in capsys.readouterr().err
