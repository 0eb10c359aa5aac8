"""Keep the partitions' long-lived state out of CPython's full garbage collections.

What a long-running server does after its start-up (CPython's ``gc.freeze``, "to avoid ... a full collection
... in a long-running process"): every connected partition holds thousands of objects (its connection, rings,
channels, device state) that live as long as it does. CPython's oldest-generation collection scans all of them
each time, and it runs whenever the objects that survived younger collections grew by a quarter: with 250
partitions such a pass stopped the event loop for 100-200 ms, with 500 for about twice that, and every
partition's requests waited behind it (the scale benchmark, ``bench/scale_search.py``).

The policy: when the set of partitions or channels changes (a partition connects or leaves, a channel opens),
wait until it has been still for ``settle`` seconds, then collect once (what the changes left as garbage,
departed partitions included) and freeze what survives, so later collections only look at objects made since.
While partitions keep coming and going, nothing is frozen and the collector runs as usual. Each settle
unfreezes first, so a departed partition's cycles are found by that collection and nothing stays frozen that
is garbage for longer than one settle.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

SETTLE_S = 2.0


class GcPolicy:
    def __init__(self, log: Any, settle: float = SETTLE_S) -> None:
        self.log = log
        self.settle = settle
        self.settles = 0  # collect-and-freeze passes done
        self._timer: asyncio.TimerHandle | None = None

    def changed(self) -> None:
        """A partition or channel came or went: (re)start the settle timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.settle, self._settled)

    def _settled(self) -> None:
        self._timer = None
        t0 = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.settles += 1
        self.log.debug("partition state settled: collected and frozen", collected=collected,
                       frozen=gc.get_freeze_count(), ms=round((time.perf_counter() - t0) * 1000, 1))

    def close(self) -> None:
        """Stop the timer and give the frozen objects back to the collector (the daemon is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gc.unfreeze()
