"""structlog set-up shared by both partitions: readable console lines by default (what ``make demo`` and
``docker compose logs`` show), JSON lines on request (``--json-logs``, or ``VMBUS_LOG_FORMAT=json`` in the
environment) for tools that parse them.

Colours only on a terminal: a container's log or a file gets plain text. Loggers are bound explicitly per
connection (``partition``) and per channel (``relid``): context variables set in Protocol callbacks do not
stay per connection (stock asyncio loses them, uvloop leaks them).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

import structlog

#: The environment variable that picks the format when no flag does: ``json`` or ``console``.
FORMAT_ENV = "VMBUS_LOG_FORMAT"
FORMATS = ("console", "json")
#: Partitions named so are health probes (``child-partition probe``, a container healthcheck every few
#: seconds): their connection's info lines are dropped unless the level is debug; warnings and errors stay.
PROBE_PREFIX = "probe-"
#: Warnings and errors per peer (its ``partition``, or ``peer`` before HELLO): a burst, then a rate a second.
#: A peer's junk can't fill the disk: what is dropped is counted, and the count goes out with that peer's next
#: line that is written (``suppressed=N``), such as the one that says its connection ended.
#: A logger bound with this key (a connection's own id) is limited per connection instead.
LIMIT_KEY = "_limit"
LIMIT_BURST = 20
LIMIT_RATE = 5.0


class LogFormatError(ValueError):
    """``VMBUS_LOG_FORMAT`` names no format."""


def wants_json(json: bool | None = None) -> bool:
    """JSON when asked (``json=True``, the ``--json-logs`` flag), else what ``VMBUS_LOG_FORMAT`` says, else the
    console format. Raises LogFormatError for a value of the variable that names no format."""
    if json is not None:
        return json
    chosen = os.environ.get(FORMAT_ENV, "").strip().lower() or "console"
    if chosen not in FORMATS:
        raise LogFormatError(f"{FORMAT_ENV}={os.environ[FORMAT_ENV]!r}: must be one of {', '.join(FORMATS)}")
    return chosen == "json"


def setup(level: str = "info", stream: TextIO | None = None, json: bool | None = None) -> None:
    """Configure structlog. ``json``: True forces JSON lines, False the console format, None asks
    :func:`wants_json` (the environment, then the console format)."""
    out = stream or sys.stderr
    processors: list[Any] = [
        structlog.processors.add_log_level,
        _quiet_probes if level.lower() != "debug" else _unmark_probes,
        PeerLimiter(),
        structlog.processors.TimeStamper(fmt="iso", utc=False),
    ]
    if wants_json(json):
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty(), sort_keys=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


class PeerLimiter:
    """A token bucket per peer for its warnings and errors (a structlog processor)."""

    MAX_PEERS = 10_000  # beyond this, peers with a full bucket and nothing held back are forgotten

    def __init__(self, burst: int = LIMIT_BURST, rate: float = LIMIT_RATE) -> None:
        self.burst, self.rate = float(burst), rate
        self.peers: dict[str, list[float]] = {}  # key -> [tokens, last refill (monotonic), suppressed]

    def __call__(self, _logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        key = event.pop(LIMIT_KEY, None) or event.get("partition") or event.get("peer")
        if key is None:
            return event
        now = time.monotonic()
        state = self.peers.get(str(key))
        if state is None:
            if len(self.peers) >= self.MAX_PEERS:
                self._forget(now)
            state = self.peers[str(key)] = [self.burst, now, 0.0]
        tokens = min(self.burst, state[0] + (now - state[1]) * self.rate)
        state[1] = now
        if event.get("level") in ("warning", "error"):
            if tokens < 1:
                state[0], state[2] = tokens, state[2] + 1
                raise structlog.DropEvent
            tokens -= 1
        state[0] = tokens
        if state[2]:
            event["suppressed"] = int(state[2])
            state[2] = 0
        return event

    def _forget(self, now: float) -> None:
        for key, (tokens, last, held) in list(self.peers.items()):
            if not held and tokens + (now - last) * self.rate >= self.burst:
                del self.peers[key]


def _quiet_probes(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.pop("probe", False) and event.get("level") in ("debug", "info"):
        raise structlog.DropEvent
    return event


def _unmark_probes(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.pop("probe", None)
    return event


def get(**bind: Any) -> Any:
    return structlog.get_logger().bind(**bind)
