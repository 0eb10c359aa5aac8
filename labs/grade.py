"""``make grade LAB=N [SOLUTION=1]``: run lab N's grader over its ``starter/`` (or ``solution/``) and print a
score per step and the total, as MIT 6.1810's ``make grade`` does. Exit status 0 only for full marks.

    python -m labs.grade 2               # the student's starter/
    python -m labs.grade 2 --solution    # the reference solution
    python -m labs.grade 2 --json        # one JSON object (what CI reads)
    python -m labs.grade --list          # the labs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from labs.harness import LABS, REPO, Context, Failed, Lab, import_file


@dataclass
class Result:
    step: str
    points: int
    earned: int
    seconds: float
    message: str = ""


def lab_dirs() -> dict[int, Path]:
    return {int(d.name[:2]): d for d in sorted(LABS.iterdir()) if d.is_dir() and d.name[:2].isdigit()}


def load_lab(number: int) -> tuple[Lab, Path]:
    dirs = lab_dirs()
    if number not in dirs:
        raise SystemExit(f"no lab {number}: the labs are {', '.join(str(n) for n in dirs)} (python -m labs.grade "
                         "--list)")
    module = import_file(dirs[number] / "grader.py", f"_lab_grader_{number}")
    lab: Lab = module.LAB
    return lab, dirs[number]


def grade(lab: Lab, lab_dir: Path, code: Path, *, out: bool = True) -> list[Result]:
    results: list[Result] = []
    if out:
        print(f"Lab {lab.number}: {lab.title} [{lab.difficulty}] -- grading {code.relative_to(REPO)}/")
    for step in lab.steps:
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"lab{lab.number}-") as tmp:
            try:
                step.check(Context(lab_dir, code, Path(tmp)))
                res = Result(step.name, step.points, step.points, time.monotonic() - start)
            except (Failed, AssertionError) as exc:
                res = Result(step.name, step.points, 0, time.monotonic() - start, str(exc) or "assertion failed")
            except NotImplementedError as exc:
                res = Result(step.name, step.points, 0, time.monotonic() - start,
                             f"not written yet ({exc})" if str(exc) else "not written yet")
            except Exception as exc:  # the student's code raised: show where
                frames = traceback.extract_tb(exc.__traceback__)
                where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)
                              if str(code) in f.filename), "")
                res = Result(step.name, step.points, 0, time.monotonic() - start,
                             f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else ""))
        results.append(res)
        if out:
            _print_step(res, step.hint)
    if out:
        got, total = sum(r.earned for r in results), lab.total
        print(f"{'Score':.<44} {got}/{total}")
    return results


def _print_step(res: Result, hint: str) -> None:
    verdict = "OK" if res.earned == res.points else "FAIL"
    print(f"  {res.step + ' ':.<42} {verdict:<4} {res.earned:>3}/{res.points:<3} ({res.seconds:.1f}s)")
    if res.message and res.earned != res.points:
        for line in res.message.splitlines():
            print(f"      {line}")
        if hint:
            print(f"      hint: {hint}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labs.grade", description=__doc__.split("\n\n")[0])
    ap.add_argument("lab", nargs="?", type=int, help="the lab's number (labs/NN-name)")
    ap.add_argument("--solution", action="store_true", help="grade the reference solution/ instead of starter/")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--list", action="store_true", help="list the labs")
    args = ap.parse_args(argv)
    if args.list or args.lab is None:
        for n, d in lab_dirs().items():
            lab, _ = load_lab(n)
            print(f"{n:>2}  {lab.title} [{lab.difficulty}]  labs/{d.name}/README.md")
        return 0 if args.list else 2
    lab, lab_dir = load_lab(args.lab)
    code = lab_dir / ("solution" if args.solution else "starter")
    if not code.is_dir():
        print(f"{code.relative_to(REPO)}/ is not there (an instructor may have removed the solutions)",
              file=sys.stderr)
        return 2
    results = grade(lab, lab_dir, code, out=not args.json)
    if args.json:
        print(json.dumps({"lab": lab.number, "code": code.name, "total": lab.total,
                          "score": sum(r.earned for r in results),
                          "steps": [r.__dict__ for r in results]}))
    return 0 if all(r.earned == r.points for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
