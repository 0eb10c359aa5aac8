"""Each lab's grader, both ways (issue 13): the reference solution gets full marks, and the untouched starter
fails exactly the steps its grader says it must (a grader that passes a blank starter grades nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from labs.grade import lab_dirs, load_lab
from labs.harness import REPO

LABS = sorted(lab_dirs())


def _grade(number: int, *extra: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-m", "labs.grade", str(number), "--json", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.stdout.strip(), f"the grader printed nothing (exit {proc.returncode}): {proc.stderr[-2000:]}"
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["exit"] = proc.returncode
    return result


def _failed(result: dict[str, object]) -> dict[str, str]:
    steps = result["steps"]
    assert isinstance(steps, list)
    return {s["step"]: s["message"] for s in steps if s["earned"] != s["points"]}


def test_there_are_labs() -> None:
    assert list(range(1, len(LABS) + 1)) == LABS, f"labs/ should be numbered 1..N without gaps: {LABS}"


@pytest.mark.parametrize("number", LABS)
def test_solution_gets_full_marks(number: int) -> None:
    result = _grade(number, "--solution")
    assert _failed(result) == {}, f"lab {number}'s solution lost points: {_failed(result)}"
    assert result["exit"] == 0 and result["score"] == result["total"]


@pytest.mark.parametrize("number", LABS)
def test_starter_fails_where_expected(number: int) -> None:
    lab, _ = load_lab(number)
    assert lab.starter_fails, f"lab {number} names no step the starter must fail"
    assert lab.starter_fails <= {s.name for s in lab.steps}, "starter_fails names a step that does not exist"
    result = _grade(number)
    failed = _failed(result)
    assert set(failed) == set(lab.starter_fails), (
        f"lab {number}'s starter failed {sorted(failed)}, expected {sorted(lab.starter_fails)}")
    assert result["exit"] == 1
