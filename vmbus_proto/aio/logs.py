"""structlog set-up shared by both partitions: readable console lines on a terminal, JSON lines elsewhere.

Loggers are bound explicitly per connection (``partition``) and per channel (``relid``): context variables
set in Protocol callbacks do not stay per connection (stock asyncio loses them, uvloop leaks them).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def setup(level: str = "info", stream: TextIO | None = None, json: bool | None = None) -> None:
    out = stream or sys.stderr
    if json is None:
        json = not out.isatty()
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=False),
    ]
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty(), sort_keys=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get(**bind: Any) -> Any:
    return structlog.get_logger().bind(**bind)
