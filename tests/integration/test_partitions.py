"""Tier 3: a real parent daemon and real child processes on loopback TCP and a Unix socket."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from parent_partition.devices.network.settings import NetworkSettings

from .conftest import Parent, child

DEVICES = ["heartbeat", "keyboard", "mouse", "network", "storage", "video"]
CHANNELS = len(DEVICES) + NetworkSettings().subchannels  # every device's, and the NIC's NVSP sub-channels
pytestmark = pytest.mark.integration


def test_children_over_tcp_and_unix_open_every_channel_and_unload(parent: Parent, workdir: Path) -> None:
    vm1 = child(workdir, parent.tcp, "vm1")
    vm2 = child(workdir, parent.unix, "vm2")
    for vm in (vm1, vm2):
        ready = vm.wait_event("all offered channels open")
        assert ready["channels"] == len(DEVICES) and sorted(ready["devices"]) == DEVICES
        # Each device completed its real protocol-version handshake, newest versions first.
        assert ready["versions"] == {"storage": "6.2", "network": "6.1", "video": "3.5",
                                     "keyboard": "1.0", "mouse": "2.0", "heartbeat": "3.0"}
        assert vm.events("VMBus negotiated")[0]["version"] == "5.3"  # a current Linux guest's first try
        vm.wait_event("NIC queues")  # the NIC's sub-channels open after its probe, as Linux's subchan_work
    parent.wait_count("channel open", 2 * CHANNELS)
    for vm in (vm1, vm2):
        assert vm.stop(signal.SIGINT) == 0
        assert vm.events("unloaded cleanly")
        assert not vm.events("reconnecting"), "a child asked to stop must not reconnect"
    parent.wait_event("VMBus disconnected", partition="vm1", reason="unload")
    parent.wait_event("VMBus disconnected", partition="vm2", reason="unload")
    parent.wait_count("channel closed", 2 * CHANNELS)
    assert not [r for r in parent.lines if r.get("level") in ("error", "critical")]


def test_trace_shows_every_control_message_with_real_names(workdir: Path) -> None:
    p = Parent(workdir / "traced", extra=["--trace"])
    try:
        vm = child(workdir, p.unix, "vm1", "--trace")
        vm.wait_event("all offered channels open")
        assert vm.stop(signal.SIGTERM) == 0
        p.wait_event("VMBus disconnected", partition="vm1")
        parent_trace = [r["event"] for r in p.lines if r["event"].startswith(("G>H", "H>G"))]
        child_trace = [r["event"] for r in vm.lines if r["event"].startswith(("G>H", "H>G"))]
        for name in ("INITIATE_CONTACT(14)", "VERSION_RESPONSE(15)", "REQUESTOFFERS(3)", "OFFERCHANNEL(1)",
                     "ALLOFFERS_DELIVERED(4)", "GPADL_HEADER(8)", "GPADL_BODY(9)", "GPADL_CREATED(10)",
                     "OPENCHANNEL(5)", "OPENCHANNEL_RESULT(6)", "CLOSECHANNEL(7)", "GPADL_TEARDOWN(11)",
                     "GPADL_TORNDOWN(12)", "UNLOAD(16)", "UNLOAD_RESPONSE(17)"):
            assert any(f"CHANNELMSG_{name}" in t for t in parent_trace), name
            assert any(f"CHANNELMSG_{name}" in t for t in child_trace), name
        # Both ends saw the same messages (interleaved differently: the guest opens channels concurrently).
        assert sorted(parent_trace) == sorted(child_trace)
    finally:
        p.stop()


def test_guest_falls_back_to_an_older_host_version(workdir: Path) -> None:
    p = Parent(workdir / "old", '[parent]\nvmbus_versions = ["4.0", "3.0", "2.4"]\n')
    try:
        vm = child(workdir, p.tcp, "vm1", "--trace")
        vm.wait_event("all offered channels open")
        assert vm.events("VMBus negotiated")[0]["version"] == "4.0"
        refused = [r for r in vm.lines if "VERSION_RESPONSE" in r["event"] and "version_supported=0" in r["event"]]
        assert len(refused) == 5  # 5.3, 5.2, 5.1, 5.0, 4.1
        assert vm.stop() == 0
    finally:
        p.stop()


def test_killed_child_releases_only_its_own_channels(parent: Parent, workdir: Path) -> None:
    vm1 = child(workdir, parent.tcp, "vm1")
    vm2 = child(workdir, parent.unix, "vm2")
    vm1.wait_event("all offered channels open")
    vm1.wait_event("NIC queues")  # and the NIC's sub-channels, opened after its probe
    vm2.wait_event("all offered channels open")
    assert vm1.stop(signal.SIGKILL) == -signal.SIGKILL
    gone = parent.wait_event("partition disconnected", partition="vm1")
    assert gone["channels_released"] == CHANNELS
    # vm2 never noticed, and a new vm1 can connect under the same name at once.
    vm1b = child(workdir, parent.tcp, "vm1")
    vm1b.wait_event("all offered channels open")
    assert not vm2.events("session with the parent ended")
    assert vm2.stop() == 0 and vm1b.stop() == 0


def test_child_reconnects_and_renegotiates_after_parent_restart(workdir: Path) -> None:
    p = Parent(workdir / "p1")
    vm = child(workdir, p.unix, "vm1")
    vm.wait_event("all offered channels open")
    assert p.stop(signal.SIGKILL) == -signal.SIGKILL
    vm.wait_event("session with the parent ended")
    mark = vm.mark()
    p2 = Parent(workdir / "p1")  # same Unix socket path
    try:
        vm.wait_event("all offered channels open", timeout=20, start=mark)
        assert len(vm.events("VMBus negotiated")) == 2
        assert vm.stop() == 0
    finally:
        p2.stop()


def test_parent_shutdown_rescinds_and_children_survive_it(workdir: Path) -> None:
    p = Parent(workdir / "p")
    vm = child(workdir, p.tcp, "vm1")
    vm.wait_event("all offered channels open")
    assert p.stop(signal.SIGTERM) == 0
    assert p.events("parent partition stopped")
    assert len(vm.events("offer rescinded")) + len(vm.events("session with the parent ended")) >= 1
    vm.wait_event("session with the parent ended")
    assert vm.stop() == 0
