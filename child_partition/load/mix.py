"""``child-partition load mix FILE``: several workloads in one run, described in a TOML file (read with
tomllib), in the manner of fio's job files: one ``[[workload]]`` table per workload with its own options,
one measured window and one results document for all of them.

Each table's keys are the workload's long option names (``rw``, ``frame_size`` or ``frame-size``) plus
``partitions``, ``concurrency``, ``rate`` and ``count``, and ``label`` (its name in the results when one kind
of workload appears twice). They are checked exactly as the command line checks them, so a mistake names
the table and the option in one line.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .args import number
from .engine import (
    DEFAULT_HTTP,
    DEFAULT_RUNTIME,
    DEFAULT_WARMUP,
    Entry,
    UsageError,
    add_common,
    entry_from,
)

TOP_LEVEL: dict[str, Callable[[str], Any]] = {"runtime": number(float, 0.1), "warmup": number(float, 0),
                                              "connect": str, "http": str}
ENTRY_KEYS = {"name", "label"}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are raised, to be reported with the table they come from."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def entries_from_file(args: argparse.Namespace, classes: dict[str, Any]) -> list[Entry]:
    """Read ``args.file``, fill the run-level options the command line left unset, and return the entries."""
    where = args.file
    try:
        doc = tomllib.loads(Path(where).read_text())
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: not TOML: {exc}") from None
    for key, value in doc.items():
        if key == "workload":
            continue
        if key not in TOP_LEVEL:
            raise UsageError(f"{where}: {key}: unknown setting (top-level settings: {', '.join(TOP_LEVEL)}; "
                             f"workloads go in [[workload]] tables)")
        if getattr(args, key) is None:
            try:
                setattr(args, key, TOP_LEVEL[key](str(value)))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"{where}: {key}: {exc}") from None
    args.runtime = DEFAULT_RUNTIME if args.runtime is None else args.runtime
    args.warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    args.http = args.http or DEFAULT_HTTP
    if args.connect is None:
        raise UsageError(f"no parent to connect to: give --connect URL, or connect = \"URL\" in {where}")
    tables = doc.get("workload")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"{where}: no [[workload]] tables (each names a workload: name = \"storage\")")
    entries, keys = [], set()
    for k, table in enumerate(tables, 1):
        entry = _entry(table, classes, f"{where}: [[workload]] #{k}")
        if entry.key in keys:
            raise UsageError(f"{where}: [[workload]] #{k}: a second {entry.key!r}: give each a label = \"...\"")
        keys.add(entry.key)
        entries.append(entry)
    return entries


def _entry(table: dict[str, Any], classes: dict[str, Any], where: str) -> Entry:
    name = table.get("name")
    if not isinstance(name, str) or name not in classes:
        raise UsageError(f"{where}: name = {name!r}: not a workload of this build ({', '.join(classes)})")
    cls = classes[name]
    label = table.get("label", name)
    if not isinstance(label, str) or not label:
        raise UsageError(f"{where}: label must be a non-empty string")
    parser = _Parser(prog=name, add_help=False)
    cls.add_arguments(parser)
    add_common(parser, cls, run_level=False)
    argv = []
    for key, value in table.items():
        if key in ENTRY_KEYS:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            continue
        for v in value if isinstance(value, list) else [value]:
            argv += [flag, str(v)]
    try:
        parsed, unknown = parser.parse_known_args(argv)
    except UsageError as exc:
        raise UsageError(f"{where} ({name}): {exc}") from None
    if unknown:
        raise UsageError(f"{where} ({name}): {unknown[0].removeprefix('--').replace('-', '_')}: unknown setting")
    return entry_from(label, cls, parsed)
