"""The soak test (issue 12): bench/soak.py bounded for CI, the parent's health figures it relies on, and its
write checker.

``VMBUS_SOAK_SECONDS`` (default 60) seconds of chaos over ``VMBUS_SOAK_PARTITIONS`` (default 16) partitions,
seeded by ``VMBUS_SOAK_SEED`` (default 1); ``python -m bench.soak`` or ``make soak`` for longer runs.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from bench.soak import run_soak, scrape
from bench.soak_writer import BLOCK, Journal, content, lost_blocks

from .conftest import Parent
from .load_driver import Api
from .rawclient import RawClient

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("VMBUS_SOAK_SECONDS", "60"))
PARTITIONS = int(os.environ.get("VMBUS_SOAK_PARTITIONS", "16"))
SEED = int(os.environ.get("VMBUS_SOAK_SEED", "1"))
HEALTH = ("vmbus_parent_tasks", "process_open_fds", "process_resident_memory_bytes")
_gpadl_ids = itertools.count(0x300000)


def health(api: Api) -> dict[str, float]:
    m = scrape(api.get("/metrics").decode())
    missing = [k for k in HEALTH if k not in m]
    assert not missing, f"/metrics lacks {missing}"
    return {k: m[k] for k in HEALTH}


def test_the_parents_tasks_fds_and_memory_are_in_metrics_and_the_api_and_follow_its_partitions(
        tmp_path: Path) -> None:
    p = Parent(tmp_path / "parent", extra=["--http", "127.0.0.1:0"])
    try:
        api = Api(p.wait_event("web console and API listening")["url"])
        idle = health(api)
        assert idle["vmbus_parent_tasks"] >= 1 and idle["process_open_fds"] >= 3, idle
        assert idle["process_resident_memory_bytes"] > 1 << 20, idle
        status = api.get("/api/")["process"]
        assert set(status) == {"tasks", "open_fds", "resident_memory_bytes"}, status
        assert all(isinstance(v, int) and v > 0 for v in status.values()), status

        # Three partitions each with a channel open: more tasks (their connections) and fds (their sockets).
        clients = [RawClient(p.unix) for _ in range(3)]
        for i, c in enumerate(clients):
            offers = c.negotiate(f"health-{i}")
            c.open(min(offers), 4, next(_gpadl_ids))
        busy = health(api)
        assert busy["vmbus_parent_tasks"] > idle["vmbus_parent_tasks"], f"tasks did not follow: {idle} -> {busy}"
        assert busy["process_open_fds"] >= idle["process_open_fds"] + 3, f"fds did not follow: {idle} -> {busy}"
        for c in clients:
            c.close()
        api.until(lambda: health(api)["vmbus_parent_tasks"] <= idle["vmbus_parent_tasks"],
                  f"the parent's tasks back to {idle['vmbus_parent_tasks']:g} after its partitions left")
        api.until(lambda: health(api)["process_open_fds"] <= idle["process_open_fds"],
                  f"the parent's fds back to {idle['process_open_fds']:g} after its partitions left")
    finally:
        p.stop()


def test_the_write_checker_names_a_lost_acknowledged_write(tmp_path: Path) -> None:
    """What the soak's verdict rests on: a block that lost its last acknowledged write is named; a block holding
    a later write that was issued but never acknowledged (its writer killed) is not."""
    journal_path, image = tmp_path / "w.journal", tmp_path / "lun0.img"
    journal_path.write_text("I 1 1\nA 1 1\nI 2 2\nA 2 2\nI 3 3\nA 3 3\nI 3 4\nI 4 5\nA 4 5\nI 4 6\nA 4 6\nI 5 7\nA 5")
    with open(image, "wb") as fh:
        fh.truncate(16 * BLOCK)
        for lba, gen in ((1, 1), (2, 2), (3, 4), (4, 5)):  # 3: the unacknowledged later one; 4: an older one
            fh.seek(lba * BLOCK)
            fh.write(content("w", lba, gen))
    journal = Journal.read(journal_path)
    assert journal.acknowledged == 5 and journal.last_gen == 7, journal  # "A 5" was cut short by a kill
    assert [lba for lba, _, _ in lost_blocks("w", journal, image)] == [4]
    with open(image, "r+b") as fh:  # lose block 2 and tear block 1's last sector
        fh.seek(2 * BLOCK)
        fh.write(bytes(BLOCK))
        fh.seek(2 * BLOCK - 512)
        fh.write(content("w", 1, 9)[-512:])
    lost = {lba: what for lba, _, what in lost_blocks("w", journal, image)}
    assert sorted(lost) == [1, 2, 4], lost
    assert lost[2] == "sector 0: zeros; sector 1: zeros" and lost[1] == "sector 7: w|1|9|7", lost


@pytest.mark.timeout(SECONDS * 3 + 600)
def test_soak_mixed_load_with_kills_pauses_and_a_parent_restart_leaks_nothing_and_loses_no_write(
        tmp_path: Path) -> None:
    r = run_soak(tmp_path, SECONDS, PARTITIONS, SEED, log=lambda _: None)
    (tmp_path / "soak.json").write_text(json.dumps(r, indent=2))  # with the logs, for a failure's post-mortem
    assert r["passed"], f"{len(r['failures'])} soak failures, the first: {r['failures'][0]}"
    assert r["child_kills"] >= 1 and r["parent_restarts"] == 1, f"the chaos did not happen: {r['child_kills']} kills"
    # Every writer and VM was connected again before the end (the soak waits for it); some did it by themselves.
    assert r["reconnects"] >= 1, "no writer or VM reconnected by itself after the parent's restart"
    assert r["writes"]["blocks_verified"] > 0, "no acknowledged write was there to verify"
    assert r["pings"]["replies"] > 0 and r["vm_disk_writes"]["verified"] > 0, f"the VMs idled: {r['pings']}"
    idle = [k for k, ops in r["load"].items() if not any(d["ops"] for d in ops.values())]
    assert not idle, f"load clients that did nothing: {idle}"
