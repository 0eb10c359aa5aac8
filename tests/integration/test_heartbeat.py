"""Tier 3: the heartbeat integration service between a real parent daemon and real child processes.

Every child is offered the heartbeat channel; the parent sends heartbeats and the child answers them. A child
killed with SIGKILL is reported lost at once and costs nobody else anything; a child frozen with SIGSTOP is
reported lost once it misses ``lost_after`` heartbeats, and resumed when SIGCONT lets it answer again.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from .conftest import Parent, child

pytestmark = pytest.mark.integration

# Heartbeats every 0.2 s keep the test short; debug logging shows each answer ("heartbeat", seq=N).
CONFIG = """
[parent]
log_level = "debug"

[heartbeat]
interval = 0.2
lost_after = {lost_after}
"""


def heartbeat(partition: str, min_seq: int) -> Any:
    return lambda r: r.get("event") == "heartbeat" and r.get("partition") == partition and r["seq"] >= min_seq


def test_heartbeats_flow_and_a_killed_child_is_lost_costing_nothing_else(workdir: Path) -> None:
    # lost_after 50 (10 s of silence): a loaded machine never makes the bystander look lost.
    p = Parent(workdir / "parent", CONFIG.format(lost_after=50))
    try:
        vm1 = child(workdir, p.tcp, "vm1")
        vm2 = child(workdir, p.unix, "vm2")
        for vm in (vm1, vm2):
            ready = vm.wait_event("all offered channels open")
            assert "heartbeat" in ready["devices"] and ready["versions"]["heartbeat"] == "3.0", ready
            p.wait_event("device protocol negotiated", partition=vm.name, device="heartbeat", version="3.0")
            p.wait_event("heartbeat started", partition=vm.name, seq=1)
        # Each answer carries the request's seq_num + 1 and the next request carries the answer's.
        p.wait_for(heartbeat("vm1", 5))
        p.wait_for(heartbeat("vm2", 5))
        assert vm1.stop(signal.SIGKILL) == -signal.SIGKILL
        lost = p.wait_event("heartbeat lost", partition="vm1")
        assert lost["reason"] == "connection lost", lost
        # vm2 noticed nothing and its heartbeats go on.
        mark = p.mark()
        last = max(r["seq"] for r in p.events("heartbeat") if r.get("partition") == "vm2")
        p.wait_for(heartbeat("vm2", last + 3), start=mark)
        assert not [r for r in p.events("heartbeat lost") if r.get("partition") == "vm2"]
        assert not vm2.events("session with the parent ended")
        assert vm2.stop(signal.SIGINT) == 0
        p.wait_event("heartbeat stopped", partition="vm2")
        assert not [r for r in p.lines if r.get("level") in ("error", "critical")]
    finally:
        p.stop()


def test_a_frozen_child_is_lost_and_resumes_when_it_thaws(workdir: Path) -> None:
    p = Parent(workdir / "parent", CONFIG.format(lost_after=5))
    try:
        vm = child(workdir, p.tcp, "vm1")
        vm.wait_event("all offered channels open")
        p.wait_event("heartbeat started", partition="vm1")
        mark = p.mark()
        vm.proc.send_signal(signal.SIGSTOP)
        try:
            lost = p.wait_event("heartbeat lost", start=mark, partition="vm1")
            assert lost["missed"] == 5, lost
        finally:
            vm.proc.send_signal(signal.SIGCONT)
        resumed = p.wait_event("heartbeat resumed", start=mark, partition="vm1")
        assert resumed["seq"] == lost["seq"] + 1, (lost, resumed)  # the very request that waited is answered
        p.wait_for(heartbeat("vm1", resumed["seq"] + 2), start=mark)  # and the beat goes on
        assert not vm.events("session with the parent ended")
        assert vm.stop() == 0
    finally:
        p.stop()
