"""Per-partition limits and the parent-wide memory budget, sans-IO (time is an argument).

Hyper-V bounds what one partition may cost its host (the VMBus server's per-partition GPADL and channel
caps, OpenVMM vmbus_server's ``MAX_CHANNELS`` and its GPADL limits); a stream transport adds a rate of
control messages. ``TokenBucket`` bounds that rate, ``Strikes`` decides when repeated violations of any
limit end a connection, ``MemoryBudget`` is the bytes every partition together may make the parent hold, and
``PartitionBytes`` is one partition's share of it: every byte charged to a partition is charged to both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Budget(Protocol):
    """What the VMBus core charges GPADL page lists to: the parent's budget or one partition's bytes."""

    @property
    def used(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    def fits(self, nbytes: int) -> bool: ...

    def take(self, nbytes: int) -> None: ...

    def give(self, nbytes: int) -> None: ...

    def refusal(self, nbytes: int) -> str: ...


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; full at the start."""

    rate: float
    burst: float
    tokens: float = -1.0
    last: float | None = None

    def take(self, now: float) -> bool:
        """One token if there is one (a control message may go through)."""
        if self.last is None:
            self.tokens, self.last = self.burst, now
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(slots=True)
class Strikes:
    """Limit violations of one connection: ``limit`` of them within ``window`` seconds is abuse."""

    limit: int
    window: float
    times: list[float] = field(default_factory=list)

    def strike(self, now: float) -> bool:
        """Count one violation at ``now``; True when this one makes ``limit`` within the window."""
        self.times = [t for t in self.times if now - t < self.window]
        self.times.append(now)
        return len(self.times) >= self.limit


class MemoryBudget:
    """Bytes the parent holds for all partitions together (GPADL page lists, shadow guest pages, output a
    partition has not read): taken when a partition asks for more, given back when it lets go."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.capacity

    def take(self, nbytes: int) -> None:
        self.used += nbytes

    def give(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)

    def refusal(self, nbytes: int) -> str:
        """Why ``nbytes`` more do not fit (a log line and a drop reason)."""
        return f"the parent's memory budget ({self.used} of {self.capacity} bytes in use) is spent"


GPADL, SHADOW, OUTPUT = "gpadl", "shadow", "output"  # what a partition's bytes are (PartitionBytes.by_kind)


class PartitionBytes:
    """What the parent holds on one partition's behalf, by kind, capped at ``cap`` and charged to the
    parent-wide ``budget`` too. It has ``MemoryBudget``'s face, so the VMBus core charges a connection's
    GPADL page lists to it as it would to the budget (``kind`` defaults to GPADL)."""

    __slots__ = ("budget", "by_kind", "cap", "used")

    def __init__(self, cap: int, budget: MemoryBudget) -> None:
        self.cap = cap
        self.budget = budget
        self.by_kind = {GPADL: 0, SHADOW: 0, OUTPUT: 0}
        self.used = 0

    @property
    def capacity(self) -> int:
        return self.cap

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit both this partition's cap and the parent-wide budget."""
        return self.used + nbytes <= self.cap and self.budget.fits(nbytes)

    def take(self, nbytes: int, kind: str = GPADL) -> None:
        self.by_kind[kind] += nbytes
        self.used += nbytes
        self.budget.take(nbytes)

    def give(self, nbytes: int, kind: str = GPADL) -> None:
        nbytes = min(nbytes, self.by_kind[kind])
        self.by_kind[kind] -= nbytes
        self.used -= nbytes
        self.budget.give(nbytes)

    def set(self, kind: str, nbytes: int) -> None:
        """``kind`` is now ``nbytes`` (output waiting to be read is sampled, not counted piece by piece)."""
        delta = nbytes - self.by_kind[kind]
        if delta > 0:
            self.take(delta, kind)
        elif delta < 0:
            self.give(-delta, kind)

    @property
    def over(self) -> bool:
        """This partition holds more than its cap, or the parent more than its budget."""
        return self.used > self.cap or self.budget.used > self.budget.capacity

    def refusal(self, nbytes: int) -> str:
        """Why ``nbytes`` more do not fit: this partition's cap or the parent's budget."""
        if self.used + nbytes > self.cap:
            return f"the partition's byte budget ({self.used} of {self.cap} bytes in use) is spent"
        return self.budget.refusal(nbytes)

    def release(self) -> None:
        """The partition is gone: everything it held goes back to the budget."""
        for kind, n in self.by_kind.items():
            self.give(n, kind)
