"""Coverage-guided fuzzing with atheris (libFuzzer for Python): ``python -m tests.fuzz --target X``.

    python -m tests.fuzz --list
    python -m tests.fuzz --target control --seconds 60          # one target, one process
    python -m tests.fuzz --target all --seconds 900             # every target in turn, the time shared
    python -m tests.fuzz --target frame --runs 100000 --save    # keep what found new coverage
    python -m tests.fuzz --target frame --replay FILE           # run one input (a crash) and show its error
    python -m tests.fuzz --seed                                 # (re)write the seed corpus from real traffic

A run starts from the stored corpus (tests/fuzz/corpus/<target>/) and works in var/fuzz/<target>/; ``--save``
adds what it found to the stored corpus (libFuzzer keeps only inputs that add coverage).
A crash (an exception outside the target's expected errors) is written to var/fuzz/crashes/<target>/ and
ends the run with exit status 1. One summary line per target: inputs tried, coverage (edges, features),
corpus size, crashes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "var" / "fuzz"
_STATS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")
_DONE = re.compile(r"Done (\d+) runs")


def _fuzz_one(name: str, runs: int | None, seconds: float | None, extra: list[str]) -> None:
    """In this process: instrument the decoders, then hand control to libFuzzer (which exits the process)."""
    import atheris  # noqa: PLC0415  (an optional extra)

    with atheris.instrument_imports(include=["vmbus_proto", "parent_partition.devices.storage.scsi"]):
        from tests.fuzz import seeds  # noqa: PLC0415  (late: after instrumentation, or only when needed)
        if name == "scsi":  # the SCSI target lives in the parent; imported here so that it is instrumented
            import parent_partition.devices.storage.scsi  # noqa: F401, PLC0415
        from tests.fuzz.targets import TARGETS  # noqa: PLC0415  (late: after instrumentation, or only when needed)
    target = TARGETS[name]
    work = WORK / name
    crashes = WORK / "crashes" / name
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], str(work), str(seeds.corpus_dir(name)), f"-max_len={target.max_len}",
            f"-artifact_prefix={crashes}/", "-print_final_stats=1", "-rss_limit_mb=1536", "-timeout=10", *extra]
    if runs is not None:
        args.append(f"-runs={runs}")
    if seconds is not None:
        args.append(f"-max_total_time={max(1, int(seconds))}")
    atheris.Setup(args, target)
    atheris.Fuzz()


def _run_child(name: str, args: argparse.Namespace, seconds: float | None) -> dict[str, object]:
    """Fuzz ``name`` in a child process (libFuzzer owns its process); parse its figures."""
    cmd = [sys.executable, "-m", "tests.fuzz", "--target", name, "--in-process"]
    if args.runs is not None:
        cmd += ["--runs", str(args.runs)]
    if seconds is not None:
        cmd += ["--seconds", str(seconds)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    log = proc.stderr
    (WORK / f"{name}.log").write_text(log)
    stats = _STATS.findall(log)
    done = _DONE.findall(log)
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    tried = int(execs[-1]) if execs else int(done[-1]) if done else int(stats[-1][0]) if stats else 0
    last = stats[-1] if stats else ("0", "0", "0", "0")
    result: dict[str, object] = {
        "target": name, "inputs": tried, "edges": int(last[1]), "features": int(last[2]),
        "corpus": int(last[3]), "seconds": round(time.monotonic() - started, 1),
        "crashed": proc.returncode != 0, "exit": proc.returncode}
    if proc.returncode != 0:
        result["error"] = next((line for line in log.splitlines() if "Error" in line or "Uncaught" in line), "")
    if args.save and proc.returncode == 0:
        _merge(name)
        from tests.fuzz.seeds import corpus_dir  # noqa: PLC0415  (late: after instrumentation, or only when needed)
        result["stored_corpus"] = len(list(corpus_dir(name).iterdir()))
    return result


def _merge(name: str) -> None:
    """Store the working corpus: libFuzzer keeps there only inputs that brought new coverage (and reduces
    them), so each is worth keeping; files above 16 KiB stay out of the repository."""
    from tests.fuzz.seeds import corpus, save  # noqa: PLC0415  (late: after instrumentation, or only when needed)
    have = set(corpus(name))
    for f in sorted((WORK / name).iterdir()):
        data = f.read_bytes()
        if data not in have and len(data) <= 16 * 1024:
            save(name, data, "found")
            have.add(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="all", help="a target name, or all (default)")
    parser.add_argument("--runs", type=int, help="inputs to try (per target)")
    parser.add_argument("--seconds", type=float, help="time to fuzz (shared by all targets with --target all)")
    parser.add_argument("--save", action="store_true", help="merge new coverage into the stored corpus")
    parser.add_argument("--replay", type=Path, help="run one input file through the target and show the outcome")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--seed", action="store_true", help="write the seed corpus from real traffic")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:  # before anything imports the decoders: they must be imported instrumented
        sys.argv = [sys.argv[0]]
        _fuzz_one(args.target, args.runs, args.seconds, [])

    from tests.fuzz.targets import TARGETS  # noqa: PLC0415  (late: after instrumentation, or only when needed)
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:12} {t.doc.split('.')[0].strip()}")
        return 0
    if args.seed:
        from tests.fuzz.seeds import write_corpus  # noqa: PLC0415  (late: after instrumentation, or only when needed)
        for name, n in write_corpus().items():
            print(f"{name:12} {n} seeds")
        return 0
    if args.replay is not None:
        TARGETS[args.target].run(args.replay.read_bytes())  # raises what the input raises, traceback and all
        print("no exception")
        return 0
    names = list(TARGETS) if args.target == "all" else [args.target]
    if any(n not in TARGETS for n in names):
        parser.error(f"unknown target {args.target!r}; --list shows them")
    if args.runs is None and args.seconds is None:
        args.seconds = 60.0 * len(names)
    share = args.seconds / len(names) if args.seconds is not None else None
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:  # one process at a time
        res = _run_child(name, args, share)
        results.append(res)
        print(f"{name:12} inputs={res['inputs']:>9} edges={res['edges']:>5} features={res['features']:>6} "
              f"corpus={res['corpus']:>5} seconds={res['seconds']:>6} "
              + (f"CRASH (exit {res['exit']}): {res.get('error', '')} - log var/fuzz/{name}.log"
                 if res["crashed"] else "crashes=0"), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(r["crashed"] for r in results) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
