"""``child-partition ping``: iputils' output and exit status, over two guest stacks on an in-memory NIC pair,
through :func:`ping`, :func:`run_ping` and the CLI's argument parsing (the NetVSC's factory replaced by the
in-memory one)."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Interface

import pytest

from child_partition import cli
from child_partition.devices.network import stack as stack_mod
from child_partition.devices.network.nic import LoopHub, Nic, nic_pair
from child_partition.devices.network.ping import (
    NicFactory,
    PingStats,
    Watch,
    format_ms,
    ping,
    ping_neighbours,
    ping_periodically,
    ping_targets,
    run_ping,
)
from child_partition.devices.network.stack import GuestStack, address_for_name

MAC_A, MAC_B = bytes.fromhex("00155d0000a1"), bytes.fromhex("00155d0000b2")
DEADLINE = 30.0
REPLY = re.compile(r"^64 bytes from (?P<ip>[\d.]+): icmp_seq=(?P<seq>\d+) ttl=64 time=(?P<ms>[\d.]+) ms$")
SUMMARY = re.compile(r"^(\d+) packets transmitted, (\d+) received(, \+(\d+) errors)?, ([\d.]+)% packet loss, "
                     r"time (\d+)ms$")
RTT = re.compile(r"^rtt min/avg/max/mdev = \d+\.\d{3}/\d+\.\d{3}/\d+\.\d{3}/\d+\.\d{3} ms$")


def vm(name: str) -> IPv4Interface:
    return address_for_name(name)


async def run(target: str, *, count: int | None = 3, interval: float = 0.01, timeout: float = DEADLINE,
              size: int = 56, with_b: bool = True, stop: asyncio.Event | None = None) -> tuple[int, str, str]:
    """Ping ``target`` from vm1 with vm2 on the other end of a NIC pair (or nobody there)."""
    a, b = nic_pair(MAC_A, MAC_B)
    out, err = io.StringIO(), io.StringIO()
    if not with_b:
        b.close()
    async with GuestStack(a, vm("vm1")) as sa, GuestStack(b, vm("vm2")):
        status = await asyncio.wait_for(ping(a, sa, target, count, interval, timeout, size, out, err=err,
                                             stop=stop), DEADLINE * 2)
    return status, out.getvalue(), err.getvalue()


def summary(text: str) -> tuple[int, int, int, str]:
    lines = text.splitlines()
    match = next((m for line in lines if (m := SUMMARY.match(line))), None)
    assert match, f"no statistics line in:\n{text}"
    return int(match[1]), int(match[2]), int(match[4] or 0), match[5]


async def test_ping_a_partition_by_name_prints_like_iputils() -> None:
    status, out, _ = await run("vm2")
    lines = out.splitlines()
    assert lines[0] == f"PING vm2 ({vm('vm2').ip}) 56(84) bytes of data.", f"header: {lines[0]!r}"
    replies = [m for line in lines if (m := REPLY.match(line))]
    assert sorted(int(m["seq"]) for m in replies) == [1, 2, 3], f"reply lines:\n{out}"
    assert all(m["ip"] == str(vm("vm2").ip) for m in replies), "reply from the wrong address"
    assert lines[-4:-2] == ["", "--- vm2 ping statistics ---"], f"statistics header:\n{out}"
    assert summary(out) == (3, 3, 0, "0"), f"summary:\n{out}"
    assert RTT.match(lines[-1]), f"rtt line: {lines[-1]!r}"
    assert status == 0, "exit status with replies is not 0"


async def test_ping_by_address_with_a_size() -> None:
    status, out, _ = await run(str(vm("vm2").ip), count=1, size=1000)
    ip = vm("vm2").ip
    assert out.startswith(f"PING {ip} ({ip}) 1000(1028) bytes of data.\n1008 bytes from {ip}: icmp_seq=1 "), out
    assert status == 0


async def test_no_reply_is_100_percent_loss_and_exit_1() -> None:
    status, out, _ = await run("vm2", count=2, timeout=0.05, with_b=False)
    assert summary(out) == (2, 0, 0, "100"), f"summary:\n{out}"
    assert "rtt" not in out and "bytes from" not in out, f"replies printed with nobody there:\n{out}"
    assert status == 1, "exit status without replies is not 1"


async def test_unanswered_arp_prints_destination_host_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_mod, "ARP_RETRANSMIT", 0.01)
    status, out, _ = await run("vm3", count=2)
    assert f"From {vm('vm1').ip} icmp_seq=1 Destination Host Unreachable" in out.splitlines(), out
    assert summary(out) == (2, 0, 2, "100"), f"summary:\n{out}"
    assert status == 1


async def test_interrupt_ends_an_endless_ping_with_its_statistics() -> None:
    stop = asyncio.Event()
    a, b = nic_pair(MAC_A, MAC_B)
    out = io.StringIO()
    async with GuestStack(a, vm("vm1")) as sa, GuestStack(b, vm("vm2")):
        pinging = asyncio.create_task(ping(a, sa, "vm2", None, 0.01, DEADLINE, 56, out, stop=stop))
        async with asyncio.timeout(DEADLINE):
            while out.getvalue().count("bytes from") < 3:
                await asyncio.sleep(0.005)
        stop.set()
        status = await asyncio.wait_for(pinging, DEADLINE)
    transmitted, received, _, _ = summary(out.getvalue())
    assert transmitted >= received >= 3 and status == 0, f"interrupted ping:\n{out.getvalue()}"


@pytest.mark.parametrize(("target", "size", "message"), [
    ("192.168.1.1", 56, "ping: connect: Network is unreachable"),
    ("fe80::1", 56, "ping: fe80::1: only IPv4 is supported"),
    ("vm2", 1473, "ping: local error: message too long, mtu=1500"),
])
async def test_usage_errors_exit_2(target: str, size: int, message: str) -> None:
    status, out, err = await run(target, size=size)
    assert err.startswith(message) and status == 2 and out == "", f"status {status}, stderr {err!r}"


def test_statistics_and_times_are_formatted_as_iputils() -> None:
    assert [format_ms(s) for s in (0.000411, 0.0012345, 0.012345, 0.12345)] == ["0.411", "1.23", "12.3", "123"]
    stats = PingStats(transmitted=3, rtts=[0.001, 0.002, 0.003])
    assert stats.summary("vm2", 2.0034) == [
        "", "--- vm2 ping statistics ---", "3 packets transmitted, 3 received, 0% packet loss, time 2003ms",
        "rtt min/avg/max/mdev = 1.000/2.000/3.000/0.816 ms"]
    assert PingStats(transmitted=3, rtts=[0.001]).summary("x", 0)[2] == \
        "3 packets transmitted, 1 received, 66.6667% packet loss, time 0ms"


# -- the command: run_ping and the CLI ---------------------------------------------------------------------------

def pair_factory(peer: str | None = "vm2") -> NicFactory:
    """A NIC factory as the NetVSC's would be: this end's NIC, with ``peer``'s stack on the other port."""
    @asynccontextmanager
    async def factory(args: argparse.Namespace) -> AsyncIterator[Nic]:
        ours, theirs = nic_pair(MAC_A, MAC_B)
        if peer is None:
            theirs.close()
        async with GuestStack(theirs, address_for_name(peer or "nobody")):
            try:
                yield ours
            finally:
                ours.close()
    return factory


