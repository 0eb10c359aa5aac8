"""The kernel's own stack as the guest's: children with ``run --tap NAME --tap-netns NS`` (a TAP in a network
namespace bridged to the NetVSC), the parent's virtual switch between them over VMBus, and the kernel's ``ping``
and ``iperf3`` across it. Addresses are link-local and exist only inside the namespaces the tests create and
remove (also when a test fails); where namespaces or TAP devices are not allowed the tests fail with the reason.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import BIN, Parent, Proc, child
from .netns import Netns, iperf3, iperf3_server, ping, tap_name

pytestmark = pytest.mark.integration

NET = "169.254.88"


class TapVm:
    """A child partition of ``parent`` whose guest stack is the kernel's, in namespace ``ns`` at ``ip``."""

    def __init__(self, parent: Parent, proc: Proc, ns: Netns, tap: str, ip: str) -> None:
        self.parent, self.proc, self.ns, self.tap, self.ip = parent, proc, ns, tap, ip


@contextlib.contextmanager
def tap_vms(tmp_path: Path, make_ns: Callable[[], Netns], count: int,
            config: str = "") -> Iterator[tuple[Parent, list[TapVm]]]:
    parent = Parent(tmp_path / "parent", config)
    vms: list[TapVm] = []
    try:
        for i in range(count):
            ns, tap = make_ns(), tap_name()
            proc = child(tmp_path, parent.unix, f"tapvm{i}", "--tap", tap, "--tap-netns", ns.name)
            vms.append(TapVm(parent, proc, ns, tap, f"{NET}.{i + 1}"))
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
    if res["sent"] != count or res["loss_pct"] != 0.0:
        pytest.fail(f"ping {dst.ip} from {src.ns.name}: {res['output'].strip()}\n"
                    + where_frames_went(src.parent, [src.proc, dst.proc]))


def where_frames_went(parent: Proc, guests: list[Proc], *, switch: bool = False) -> str:
    """The guests' and the parent's NIC counters for a failure message: the guests stop, so that they and the
    parent log them; ``switch``: the parent stops too, and logs its switch counters."""
    for guest in guests:
        guest.stop()
    with contextlib.suppress(AssertionError):  # (a diagnosis: what is there by then)
        parent.wait_count("NIC off the switch", len(guests), timeout=10)
    if switch:
        parent.stop()
    lines = [f"parent: {e}" for e in (*parent.events("NIC off the switch"), *parent.events("switch counters"))]
    lines += [f"{guest.name}: {e}" for guest in guests for e in guest.events("NIC queues closing")]
    return "\n".join(lines)


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
        # Its reply teaches the switch its MAC: frames for it go to its port only (one reply is enough here;
        # the paths that must lose nothing are checked below).
        first = ping(a.ns, frozen.ip, count=3)
        assert first["received"] > 0, f"no reply from {frozen.ip} before it stopped: {first['output'].strip()}"
        frozen.proc.proc.send_signal(signal.SIGSTOP)  # completes no receive, reads nothing from its socket
        lost = ping(a.ns, frozen.ip, count=20, interval=0.01)
        assert lost["received"] < lost["sent"], f"a stopped partition answered: {lost['output'].strip()}"
        check_ping(a, b)
        check_ping(b, a)
        frozen.proc.proc.send_signal(signal.SIGCONT)


def test_external_tap_joins_the_host_stack_to_the_switch(tmp_path: Path, netns_factory: Callable[[], Netns],
                                                         tap_allowed: None) -> None:
    host_ns, ext = netns_factory(), tap_name()
    workdir = tmp_path / "parent"
    workdir.mkdir()
    (workdir / "parent.toml").write_text(f'[network]\nexternal_tap = "{ext}"\n')
    sock = workdir / "run" / "vmbus.sock"
    parent = Proc(host_ns.argv([str(BIN / "parent-partition"), "serve", "--config", str(workdir / "parent.toml"),
                                "--json-logs", "--listen", f"unix:{sock}", "--data-dir", str(workdir / "var")]),
                  workdir, "parent")
    vm: Proc | None = None
    try:
        parent.wait_event("parent partition listening")
        assert parent.events("external TAP on the virtual switch"), "no external TAP was attached"
        host_ns.address(ext, f"{NET}.100/24")
        guest_ns, tap = netns_factory(), tap_name()
        vm = child(tmp_path, f"unix:{sock}", "extvm", "--tap", tap, "--tap-netns", guest_ns.name)
        vm.wait_event("TAP bridged to the NIC", timeout=60)
        guest_ns.address(tap, f"{NET}.1/24")
        # A first exchange resolves both addresses and teaches the switch both MACs (one reply is enough: once,
        # under a loaded machine, one of ten first pings went unanswered); the pings after it lose nothing.
        first = ping(host_ns, f"{NET}.1", count=3)
        assert first["received"] > 0, f"no reply from the guest: {first['output'].strip()}"
        for src, dst, what in ((host_ns, f"{NET}.1", "host to guest"), (guest_ns, f"{NET}.100", "guest to host")):
            res = ping(src, dst, count=10)
            if res["loss_pct"] != 0.0:
                pytest.fail(f"{what} through the external TAP: {res['output'].strip()}\n"
                            + where_frames_went(parent, [vm], switch=True))
    finally:
        if vm is not None:
            vm.stop()
        assert parent.stop() == 0, "the parent did not stop cleanly"
    assert ext not in host_ns.ip("-br", "link"), "the external TAP outlived the parent"


def test_external_tap_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "parent.toml").write_text('[network]\nexternal_tap = "lo"\n')
    done = subprocess.run([str(BIN / "parent-partition"), "serve", "--config", str(tmp_path / "parent.toml"),
                           "--listen", f"unix:{tmp_path / 'vmbus.sock'}", "--data-dir", str(tmp_path / "var")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "external_tap = 'lo': cannot create the TAP device" in done.stderr, done.stderr
