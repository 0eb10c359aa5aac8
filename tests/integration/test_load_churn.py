"""The churn load workload against a real parent: partitions come, open their channels, close them, tear
their GPADLs down and unload, cycle after cycle; or stay while their devices are rescinded and offered again
through the API. The parent is left with nothing of theirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from child_partition.load.churn import ChurnWorkload

from .conftest import Parent
from .load_driver import Api, Rec, build, drive, parent_with_api, quiet

pytestmark = pytest.mark.integration


@pytest.fixture
def http_parent(tmp_path: Path) -> Iterator[tuple[Parent, Api]]:
    yield from parent_with_api(tmp_path)

STEPS = ("connect", "negotiate", "open", "close", "unload")


async def test_partitions_come_and_go(http_parent: tuple[Parent, Api]) -> None:
    parent, api = http_parent
    workload = build(ChurnWorkload, [], parent, api, "churn")
    held: list[dict[str, object]] = []

    def after_close(op: str) -> None:
        # One cycle at a time: right after "close" the cycle's partition is still connected, every channel
        # closed and every GPADL torn down (by the guest, before its UNLOAD).
        if op == "close":
            held.extend(p for p in api.get("/api/partitions") if str(p["name"]).startswith("churn-"))

    rec = Rec(after_close)
    done, _, extra = await drive(workload, 2, 3, 1, rec, one_at_a_time=True)
    assert [d.op for d in done] == ["cycle"] * 6 and not rec.errors
    assert all(len(rec.ops[s]) == 6 for s in STEPS), {s: len(rec.ops[s]) for s in STEPS}
    stats = extra["churn"]
    # Every offered device but storage, five a cycle.
    assert (stats["cycles"], stats["partitions"], stats["channels_opened"]) == (6, 6, 30), stats
    names = {f"churn-{i}-{n}" for i in range(2) for n in range(3)}
    assert {str(p["name"]) for p in held} <= names and held, held
    assert len(held) == 6 and all(p["gpadls"] == 0 for p in held), [(p["name"], p["gpadls"]) for p in held]
    assert all(c["state"] != "open" for p in held for c in p["channels"]), held  # type: ignore[attr-defined]
    # Each cycle's partition unloaded and left: the parent holds none of them.
    for name in sorted(names):  # (log lines reach us through a pipe, after the guest saw its unload answered)
        parent.wait_event("VMBus disconnected", partition=name, reason="unload")
    api.until(lambda: not any(n.startswith("churn-") for n in api.names()), "every churn partition is gone")
    assert not list((parent_dir(parent) / "var").glob("churn-*")), "a cycle left a disk image"
    quiet(parent)


def parent_dir(parent: Parent) -> Path:
    return parent.unix_path.parent.parent


async def test_concurrent_cycles_with_storage_clean_up_their_disks(http_parent: tuple[Parent, Api]) -> None:
    parent, api = http_parent
    var = parent_dir(parent) / "var"
    workload = build(ChurnWorkload, ["--devices", "storage,heartbeat", "--data-dir", str(var)], parent, api, "cs")
    rec = Rec()
    done, _, extra = await drive(workload, 2, 4, 2, rec)
    assert len(done) == 8 and not rec.errors
    stats = extra["churn"]
    assert (stats["cycles"], stats["channels_opened"], stats["disks_removed"]) == (8, 16, 8), stats
    api.until(lambda: not any(n.startswith("cs-") for n in api.names()), "every churn partition is gone")
    assert not list(var.glob("cs-*")), f"disk images left: {sorted(var.glob('cs-*'))}"
    quiet(parent)


async def test_rescind_and_reoffer_through_the_api(http_parent: tuple[Parent, Api]) -> None:
    parent, api = http_parent
    workload = build(ChurnWorkload, ["--rescind", "--devices", "network,video,heartbeat"], parent, api, "rs")
    rec = Rec()
    checked: list[str] = []

    def check(parts: list[object]) -> None:
        for p in parts:
            name = p.name  # type: ignore[attr-defined]
            channels = api.get(f"/api/partitions/{name}/channels")
            open_relids = {c["relid"] for c in channels if c["state"] == "open"}
            assert {c["device"] for c in channels if c["state"] == "open"} >= {"network", "video", "heartbeat"}
            # Only the bound channels hold GPADLs: every rescinded channel's were released.
            gpadls = api.get(f"/api/partitions/{name}/gpadls")
            assert gpadls and all(g["relid"] in open_relids for g in gpadls), (gpadls, open_relids)
            checked.append(name)

    done, _, extra = await drive(workload, 2, 4, 2, rec, check)
    assert len(done) == 8 and not rec.errors and len(checked) == 2
    assert len(rec.ops["rescind"]) == len(rec.ops["reoffer"]) == 8
    assert extra["churn"]["rescinds"] == 8 and extra["churn"]["partitions"] == 2
    for name in checked:  # each device had its turn on each partition
        assert {e["device"] for e in parent.events("device rescinded through the API")
                if e["partition"] == name} == {"network", "video", "heartbeat"}
    api.until(lambda: not api.names() & set(checked), "the guests are gone from the parent")
    quiet(parent)
