"""The daemon's GC policy (parent_partition/gc_policy.py): collect and freeze once the partitions settle."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable

import structlog

from parent_partition.gc_policy import GcPolicy


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


async def until(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)
    assert pred(), what


async def test_changes_settle_into_one_collect_and_freeze_and_departed_cycles_are_freed_next_time() -> None:
    policy = GcPolicy(structlog.get_logger(), settle=0.05)
    try:
        node = Node()
        ref = weakref.ref(node)
        for _ in range(5):  # a burst of changes: one pass once they stop
            policy.changed()
        await until(lambda: policy.settles == 1, "no collect-and-freeze after the changes settled")
        assert gc.get_freeze_count() > 0, "nothing frozen after the settle"
        del node  # the partition leaves: its state is garbage, but frozen
        gc.collect()
        assert ref() is not None, "a frozen cycle was collected: freeze did not keep it out of full collections"
        policy.changed()
        await until(lambda: policy.settles == 2, "no second pass after the partition left")
        assert ref() is None, "the departed partition's cycle survived the settle's collection"
    finally:
        policy.close()
    assert gc.get_freeze_count() == 0, "close() left objects frozen"


async def test_each_change_restarts_the_settle_timer() -> None:
    policy = GcPolicy(structlog.get_logger(), settle=60.0)
    try:
        policy.changed()
        first = policy._timer
        policy.changed()
        assert first is not None and first.cancelled(), "a change did not postpone the pending pass"
        assert policy._timer is not None and not policy._timer.cancelled(), "no pass pending after a change"
        assert policy.settles == 0
    finally:
        policy.close()
    assert policy._timer is None, "close() left the timer pending"