def test_cli_ping_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["ping", "--connect", "unix:/run/vmbus.sock", "--name", "vm1", "-c", "2", "-i", "0.01",
                       "vm2"], nic_factory=pair_factory())
    out = capsys.readouterr().out
    assert status == 0 and summary(out) == (2, 2, 0, "0"), f"status {status}:\n{out}"


def test_cli_ping_with_nobody_there_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["ping", "--connect", "unix:/run/vmbus.sock", "--name", "vm1", "-c", "1", "-W", "0.05",
                       "vm2"], nic_factory=pair_factory(peer=None))
    out = capsys.readouterr().out
    assert status == 1 and summary(out) == (1, 0, 0, "100"), f"status {status}:\n{out}"


def test_cli_ping_with_a_configured_address(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["ping", "--connect", "unix:/s", "--name", "vm1", "--address", "192.168.7.1/24", "-c", "1",
                       "-W", "0.05", "192.168.7.2"], nic_factory=pair_factory())
    out = capsys.readouterr().out
    assert status == 1 and out.startswith("PING 192.168.7.2 (192.168.7.2)"), f"status {status}:\n{out}"


@pytest.mark.parametrize("argv", [
    ["ping", "--connect", "unix:/s", "--name", "vm1", "-c", "0", "vm2"],
    ["ping", "--connect", "unix:/s", "--name", "vm1", "-s", "-1", "vm2"],
    ["ping", "--connect", "unix:/s", "--name", "vm1", "-i", "x", "vm2"],
    ["ping", "--connect", "unix:/s", "--name", "vm1", "--address", "10.0.0.1", "vm2"],
    ["ping", "--connect", "unix:/s", "--name", "vm1"],
    ["ping", "--name", "vm1", "vm2"],
])
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv, nic_factory=pair_factory())
    assert exited.value.code == 2, f"{argv}: exit {exited.value.code}"
    assert "child-partition ping: error:" in capsys.readouterr().err, "usage error not explained"


async def test_run_ping_reports_a_nic_that_cannot_be_brought_up() -> None:
    @asynccontextmanager
    async def refused(args: argparse.Namespace) -> AsyncIterator[Nic]:
        raise ConnectionRefusedError("connect to unix:/s: Connection refused")
        yield  # type: ignore[unreachable]  # makes this a generator

    args = cli.build_parser().parse_args(["ping", "--connect", "unix:/s", "--name", "vm1", "vm2"])
    err = io.StringIO()
    assert await run_ping(args, refused, out=io.StringIO(), err=err) == 1, "a refused connection is not exit 1"
    assert err.getvalue() == "ping: connect to unix:/s: Connection refused\n", err.getvalue()


