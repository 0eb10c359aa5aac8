"""Real-kernel network fixtures: network namespaces, veth pairs, TAP devices, ``ping`` and ``iperf3`` in them.

Everything is created under random ``vmbt-``/``vmbt`` names and removed afterwards, also when the test fails:
each namespace is deleted (after killing what still runs in it, e.g. an iperf3 server), which destroys the
veth and TAP devices inside it. Addresses are IPv4 link-local (169.254.0.0/16) and exist only inside those
namespaces, so no traffic ever reaches the machine's own interfaces.

Where the machine does not allow it (not root, no ``ip``, namespaces or ``/dev/net/tun`` refused), the
fixtures FAIL with the reason (``pytest.fail``): a test that needs the kernel never passes by skipping.

Used by ``tests/integration/test_netns_baseline.py`` and ``bench/net_veth.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

IPERF_PORT = 5201


class NetnsError(RuntimeError):
    """A namespace step failed; the message has the command and its stderr."""


def run(cmd: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise NetnsError(f"{cmd[0]} is not installed (Debian: iproute2, iputils-ping, iperf3)") from None
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run the tests as root"
    for tool in ("ip", "ping", "iperf3"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install iproute2 iputils-ping iperf3, as `make test` does)"
    probe = f"vmbt-probe-{secrets.token_hex(3)}"
    done = run(["ip", "netns", "add", probe], check=False)
    if done.returncode != 0:
        return f"ip netns add is refused on this machine: {done.stderr.strip()}"
    run(["ip", "netns", "del", probe], check=False)
    return None


def tap_unavailable() -> str | None:
    """Why TAP devices cannot be created here, or None."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return f"/dev/net/tun cannot be opened ({e.strerror}): no TAP devices on this machine"
    os.close(fd)
    return None


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``cond`` until it holds; NetnsError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not cond():
        if time.monotonic() > deadline:
            raise NetnsError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


class Netns:
    """One network namespace: run commands in it, configure its links."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Netns {self.name}>"

    def argv(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.argv(cmd), timeout, check)

    def popen(self, cmd: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args]).stdout

    def address(self, ifname: str, cidr: str) -> None:
        """Give ``ifname`` the address ``cidr`` and bring it (and loopback) up."""
        self.ip("addr", "add", cidr, "dev", ifname)
        self.ip("link", "set", "dev", ifname, "up")
        self.ip("link", "set", "dev", "lo", "up")

    def pids(self) -> list[int]:
        return [int(p) for p in run(["ip", "netns", "pids", self.name], check=False).stdout.split()]

    def listening(self, port: int) -> bool:
        return bool(self.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip())

    def delete(self) -> None:
        """Kill what still runs inside, then delete the namespace (and with it its veth and TAP devices)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run(["ip", "netns", "del", self.name], check=False)


@contextlib.contextmanager
def namespace(prefix: str = "vmbt") -> Iterator[Netns]:
    """A fresh namespace ``<prefix>-<random>``, deleted on exit whatever happened."""
    ns = Netns(f"{prefix}-{secrets.token_hex(4)}")
    run(["ip", "netns", "add", ns.name])
    try:
        yield ns
    finally:
        ns.delete()


def veth(a: Netns, b: Netns, cidr_a: str, cidr_b: str) -> tuple[str, str]:
    """A veth pair with one end in each namespace, addressed and up; returns the two interface names."""
    tag = secrets.token_hex(3)
    name_a, name_b = f"vmbta{tag}", f"vmbtb{tag}"
    run(["ip", "link", "add", name_a, "netns", a.name, "type", "veth", "peer", "name", name_b, "netns", b.name])
    a.address(name_a, cidr_a)
    b.address(name_b, cidr_b)
    return name_a, name_b


def tap_name() -> str:
    return f"vmbt{secrets.token_hex(4)}"


def ping(ns: Netns, target: str, count: int = 20, interval: float = 0.01, timeout: float = 60.0) -> dict[str, Any]:
    """Kernel ``ping`` from ``ns``; returns sent, received, loss % and the output."""
    out = ns.run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "5", target],
                 timeout=timeout, check=False)
    stats = {"sent": 0, "received": 0, "loss_pct": 100.0, "output": out.stdout + out.stderr}
    for line in out.stdout.splitlines():
        if "packets transmitted" in line:
            parts = [p.strip() for p in line.split(",")]
            stats["sent"] = int(parts[0].split()[0])
            stats["received"] = int(parts[1].split()[0])
            stats["loss_pct"] = float(next(p for p in parts if "packet loss" in p).split("%")[0])
    return stats


@contextlib.contextmanager
def iperf3_server(ns: Netns, bind: str, port: int = IPERF_PORT) -> Iterator[subprocess.Popen[str]]:
    """An ``iperf3 -s`` in ``ns``, listening before this yields, killed afterwards."""
    proc = ns.popen(["iperf3", "-s", "-B", bind, "-p", str(port)])
    try:
        wait_until(lambda: proc.poll() is not None or ns.listening(port), f"iperf3 -s in {ns.name}")
        if proc.poll() is not None:
            raise NetnsError(f"iperf3 -s in {ns.name} exited {proc.returncode}: {proc.communicate()[1].strip()}")
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def iperf3(ns: Netns, server: str, seconds: float = 2.0, reverse: bool = False, port: int = IPERF_PORT,
           on_start: Callable[[subprocess.Popen[str]], None] | None = None) -> dict[str, Any]:
    """One bounded iperf3 TCP run from ``ns``; the client's JSON summary: bits/s sent and received, retransmits,
    and the client's and server's CPU (iperf3's own ``cpu_utilization_percent``)."""
    cmd = ["iperf3", "-c", server, "-p", str(port), "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
    proc = ns.popen(cmd)
    if on_start is not None:
        on_start(proc)
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise NetnsError(f"iperf3 -c {server} did not finish within {seconds + 60:.0f} s") from None
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        raise NetnsError(f"iperf3 -c {server}: exit {proc.returncode}, no JSON: {err.strip() or out[:200]}") from None
    if "error" in doc:
        raise NetnsError(f"iperf3 -c {server}: {doc['error']}")
    end = doc["end"]
    return {"reverse": reverse, "seconds": seconds,
            "sent_bps": end["sum_sent"]["bits_per_second"], "received_bps": end["sum_received"]["bits_per_second"],
            "retransmits": end["sum_sent"].get("retransmits", 0),
            "cpu_pct": end.get("cpu_utilization_percent", {})}


# -- pytest fixtures (registered for tests/integration by its conftest) ----------------------------------------

@pytest.fixture
def netns_factory() -> Iterator[Callable[[], Netns]]:
    """``make()`` returns a new namespace; all are deleted after the test, pass or fail. Fails (never skips)
    where namespaces are not allowed, with the reason."""
    reason = unavailable()
    if reason is not None:
        pytest.fail(f"network namespaces unavailable: {reason}")
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(namespace())


@pytest.fixture
def tap_allowed() -> None:
    """Fails the test (never skips) where TAP devices cannot be created."""
    reason = tap_unavailable()
    if reason is not None:
        pytest.fail(f"TAP devices unavailable: {reason}")
