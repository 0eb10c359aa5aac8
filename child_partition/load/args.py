"""argparse types shared by ``child-partition``'s commands and the load tool's options (checked numbers, fio's
byte counts, output files), so a mistake costs one line on stderr and exit 2."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def parse_size(text: str) -> int:
    """'4k', '1M', '1MiB', '512' -> bytes (binary units, as fio)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def number(kind: Callable[[str], float], low: float, high: float | None = None) -> Callable[[str], float]:
    """argparse type: a number of ``kind`` in [low, high]."""
    def check(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}-{high:g}" if high is not None
                                             else f"{text} must be at least {low:g}")
        return value
    return check


def size(text: str) -> str:
    """argparse type: a byte count as fio writes it (4k, 1M, 512)."""
    try:
        if parse_size(text) <= 0:
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4k, 1M or 512") from None
    return text


def output(text: str) -> str:
    """argparse type: a file that can be written when the run ends."""
    where = Path(text)
    if where.is_dir() or not where.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: not a file in an existing directory")
    return text
