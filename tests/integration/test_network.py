"""The network device end to end: real parent, real children, NVSP and RNDIS set up over VMBus, the parent's
virtual switch between them, and ``child-partition ping`` through it with the built-in ARP/ICMP stack."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

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
        assert not [e for e in parent.lines if e.get("level") in ("error", "warning")], "the parent complained"
        nics = parent.events("NIC off the switch")
        assert {e["partition"] for e in nics} == {"vm1", "vm2"}
        assert all(e["rx_dropped_no_room"] == 0 for e in nics)
        assert len(parent.events("RNDIS halted")) == 3, "a child left without RNDIS HALT"
    finally:
        vm2.stop()
        parent.stop()
