"""Per-partition limits and the parent-wide memory budget, sans-IO (time is an argument).

Hyper-V bounds what one partition may cost its host (the VMBus server's per-partition GPADL and channel
caps, OpenVMM vmbus_server's ``MAX_CHANNELS`` and its GPADL limits); a stream transport adds a rate of
control messages. ``TokenBucket`` bounds that rate, ``Strikes`` decides when repeated violations of any
limit end a connection, and ``MemoryBudget`` is the bytes every partition together may make the parent hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """Bytes the parent holds for all partitions together (GPADL page lists): taken when a partition asks
    for more, given back when it lets go."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.capacity

    def take(self, nbytes: int) -> None:
        self.used += nbytes

    def give(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
