"""A tiny stand-in for the load engine, for the workload tests: a parent with its web API, a recorder, and a
driver that starts partitions through a workload, runs a bounded number of operations on each with several
workers at once, and stops them."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from child_partition.load.workload import Done, LoadOptions, PartitionLoad, Workload

from .conftest import Parent


class Rec:
    """The engine's Recorder: what the workload recorded itself, by operation name."""

    def __init__(self, on_record: Callable[[str], None] | None = None) -> None:
        self.ops: collections.defaultdict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        self.errors: list[tuple[str, str]] = []
        self.on_record = on_record

    def record(self, op: str, usec: int, nbytes: int = 0) -> None:
        assert usec > 0, f"{op}: a latency of {usec} µs"
        self.ops[op].append((usec, nbytes))
        if self.on_record is not None:
            self.on_record(op)

    def error(self, op: str, message: str) -> None:
        self.errors.append((op, message))


class Api:
    """The parent's JSON API, read synchronously (the test's own view, separate from the workload's client)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.load(resp) if resp.headers.get_content_type() == "application/json" else resp.read()

    def names(self) -> set[str]:
        return {p["name"] for p in self.get("/api/partitions")}

    def until(self, pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, f"timed out waiting until {what}"
            time.sleep(0.05)


def parent_with_api(tmp_path: Path) -> Iterator[tuple[Parent, Api]]:
    """A parent serving its web API (a test module's fixture yields from this)."""
    p = Parent(tmp_path / "parent", extra=["--http", "127.0.0.1:0"])
    try:
        yield p, Api(p.wait_event("web console and API listening")["url"])
    finally:
        p.stop()


def build(cls: Any, argv: list[str], parent: Parent, api: Api, prefix: str, partitions: int = 2) -> Workload:
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    options = LoadOptions(connect=parent.unix, http=api.url, partitions=partitions, first_index=0, prefix=prefix,
                          tag="test")
    workload: Workload = cls.from_args(parser.parse_args(argv), options)
    return workload


async def drive(workload: Workload, partitions: int, ops: int, concurrency: int, rec: Rec,
                between: Callable[[list[PartitionLoad]], Any] | None = None, one_at_a_time: bool = False,
                ) -> tuple[list[Done], list[PartitionLoad], dict[str, Any]]:
    """setup, start ``partitions``, ``ops`` operations on each by ``concurrency`` workers (``one_at_a_time``:
    one operation in the whole process at a time, partitions taking turns), ``between`` (a check while the
    partitions are still up), stop, teardown."""
    await workload.setup()
    parts: list[PartitionLoad] = []
    done: list[Done] = []
    try:
        for i in range(partitions):
            parts.append(await workload.start_partition(i))

        async def worker(part: PartitionLoad, budget: list[int]) -> None:
            while budget[0] > 0:
                budget[0] -= 1
                done.append(await part.operation(rec))

        if one_at_a_time:
            for _ in range(ops):
                for part in parts:
                    done.append(await asyncio.wait_for(part.operation(rec), 120))
        else:
            await asyncio.wait_for(asyncio.gather(*(worker(p, b) for p in parts for b in [[ops]]
                                                    for _ in range(concurrency))), 120)
        if between is not None:
            await asyncio.to_thread(between, parts)
    finally:
        await asyncio.gather(*(p.stop() for p in parts))
        extra = await workload.teardown()
    return done, parts, extra


def quiet(parent: Parent) -> None:
    """The parent logged no warning or error."""
    bad = parent.complaints()
    assert not bad, f"the parent complained: {bad[0]}"