class Recorder:
    """A logger that keeps (event, fields) and wakes waiters on each line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []
        self.changed = asyncio.Event()

    def info(self, event: str, **fields: object) -> None:
        self.lines.append((event, fields))
        self.changed.set()

    async def wait(self, what: str, pred: Callable[[], bool]) -> None:
        async def until() -> None:
            while not pred():
                self.changed.clear()
                await self.changed.wait()
        try:
            await asyncio.wait_for(until(), DEADLINE)
        except TimeoutError:
            raise AssertionError(f"never logged {what}; last lines: {self.lines[-3:]}") from None

    def of(self, event: str) -> list[dict[str, object]]:
        return [fields for e, fields in self.lines if e == event]


async def test_periodic_ping_logs_each_reply_then_each_loss_and_stops_when_cancelled() -> None:
    a, b = nic_pair(MAC_A, MAC_B)
    log = Recorder()
    async with GuestStack(a, vm("vm1")) as sa, GuestStack(b, vm("vm2")):
        watches = Watch.of(["vm2", "vm2"], sa.address)  # a repeated target is pinged once
        assert [w.target for w in watches] == ["vm2"]
        task = asyncio.create_task(ping_periodically(sa, watches, 0.01, log))
        await log.wait("three replies", lambda: len(log.of("ping reply")) >= 3)
        first = log.of("ping reply")[0]
        assert first["target"] == "vm2" and first["address"] == str(vm("vm2").ip) and first["seq"] == 1, first
        assert [r["received"] for r in log.of("ping reply")[:3]] == [1, 2, 3]
        b.close()  # vm2 is gone: the next requests go unanswered
        await log.wait("a loss", lambda: bool(log.of("ping lost")))
        lost = log.of("ping lost")[0]
        replies = len(log.of("ping reply"))
        assert lost["reason"] == "timeout" and lost["sent"] == lost["seq"] == replies + 1, lost
        assert lost["received"] == replies, lost
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_pinging_neighbours_finds_each_one_pings_it_and_lets_it_go_when_it_goes_quiet() -> None:
    """Three partitions on a hub, each pinging its neighbours: each finds the other two (from their ARP) and
    gets replies; one leaves, the others log it gone once it has not been heard for the lifetime. With a
    limit of one, only the first neighbour heard is pinged."""
    hub = LoopHub()
    nics = {name: hub.attach(bytes([2, 0, 0, 0, 0, i])) for i, name in enumerate(("vm1", "vm2", "vm3"))}
    logs = {name: Recorder() for name in nics}
    async with GuestStack(nics["vm1"], vm("vm1")) as s1, GuestStack(nics["vm2"], vm("vm2")) as s2, \
            GuestStack(nics["vm3"], vm("vm3")) as s3:
        stacks = {"vm1": s1, "vm2": s2, "vm3": s3}
        for st in stacks.values():
            st.neighbours.lifetime = 1.0
        watches: dict[str, dict[IPv4Address, Watch]] = {name: {} for name in nics}
        tasks = [asyncio.create_task(ping_neighbours(stacks[n], watches[n], 0.02, logs[n], announce_every=0.2))
                 for n in ("vm1", "vm2")]
        tasks.append(asyncio.create_task(ping_neighbours(s3, watches["vm3"], 0.02, logs["vm3"], limit=1,
                                                         announce_every=0.2)))
        for me in ("vm1", "vm2"):
            for other in nics.keys() - {me}:
                address = str(vm(other).ip)
                await logs[me].wait(f"{me}: a reply from {other}",
                                    lambda me=me, a=address: any(r["address"] == a for r in logs[me].of("ping reply")))
        await logs["vm3"].wait("vm3: a reply", lambda: bool(logs["vm3"].of("ping reply")))
        assert len(logs["vm3"].of("neighbour found")) == 1, f"vm3 pings more than its limit: {logs['vm3'].lines}"
        tasks[2].cancel()
        nics["vm3"].close()  # vm3 leaves the switch
        gone = str(vm("vm3").ip)
        for me in ("vm1", "vm2"):
            await logs[me].wait(f"{me}: vm3 gone", lambda me=me: any(g["address"] == gone
                                                                     for g in logs[me].of("neighbour gone")))
            assert vm("vm3").ip not in watches[me], f"{me} still keeps counts for vm3"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_ping_neighbours_is_a_target_of_its_own() -> None:
    assert ping_targets("neighbours") == ping_targets("Neighbors") == ["neighbours"]


@pytest.mark.parametrize(("targets", "message"), [("vm2,,", None), (",", "give one or more"),
                                                  ("vm2,::1", "only IPv4 is supported")])
def test_ping_targets_are_names_or_ipv4_addresses(targets: str, message: str | None) -> None:
    if message is None:
        assert ping_targets(targets) == ["vm2"]
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            ping_targets(targets)


def test_a_ping_target_off_the_network_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("not a host on this partition's network 10.0.0.0/8")):
        Watch.of(["10.255.255.255"], vm("vm1"))
