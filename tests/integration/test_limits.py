"""Issue 12's per-partition limits over real sockets: a partition past a limit gets the protocol's refusal and
one log line, repeated refusals end its connection with CLOSE code ``abuse``, and the parent-wide memory
budget refuses a partition while others hold it. A bystander child shares the parent and must not notice."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbus_proto import messages as m
from vmbus_proto.gpadl import split
from vmbus_proto.server import PFN_BYTES

from .conftest import FAST_LIMITS, Parent, Proc, bystander_of, child
from .rawclient import RawClient
from .test_subchannels import qemu_io

pytestmark = pytest.mark.integration

BIG = 8000  # pages a GPADL claims in its header alone (at most 8190 fit)
BYSTANDER = 7660 * PFN_BYTES  # the PFNs the bystander's GPADLs hold (7,660 pages; GET /api/ memory_budget)
ROOM = 4340 * PFN_BYTES  # what the budget has left beyond the bystander and one BIG claim
LIMITS = FAST_LIMITS + f"""
[limits]
gpadl_pages = 12000
control_per_second = 20
control_burst = 2000
strikes = 3
strike_window = 600.0
memory_budget = {BYSTANDER + BIG * PFN_BYTES + ROOM}
"""


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Parent, Proc]]:
    p = Parent(tmp_path_factory.mktemp("limits") / "parent", LIMITS, extra=["--http", "127.0.0.1:0"])
    try:
        with bystander_of(p, tmp_path_factory.mktemp("bystander")) as vm:
            yield p, vm
    finally:
        p.stop()


def _created(c: RawClient, gid: int) -> int:
    while True:
        msg = c.expect(m.GpadlCreated)
        if msg.gpadl == gid:
            return int(msg.creation_status)


def _gpadl(c: RawClient, relid: int, gid: int, pages: int) -> int:
    header, bodies = split(relid, gid, list(range(0x10000, 0x10000 + pages)))
    for msg in (header, *bodies):
        c.send(msg)
    return _created(c, gid)


def _claim(c: RawClient, relid: int, gid: int, pages: int) -> None:
    """A GPADL_HEADER that announces ``pages`` pages and never sends them."""
    header, _ = split(relid, gid, list(range(0x10000, 0x10000 + pages)))
    c.send(header)


def test_gpadl_pages_past_the_partition_limit_are_refused(limited: tuple[Parent, Proc]) -> None:
    p, _ = limited
    c = RawClient(p.tcp)
    relid = min(c.negotiate("pages"))
    mark = p.mark()
    _claim(c, relid, 1, BIG)
    _claim(c, relid, 2, BIG)
    assert _created(c, 2) != 0, "a GPADL past [limits] gpadl_pages must get a failed GPADL_CREATED"
    p.wait_event("control message dropped", kind="gpadl_pages_limit", start=mark)
    assert _gpadl(c, relid, 3, 8) == 0, "a GPADL within the limit must still succeed"
    c.close()
    p.wait_event("partition disconnected", start=mark, partition="pages")  # its budget is back


def test_the_memory_budget_refuses_while_others_hold_it(limited: tuple[Parent, Proc]) -> None:
    p, _ = limited
    a, b = RawClient(p.tcp), RawClient(p.tcp)
    relid_a, relid_b = min(a.negotiate("budget-a")), min(b.negotiate("budget-b"))
    _claim(a, relid_a, 1, BIG)  # half the budget
    assert _gpadl(a, relid_a, 2, 8) == 0  # ordered after the claim: it was taken
    mark = p.mark()
    _claim(b, relid_b, 1, BIG)  # the bystander holds some too: no room for another half
    assert _created(b, 1) != 0, "a GPADL past the parent's memory budget must get a failed GPADL_CREATED"
    p.wait_event("control message dropped", kind="memory_budget", start=mark, partition="budget-b")
    a.close()
    p.wait_event("partition disconnected", start=mark, partition="budget-a")
    b.pending.clear()
    _claim(b, relid_b, 5, BIG)
    header, bodies = split(relid_b, 6, list(range(0x10000, 0x10008)))
    for msg in (header, *bodies):
        b.send(msg)
    # Answers come in order: a refusal of GPADL 5 would arrive before GPADL 6's success.
    answered = [b.expect(m.GpadlCreated)]
    while answered[-1].gpadl != 6:
        answered.append(b.expect(m.GpadlCreated))
    assert [(x.gpadl, x.creation_status) for x in answered] == [(6, 0)], f"the budget A gave back: {answered}"
    b.close()


def _get(p: Parent, path: str) -> str:
    url = p.wait_event("web console and API listening")["url"]
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return str(resp.read().decode())


def test_the_api_and_metrics_show_the_budget_in_use(limited: tuple[Parent, Proc]) -> None:
    p, _ = limited
    c = RawClient(p.tcp)
    relid = min(c.negotiate("budget-view"))
    _claim(c, relid, 1, BIG)
    assert _gpadl(c, relid, 2, 8) == 0  # ordered after the claim: it was taken
    budget = json.loads(_get(p, "/api/"))["memory_budget"]
    assert budget["bytes"] == BYSTANDER + BIG * PFN_BYTES + ROOM
    assert budget["used_bytes"] >= (BIG + 8) * PFN_BYTES, f"the claimed GPADL is not in the budget in use: {budget}"
    view = json.loads(_get(p, "/api/partitions/budget-view"))
    assert view["gpadl_pages"] == BIG + 8, view
    metrics = _get(p, "/metrics")
    used = re.search(r"^vmbus_memory_budget_used_bytes (\S+)$", metrics, re.M)
    assert used and float(used.group(1)) >= (BIG + 8) * PFN_BYTES, "vmbus_memory_budget_used_bytes missing or too low"
    assert re.search(r"^vmbus_memory_budget_bytes ", metrics, re.M), "vmbus_memory_budget_bytes missing"
    mark = p.mark()
    c.close()
    p.wait_event("partition disconnected", start=mark, partition="budget-view")


def test_a_control_message_flood_is_dropped_then_ends_the_connection(limited: tuple[Parent, Proc]) -> None:
    p, vm = limited
    c = RawClient(p.tcp)
    c.negotiate("flood")
    mark = p.mark()
    for _ in range(5000):  # duplicates, answered with nothing: only the rate limit and the strikes act
        try:
            c.send(m.RequestOffers())
        except (BrokenPipeError, ConnectionResetError):
            break
    reason = c.wait_closed()
    assert reason is not None and reason.startswith("abuse: control messages per second"), reason
    assert c.close_code == "abuse", c.close_code
    p.wait_event("connection ended for abuse", start=mark, partition="flood", limit="control messages per second")
    assert p.proc.poll() is None and not vm.events("session with the parent ended")


def test_repeated_gpadl_refusals_end_the_connection(limited: tuple[Parent, Proc]) -> None:
    p, _ = limited
    c = RawClient(p.tcp)
    relid = min(c.negotiate("repeat"))
    _claim(c, relid, 1, BIG)
    for gid in (2, 3, 4):
        try:
            _claim(c, relid, gid, BIG)
        except (BrokenPipeError, ConnectionResetError):
            break
    reason = c.wait_closed()
    assert reason is not None and reason.startswith("abuse: gpadl pages limit"), reason
    assert c.close_code == "abuse"
    p.wait_event("partition disconnected", partition="repeat")


def test_the_bystander_never_noticed(limited: tuple[Parent, Proc]) -> None:
    p, vm = limited
    assert p.proc.poll() is None and vm.proc.poll() is None
    assert not vm.events("session with the parent ended")
    newcomer = RawClient(p.tcp)
    assert newcomer.negotiate("after-limits")
    newcomer.close()




def test_subchannels_past_the_partition_limit_are_not_offered_and_io_still_works(tmp_path: Path) -> None:
    """A StorVSC asks for 4 sub-channels; ``[limits] subchannels = 2`` offers 2, and the disk works over them."""
    parent = Parent(tmp_path, FAST_LIMITS + "[storage]\nsubchannels = 4\n[network]\nsubchannels = 0\n"
                                            "[limits]\nsubchannels = 2\n")
    sock = tmp_path / "vm1.nbd"
    vm = child(tmp_path, parent.unix, "vm1", "--nbd", f"unix:{sock}")
    try:
        vm.wait_event("disk exported over NBD")
        limited = parent.wait_event("sub-channels limited", partition="vm1")
        assert (limited["asked"], limited["offered"], limited["limit"]) == (4, 2, 2), limited
        assert len(vm.events("sub-channel open")) == 2, vm.events("sub-channel open")
        qemu_io(sock, "vm1", *[f"aio_write -P 0x{i + 1:02x} {i * 64}k 64k" for i in range(16)], "aio_flush",
                *[f"aio_read -P 0x{i + 1:02x} {i * 64}k 64k" for i in range(16)], "aio_flush")
        assert vm.stop() == 0
    finally:
        vm.stop()
        parent.stop()


def test_max_gpadls_and_max_partitions_are_refused_and_logged(tmp_path: Path) -> None:
    """``[parent] max_gpadls``: the GPADL past it gets a failed GPADL_CREATED and one line, the ones before
    stand; ``max_partitions``: the connection past it gets a CLOSE naming the limit, and a place freed is
    taken again."""
    p = Parent(tmp_path / "parent", FAST_LIMITS + "max_gpadls = 3\nmax_partitions = 2\n")
    try:
        a, b = RawClient(p.tcp), RawClient(p.tcp)
        relid = min(a.negotiate("a"))
        b.negotiate("b")
        mark = p.mark()
        assert [_gpadl(a, relid, gid, 4) for gid in (1, 2, 3)] == [0, 0, 0], "GPADLs within max_gpadls failed"
        assert _gpadl(a, relid, 4, 4) != 0, "the GPADL past [parent] max_gpadls must get a failed GPADL_CREATED"
        p.wait_event("control message dropped", kind="gpadl_limit", start=mark)
        third = RawClient(p.tcp)
        assert third.wait_closed() == "partition limit of 2 reached", third.close_reason
        p.wait_event("partition limit reached; refusing connection", start=mark)
        b.close()
        p.wait_event("partition disconnected", start=mark, partition="b")
        again = RawClient(p.tcp)
        assert again.negotiate("c"), "a freed place under max_partitions was not taken again"
        again.close()
        a.close()
    finally:
        p.stop()
