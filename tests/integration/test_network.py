"""The network device end to end: real parent, real children, NVSP and RNDIS set up over VMBus, the parent's
virtual switch between them, and ``child-partition ping`` through it with the built-in ARP/ICMP stack."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import BIN, Parent, child

pytestmark = pytest.mark.integration


def ping(parent: Parent, name: str, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "child-partition"), "ping", "--connect", parent.unix, "--name", name, *args, target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_one_partition_pings_another_through_the_switch(tmp_path: Path) -> None:
    parent = Parent(tmp_path)
    vm2 = child(tmp_path, parent.tcp, "vm2")  # over TCP; the pinging partition comes over the Unix socket
    try:
        vm2.wait_event("guest network stack up")
        done = ping(parent, "vm1", "vm2", "-c", "3", "-i", "0.2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "3 packets transmitted, 3 received, 0% packet loss" in done.stdout, done.stdout
        assert done.stdout.count("bytes from 10.") == 3, done.stdout
        # Nobody answers for a partition that is not there: 100% loss, exit 1, and no harm done.
        gone = ping(parent, "vm1", "vm9", "-c", "2", "-i", "0.2", "-W", "1")
        assert gone.returncode == 1 and "100% packet loss" in gone.stdout, gone.stdout + gone.stderr
        assert vm2.stop(signal.SIGINT) == 0
        assert not parent.complaints(), "the parent complained"
        nics = parent.events("NIC off the switch")
        assert {e["partition"] for e in nics} == {"vm1", "vm2"}
        assert all(e["rx_dropped_no_room"] == 0 for e in nics)
        assert len(parent.events("RNDIS halted")) == 3, "a child left without RNDIS HALT"
    finally:
        vm2.stop()
        parent.stop()


def test_run_ping_logs_each_reply_and_loss_and_the_parent_logs_the_switch_ports(tmp_path: Path) -> None:
    """Two children ping each other with run --ping; the parent's switch counters appear in its log, live
    ([network] stats_interval) and in 'NIC off the switch' at detach."""
    parent = Parent(tmp_path, "[network]\nstats_interval = 0.2\n")
    vm1 = child(tmp_path, parent.unix, "vm1", "--ping", "vm2", "--ping-interval", "0.2")
    vm2 = child(tmp_path, parent.tcp, "vm2", "--ping", "vm1,10.0.0.9", "--ping-interval", "0.2")
    try:
        reply = vm1.wait_for(lambda r: r.get("event") == "ping reply" and r.get("received", 0) >= 3, 90)
        assert reply["target"] == "vm2" and reply["rtt_ms"] >= 0 and reply["sent"] >= reply["received"], reply
        vm2.wait_for(lambda r: r.get("event") == "ping reply" and r.get("target") == "vm1", 60)
        lost = vm2.wait_event("ping lost", 60, target="10.0.0.9")  # nobody has that address
        assert lost["reason"] in ("timeout", "unreachable") and lost["received"] == 0, lost

        def both_ports_counted(r: dict[str, Any]) -> bool:
            ports = r.get("ports", {}) if r.get("event") == "switch counters" else {}
            return all(ports.get(vm, {}).get("port_rx_frames", 0) >= 3 for vm in ("vm1", "vm2"))

        live = parent.wait_for(both_ports_counted, 60)["ports"]["vm1"]
        assert live["port_tx_frames"] >= 3 and live["port_rx_flooded"] >= 1, live  # replies in; ARP flooded
        assert vm1.stop(signal.SIGINT) == 0, "vm1 did not unload cleanly while pinging"
        off = parent.wait_event("NIC off the switch", 30, partition="vm1")
        assert off["port_rx_frames"] >= reply["sent"] and off["port_tx_frames"] >= reply["received"], off
        drops = {k: v for k, v in off.items() if k.startswith("port_dropped_")}
        assert set(drops) == {f"port_dropped_{r}" for r in ("queue_full", "too_big", "oversize", "runt",
                                                             "bad_source", "mac_spoofed")}, drops
        assert not any(drops.values()), f"the switch dropped vm1's frames: {drops}"
        assert vm2.stop(signal.SIGINT) == 0, "vm2 did not unload cleanly while pinging"
        assert not parent.complaints(), "the parent complained"
    finally:
        vm1.stop()
        vm2.stop()
        parent.stop()


@pytest.mark.parametrize(("target", "message"), [
    ("2001:db8::1", "only IPv4 is supported"),
    ("192.168.1.1", "is not a host on this partition's network 10.0.0.0/8"),
])
def test_run_ping_refuses_a_target_it_cannot_reach(tmp_path: Path, target: str, message: str) -> None:
    done = subprocess.run([str(BIN / "child-partition"), "run", "--connect", f"unix:{tmp_path / 'none.sock'}",
                           "--name", "vm1", "--ping", target], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in (1, 2) and message in done.stderr, f"exit {done.returncode}: {done.stderr}"
