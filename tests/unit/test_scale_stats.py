"""The scale benchmark's arithmetic (bench/scale_stats.py): merged HDR histograms, the verdict, the step search."""

from __future__ import annotations

import random

import pytest

from bench.scale_stats import KINDS, LAG, Latencies, StepSearch, ladder, merge, summarize, verdict, worst_p99


def test_merge_gives_the_percentiles_of_all_samples_not_an_average() -> None:
    # Worker A is fast (1 ms), worker B has a slow tail (50 ms for 3 of its 100 samples).
    a, b = Latencies(), Latencies()
    for _ in range(900):
        a.record("ping", 1000)
    for i in range(100):
        b.record("ping", 50_000 if i < 3 else 1000)
    merged = summarize(merge([a.encode(), b.encode()]))["ping"]
    assert merged["count"] == 1000, merged
    # 3 slow of 1,000 is 0.3%: p99 stays at 1 ms, max is 50 ms (averaging per-worker p99s would give ~25 ms).
    assert merged["p99_ms"] == pytest.approx(1.0, rel=0.01), merged
    assert merged["max_ms"] == pytest.approx(50.0, rel=0.01), merged
    b2 = Latencies()
    for _ in range(20):
        b2.record("ping", 50_000)
    tail = summarize(merge([a.encode(), b2.encode()]))["ping"]
    assert tail["p99_ms"] == pytest.approx(50.0, rel=0.01), f"2% slow samples must set p99: {tail}"


def test_merge_keeps_kinds_apart_and_matches_one_histogram() -> None:
    rng = random.Random(7)
    parts = [Latencies() for _ in range(4)]
    whole = Latencies()
    for _ in range(4000):
        kind, us = rng.choice(KINDS), rng.randint(50, 20_000)
        rng.choice(parts).record(kind, us)
        whole.record(kind, us)
    merged = summarize(merge(p.encode() for p in parts))
    assert merged == summarize(whole.hists), "merging encoded histograms must equal recording into one"


def test_out_of_range_values_are_clipped_not_raised() -> None:
    lat = Latencies()
    lat.record("video", 0)
    lat.record("video", 10**12)
    s = summarize(lat.hists)["video"]
    assert s["count"] == 2 and s["max_ms"] >= 59_000, s


def test_verdict() -> None:
    fine = {k: {"count": 10, "p99_ms": 3.0} for k in KINDS} | {LAG: {"count": 10, "p99_ms": 500.0}}
    assert verdict(0, fine, 10.0, required=KINDS)[0], "the worker's own lag must not fail the parent"
    assert verdict(1, fine, 10.0) == (False, "1 errors")
    slow = fine | {"ping": {"count": 10, "p99_ms": 10.0}}
    held, why = verdict(0, slow, 10.0)
    assert not held and "ping" in why, why
    assert worst_p99(slow) == ("ping", 10.0)
    missing = {k: v for k, v in fine.items() if k != "video"}
    assert verdict(0, missing, 10.0, required=KINDS) == (False, "no samples of video")
    assert verdict(0, slow, float("inf"), required=KINDS)[0], "an infinite bound only counts errors"


def test_ladder() -> None:
    assert ladder(125, 1000) == [125, 250, 500, 1000]
    assert ladder(100, 800) == [100, 200, 400, 800]
    assert ladder(1, 1, [500, 100, 250, 100]) == [1]  # given steps above the limit are dropped
    assert ladder(1, 1000, [500, 100, 250, 100, 5000]) == [100, 250, 500]


def run_search(search: StepSearch, capacity: int) -> list[int]:
    tried = []
    for _ in range(100):  # bounded: a search that never ends fails here
        load = search.next()
        if load is None:
            return tried
        tried.append(load)
        search.record(load, load <= capacity)
    raise AssertionError(f"search did not end: {tried}")


def test_search_stops_at_the_first_failure() -> None:
    s = StepSearch([100, 250, 500, 1000, 2000])
    assert run_search(s, capacity=600) == [100, 250, 500, 1000]
    assert (s.best, s.first_failure) == (500, 1000)


def test_search_bisects_between_last_pass_and_first_failure() -> None:
    s = StepSearch([100, 250, 500, 1000], bisect=5, resolution=50)
    tried = run_search(s, capacity=600)
    assert tried[:4] == [100, 250, 500, 1000]
    assert tried[4:] == [750, 625, 562, 593], tried  # midpoints until the gap is within the resolution
    assert (s.best, s.first_failure) == (593, 625)


def test_search_with_every_step_passing_or_failing() -> None:
    s = StepSearch([10, 20], bisect=3)
    assert run_search(s, capacity=10**6) == [10, 20] and s.best == 20 and s.first_failure is None
    s = StepSearch([10, 20], bisect=3, resolution=1)
    assert run_search(s, capacity=0) == [10, 5, 2, 1] and s.best is None
