"""The kernel's own stack as the guest's: children with ``run --tap NAME --tap-netns NS`` (a TAP in a network
namespace bridged to the NetVSC), the parent's virtual switch between them over VMBus, and the kernel's ``ping``
and ``iperf3`` across it. Addresses are link-local and exist only inside the namespaces the tests create and
remove (also when a test fails); where namespaces or TAP devices are not allowed the tests fail with the reason.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Parent, Proc, child
from .netns import Netns, iperf3, iperf3_server, ping, tap_name

pytestmark = pytest.mark.integration

NET = "169.254.88"


class TapVm:
    """A child partition whose guest stack is the kernel's, in namespace ``ns`` at ``ip``."""

    def __init__(self, proc: Proc, ns: Netns, tap: str, ip: str) -> None:
        self.proc, self.ns, self.tap, self.ip = proc, ns, tap, ip


@contextlib.contextmanager
def tap_vms(tmp_path: Path, make_ns: Callable[[], Netns], count: int,
            config: str = "") -> Iterator[tuple[Parent, list[TapVm]]]:
    parent = Parent(tmp_path / "parent", config)
    vms: list[TapVm] = []
    try:
        for i in range(count):
            ns, tap = make_ns(), tap_name()
            proc = child(tmp_path, parent.unix, f"tapvm{i}", "--tap", tap, "--tap-netns", ns.name)
            vms.append(TapVm(proc, ns, tap, f"{NET}.{i + 1}"))
        for vm in vms:
            vm.proc.wait_event("TAP bridged to the NIC", timeout=60)
            vm.ns.address(vm.tap, f"{vm.ip}/24")
        yield parent, vms
    finally:
        for vm in vms:
            if vm.proc.proc.poll() is None:
                vm.proc.proc.send_signal(signal.SIGCONT)  # a stopped child must be able to take its SIGINT
            vm.proc.stop()
        parent.stop()


def check_ping(src: TapVm, dst: TapVm, count: int = 20) -> None:
    res = ping(src.ns, dst.ip, count=count)
    assert res["sent"] == count and res["loss_pct"] == 0.0, f"ping {dst.ip} from {src.ns.name}: {res['output'].strip()}"


def run_iperf(client: TapVm, server: TapVm) -> list[dict[str, Any]]:
    runs = []
    with iperf3_server(server.ns, server.ip):
        for reverse in (False, True):
            r = iperf3(client.ns, server.ip, seconds=2, reverse=reverse)
            assert r["received_bps"] > 0, f"iperf3 {'-R ' if reverse else ''}moved no data: {r}"
            runs.append(r)
    return runs


def test_kernel_ping_and_iperf3_across_the_vmbus_switch(tmp_path: Path, netns_factory: Callable[[], Netns],
                                                        tap_allowed: None, record_property: Any) -> None:
    with tap_vms(tmp_path, netns_factory, 2) as (parent, (a, b)):
        check_ping(a, b)  # ARP resolves through the switch's flooding, then unicast both ways
        check_ping(b, a)
        runs = run_iperf(a, b)
        record_property("tap_vmbus_iperf3", runs)
        print("iperf3 through VMBus: " + ", ".join(
            f"{'B->A' if r['reverse'] else 'A->B'} {r['received_bps'] / 1e9:.2f} Gbit/s" for r in runs))
        check_ping(a, b, count=5)  # still healthy after the bulk transfer
    assert not [e for e in parent.lines if e.get("level") == "error"], "the parent logged an error"


def test_a_partition_that_stops_receiving_does_not_hurt_the_others(
        tmp_path: Path, netns_factory: Callable[[], Netns], tap_allowed: None) -> None:
    with tap_vms(tmp_path, netns_factory, 3) as (_parent, (a, b, frozen)):
        check_ping(a, frozen, count=3)  # the switch has learned its MAC: frames for it go to its port only
        frozen.proc.proc.send_signal(signal.SIGSTOP)  # completes no receive, reads nothing from its socket
        lost = ping(a.ns, frozen.ip, count=20, interval=0.01)
        assert lost["received"] < lost["sent"], f"a stopped partition answered: {lost['output'].strip()}"
        check_ping(a, b)
        check_ping(b, a)
        frozen.proc.proc.send_signal(signal.SIGCONT)
