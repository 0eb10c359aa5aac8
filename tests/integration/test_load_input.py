"""The input load workload against a real parent: events sent through the parent's API reach the two guests'
keyboard and mouse drivers, each matched to what was sent, and the parent's input sessions counted them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from child_partition.load.input import InputWorkload

from .conftest import Parent
from .load_driver import Api, Rec, build, drive, parent_with_api, quiet

pytestmark = pytest.mark.integration


@pytest.fixture
def http_parent(tmp_path: Path) -> Iterator[tuple[Parent, Api]]:
    yield from parent_with_api(tmp_path)


@pytest.mark.parametrize("events", ["keys", "mouse", "mixed"])
async def test_events_from_the_api_reach_the_guests(http_parent: tuple[Parent, Api], events: str) -> None:
    parent, api = http_parent
    workload = build(InputWorkload, ["--events", events], parent, api, f"in-{events}")
    rec = Rec()
    ops = 40
    sessions: dict[str, dict[str, int]] = {}

    def check(parts: list[object]) -> None:
        names = {p.name for p in parts}  # type: ignore[attr-defined]
        for device, unit in (("keyboard", "events_sent"), ("mouse", "reports_sent")):
            for s in api.get(f"/api/devices/{device}")["sessions"]:
                if s["partition"] in names:
                    sessions[f"{s['partition']}/{device}"] = s[unit]

    done, parts, extra = await drive(workload, 2, ops, 3, rec, check)
    stats = extra["input"]
    kinds = {"keys": {"key"}, "mouse": {"mouse"}, "mixed": {"key", "mouse"}}[events]
    assert {d.op for d in done} == kinds and len(done) == 2 * ops
    assert stats == {"events": events, "sent": 2 * ops, "received": 2 * ops, "missed": 0, "unexpected": 0}, stats
    assert sum(len(rec.ops[f"{k}-delivered"]) for k in kinds) == 2 * ops and not rec.errors
    # The parent sent exactly these events: one EVENT packet per key event, one INPUT_REPORT per report.
    keys = sum(1 for d in done if d.op == "key")
    assert sum(v for k, v in sessions.items() if k.endswith("/keyboard")) == keys, sessions
    assert sum(v for k, v in sessions.items() if k.endswith("/mouse")) == 2 * ops - keys, sessions
    api.until(lambda: not api.names() & {p.name for p in parts}, "the guests are gone from the parent")
    quiet(parent)


async def test_needs_the_parents_api(http_parent: tuple[Parent, Api]) -> None:
    parent, _ = http_parent
    with pytest.raises(ValueError, match="--http"):
        build(InputWorkload, [], parent, Api(""), "in-none")
