"""The ``child-partition load`` command line: a subcommand per workload in ``WORKLOADS`` (its own options plus
the engine's common ones), ``mix FILE`` (several workloads in one run, from a TOML file) and ``merge`` (results
of several processes or machines, merged from their HDR histograms)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vmbus_proto.aio.cli import EXIT_USAGE, ArgumentParser, add_version

from . import WORKLOADS
from .args import output
from .engine import PROG, UsageError, add_common, entry_from, execute, load_class, merge_files, spec_from
from .stats import MergeError

DESCRIPTION = """\
Generate load on a parent's devices from many partitions (guests), each a real VMBus connection, in this
process or split across --processes. Closed loop by default; --rate for an open loop whose latency counts from
each operation's intended time. Results: a summary table (and fio-style details where a workload has them),
--json for the same numbers with mergeable HDR histograms, 'merge' to combine runs of several machines."""

EPILOG = """\
exit status: 0 when every partition ran without an error; 1 when an operation or a partition failed; 2 for a
mistake in the arguments or the workload file; 130 or 143 when SIGINT or SIGTERM ended the run (the results
so far are reported)."""

MIX_HELP = """\
Several workloads in one run, from a TOML file: one [[workload]] table each, with name = "storage" (or
network, video, input, churn), its partitions, concurrency, rate and count, and the workload's own options by
their long names (rw = "randread", frame_size = 128). Top-level keys runtime, warmup, connect and http set
those options unless the command line does. Example: docs/load-mix.toml."""


def available() -> tuple[dict[str, Any], dict[str, str]]:
    """The workload classes that import, and why the others do not."""
    classes, missing = {}, {}
    for name, target in WORKLOADS.items():
        try:
            classes[name] = load_class(target)
        except (ImportError, AttributeError) as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
    return classes, missing


def build_parser(classes: dict[str, Any], missing: dict[str, str]) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    add_version(p)
    sub = p.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for name, cls in classes.items():
        w = sub.add_parser(name, help=cls.description.splitlines()[0], description=cls.description, epilog=EPILOG)
        add_version(w)
        cls.add_arguments(w)
        add_common(w, cls)
    for name, why in missing.items():
        w = sub.add_parser(name, help=f"(not in this build: {why})", add_help=False)
        w.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    mix = sub.add_parser("mix", help="several workloads in one run, from a TOML workload file",
                         description=MIX_HELP, epilog=EPILOG)
    add_version(mix)
    mix.add_argument("file", metavar="FILE", help="the workload file (TOML)")
    add_common(mix, None, per_workload=False)
    merge = sub.add_parser("merge", help="merge results files (--json) of several processes or machines",
                           description="Merge the results of runs of the same job on several machines: counts add "
                                       "up, latency percentiles come from the merged HDR histograms, rates are over "
                                       "the union of the runs' measured windows.")
    add_version(merge)
    merge.add_argument("files", nargs="+", metavar="FILE", help="results files written with --json")
    merge.add_argument("--json", metavar="FILE", type=output, help="write the merged results to FILE")
    merge.add_argument("--quiet", action="store_true", help="no summary table")
    return p


def main(argv: list[str]) -> int:
    """``child-partition load ARGV``: the exit status."""
    classes, missing = available()
    parser = build_parser(classes, missing)
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.workload}"
    if args.workload in missing:
        print(f"{prog}: error: the {args.workload} workload is not in this build ({missing[args.workload]})",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.workload == "merge":
            return _merge(args, classes)
        if args.workload == "mix":
            from .mix import entries_from_file  # noqa: PLC0415

            entries = entries_from_file(args, classes)
        else:
            entries = [entry_from(args.workload, classes[args.workload], args)]
        spec = spec_from(args, entries)
    except (UsageError, MergeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return execute(spec, argv)


def _merge(args: argparse.Namespace, classes: dict[str, Any]) -> int:
    results = merge_files(args.files)
    doc = results.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if not args.quiet:
        from rich.console import Console  # noqa: PLC0415

        from .report import summary  # noqa: PLC0415

        render = {key: classes[w["workload"]].render for key, w in doc["workloads"].items()
                  if w["workload"] in classes and hasattr(classes[w["workload"]], "render")}
        summary(doc, Console(highlight=False, width=None if sys.stdout.isatty() else 140), render)
    return 1 if results.failed else 0
