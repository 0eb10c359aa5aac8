"""What worker processes of one parent share in memory: the connection count and the memory budget.

A multi-process server's shared scoreboard (Apache httpd's ``scoreboard``, nginx's shared-memory zones): one
small mmap'd block, one slot per worker, each slot written only by its worker. Decisions that must hold for
the whole parent (``[parent] max_partitions``, ``[limits] memory_budget``) read every slot and write their
own under a POSIX record lock (``fcntl.lockf``: per process, so inherited descriptors still exclude each
other), which makes them race-free; plain reads for reports take no lock.

The budget is handed out in reservations: a worker reserves a grain more than it needs and then takes and
gives bytes without a lock until it needs more, so the lock is taken about once per grain, never per page;
the reservations of all workers never pass the budget, so neither can the bytes held.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from vmbus_proto.limits import MemoryBudget

SLOT = struct.Struct("<qqq")  # connections, budget bytes reserved, budget bytes used
GRAIN = 1 << 20  # the most a worker reserves beyond what it needs


class SharedState:
    """The scoreboard of ``workers`` worker processes, in a memfd the supervisor makes and the workers
    inherit (``fd``)."""

    def __init__(self, workers: int, fd: int | None = None) -> None:
        self.workers = workers
        size = max(mmap.PAGESIZE, SLOT.size * workers)
        if fd is None:
            fd = os.memfd_create("vmbus-workers", 0)
            os.ftruncate(fd, size)
        self.fd = fd
        self.map = mmap.mmap(fd, size)

    @contextmanager
    def locked(self) -> Iterator[None]:
        os.lseek(self.fd, 0, os.SEEK_SET)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def slot(self, worker: int) -> tuple[int, int, int]:
        return SLOT.unpack_from(self.map, worker * SLOT.size)

    def set_slot(self, worker: int, connections: int, reserved: int, used: int) -> None:
        SLOT.pack_into(self.map, worker * SLOT.size, connections, reserved, used)

    def total(self, field: int, but: int = -1) -> int:
        """The sum of one field (0 connections, 1 reserved, 2 used) over every worker but ``but``."""
        return sum(self.slot(w)[field] for w in range(self.workers) if w != but)

    def clear(self, worker: int) -> None:
        """A worker died: what it held is free again (its partitions are gone with it)."""
        with self.locked():
            self.set_slot(worker, 0, 0, 0)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class WorkerSlot:
    """One worker's slot: its connection count and its share of the budget (``budget``)."""

    def __init__(self, state: SharedState, worker: int, capacity: int) -> None:
        self.state = state
        self.worker = worker
        self.connections = 0
        self.budget = SharedBudget(self, capacity)
        state.clear(worker)

    def publish(self) -> None:
        b = self.budget
        self.state.set_slot(self.worker, self.connections, b.reserved, b.local_used)

    def room_for_connection(self, local: int, limit: int) -> bool:
        """Whether one more connection fits ``limit`` over every worker; if so it is counted already."""
        with self.state.locked():
            if self.state.total(0, but=self.worker) + local >= limit:
                return False
            self.connections = local + 1
            self.publish()
        return True

    def connections_now(self, local: int) -> None:
        self.connections = local
        self.publish()


class SharedBudget(MemoryBudget):
    """``[limits] memory_budget`` for the whole parent, seen from one worker: ``used`` is every worker's."""

    def __init__(self, slot: WorkerSlot, capacity: int) -> None:
        self.capacity = capacity
        self.slot = slot
        self.reserved = 0
        self.local_used = 0
        self.overdrawn = False
        self.grain = max(4096, min(GRAIN, capacity // (16 * slot.state.workers)) // 4096 * 4096)

    @property
    def used(self) -> int:
        return self.slot.state.total(2, but=self.slot.worker) + self.local_used

    @used.setter
    def used(self, value: int) -> None:
        self.local_used = value

    def fits(self, nbytes: int) -> bool:
        need = self.local_used + nbytes
        if need <= self.reserved and not self.overdrawn:
            return True
        state = self.slot.state
        with state.locked():
            free = self.capacity - state.total(1, but=self.slot.worker)
            if need > free:
                return False
            self.reserved = min(free, need + self.grain)
            self.slot.publish()
        return True

    def take(self, nbytes: int) -> None:
        self.local_used += nbytes
        if self.local_used > self.reserved:  # taken without asking (output waiting to be read): reserve it
            self._rebalance()
        self.slot.publish()

    def give(self, nbytes: int) -> None:
        self.local_used = max(0, self.local_used - nbytes)
        if self.overdrawn or self.reserved - self.local_used > 2 * self.grain:
            self._rebalance()  # hand back what this worker no longer needs, and any overdraft first
        self.slot.publish()

    def _rebalance(self) -> None:
        """Reserve what is used and a grain more, within what the others leave; more than that (output taken
        without asking) is an overdraft, given back as soon as the bytes are."""
        with self.slot.state.locked():
            free = self.capacity - self.slot.state.total(1, but=self.slot.worker)
            self.reserved = max(self.local_used, min(free, self.local_used + self.grain))
            self.overdrawn = self.reserved > free
