"""Every command in every lab handout runs as written (tests/labs/handout.py has the convention)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.labs.handout import REPO, commands, run_handout

HANDOUTS = sorted((REPO / "labs").glob("[0-9][0-9]-*/README.md"))


def test_convention_parses() -> None:
    md = "x\n```sh\n# terminal 1: leave it running\nparent-partition serve\n```\n```sh\nmake grade LAB=1  # exits 1\n" \
         "a \\\n  b\n```\n```console\n$ not run\n```\n"
    got = [(c.line, c.background, c.exits) for c in commands(md)]
    assert got == [("parent-partition serve", True, 0), ("make grade LAB=1  # exits 1", False, 1), ("a b", False, 0)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("readme", HANDOUTS, ids=[p.parent.name for p in HANDOUTS])
def test_handout_commands_run(readme: Path, tmp_path: Path) -> None:
    assert commands(readme.read_text()), f"{readme} has no sh block: nothing a student runs?"
    run_handout(readme, tmp_path)
