"""``child-partition ping``: iputils ``ping`` over the guest stack. Same output (``PING``, one line per reply,
``From ... Destination Host Unreachable``, the statistics block) and exit status (0 when any reply came, 1 when
none did, 2 for a usage error).

:func:`ping` runs over any :class:`~.nic.Nic` and :class:`~.stack.GuestStack`. :func:`run_ping` is the
command: it takes the parsed arguments and a :data:`NicFactory` that brings up the NIC (the CLI passes the
NetVSC's, tests pass an in-memory one). :func:`ping_periodically` is ``child-partition run --ping``: a monitor
like ``fping -l`` that pings its targets for as long as the partition runs and logs every outcome.
:func:`ping_neighbours` is ``run --ping neighbours``: the same monitor over whichever hosts the stack has heard
on the link lately (``stack.Neighbours``), started and stopped as they come and go, at most
:data:`MAX_PINGED` at once; the stack announces itself (gratuitous ARP) every :data:`ANNOUNCE_EVERY` seconds
so that partitions which start at the same moment still find each other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from typing import Any, TextIO

from .nic import Nic, NicError
from .stack import ICMP, IPV4, EchoReply, GuestStack, HostUnreachable, address_for_name, target_address

#: Brings up a NIC for the parsed ``ping`` arguments (--connect, --name) and takes it down on exit.
NicFactory = Callable[[argparse.Namespace], AbstractAsyncContextManager[Nic]]

EXIT_REPLIED, EXIT_NO_REPLY, EXIT_USAGE = 0, 1, 2
LINK_WAIT = 5.0  # seconds to wait for carrier after the NIC comes up


@dataclass
class PingStats:
    transmitted: int = 0
    errors: int = 0
    rtts: list[float] = field(default_factory=list)  # seconds, one per reply

    def summary(self, label: str, elapsed: float) -> list[str]:
        """iputils' closing block."""
        received = len(self.rtts)
        loss = 100.0 * (self.transmitted - received) / self.transmitted if self.transmitted else 0.0
        errors = f", +{self.errors} errors" if self.errors else ""
        lines = ["", f"--- {label} ping statistics ---",
                 f"{self.transmitted} packets transmitted, {received} received{errors}, {loss:g}% packet loss, "
                 f"time {round(elapsed * 1000)}ms"]
        if received:
            ms = [rtt * 1000 for rtt in self.rtts]
            avg = sum(ms) / received
            mdev = math.sqrt(max(sum(t * t for t in ms) / received - avg * avg, 0.0))
            lines.append(f"rtt min/avg/max/mdev = {min(ms):.3f}/{avg:.3f}/{max(ms):.3f}/{mdev:.3f} ms")
        return lines


def format_ms(rtt: float) -> str:
    """A round-trip time as iputils prints it: three significant digits."""
    ms = rtt * 1000
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


async def ping(nic: Nic, stack: GuestStack, target: str, count: int | None, interval: float, timeout: float,
               size: int, out: TextIO, *, err: TextIO | None = None, stop: asyncio.Event | None = None) -> int:
    """Ping ``target`` (an address or a partition name) ``count`` times (None: until ``stop`` is set), one
    request every ``interval`` seconds, each waiting up to ``timeout`` for its reply, with ``size`` data bytes.
    Prints as iputils does (errors to ``err``, stderr by default) and returns the exit status."""
    err = err or sys.stderr
    try:
        dst = target_address(target)
    except ValueError as exc:
        print(f"ping: {exc}", file=err)
        return EXIT_USAGE
    if dst not in stack.address.network:
        print(f"ping: connect: Network is unreachable ({dst} is outside {stack.address.network})", file=err)
        return EXIT_USAGE
    if IPV4.size + ICMP.size + size > nic.mtu:
        print(f"ping: local error: message too long, mtu={nic.mtu}", file=err)
        return EXIT_USAGE
    stop = stop or asyncio.Event()
    data = bytes(i & 0xFF for i in range(size))
    ident = os.getpid() & 0xFFFF
    stats = PingStats()
    print(f"PING {target} ({dst}) {size}({size + IPV4.size + ICMP.size}) bytes of data.", file=out, flush=True)

    async def one(seq: int) -> None:
        try:
            reply = await stack.echo(dst, seq, data, ident=ident, timeout=timeout)
        except HostUnreachable:
            stats.errors += 1
            print(f"From {stack.ip} icmp_seq={seq} Destination Host Unreachable", file=out, flush=True)
            return
        if reply is not None:
            stats.rtts.append(reply.rtt)
            print(reply_line(reply), file=out, flush=True)

    start = stack.now()
    requests: set[asyncio.Task[None]] = set()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        seq = 0
        while (count is None or seq < count) and not stop.is_set() and not nic.closed:
            seq += 1
            stats.transmitted += 1
            requests.add(asyncio.create_task(one(seq)))
            if seq != count:
                await asyncio.wait([stopped], timeout=interval)
        # The last replies, each bounded by its own timeout; an interrupt cuts the wait short.
        while not stop.is_set() and (waiting := [task for task in requests if not task.done()]):
            await asyncio.wait([stopped, *waiting], return_when=asyncio.FIRST_COMPLETED)
        elapsed = stack.now() - start
    finally:
        for task in (*requests, stopped):
            task.cancel()
        await asyncio.gather(*requests, stopped, return_exceptions=True)
    for line in stats.summary(target, elapsed):
        print(line, file=out)
    out.flush()
    return EXIT_REPLIED if stats.rtts else EXIT_NO_REPLY


def reply_line(reply: EchoReply) -> str:
    return (f"{reply.size} bytes from {reply.source}: icmp_seq={reply.seq} ttl={reply.ttl} "
            f"time={format_ms(reply.rtt)} ms")


def own_address(args: argparse.Namespace) -> IPv4Interface:
    """``--address`` if given, else the one derived from ``--name``."""
    address: IPv4Interface | None = args.address
    return address if address is not None else address_for_name(args.name)


async def run_ping(args: argparse.Namespace, nic_factory: NicFactory, *, out: TextIO | None = None,
                   err: TextIO | None = None, stop: asyncio.Event | None = None) -> int:
    """The ``ping`` command: bring up the NIC, run the stack on it, ping, take it all down."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        async with nic_factory(args) as nic:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(nic.wait_link(), LINK_WAIT)
            if not nic.link_up:
                print("ping: connect: Network is unreachable (the NIC's link is down)", file=err)
                return EXIT_USAGE
            async with GuestStack(nic, own_address(args)) as stack:
                return await ping(nic, stack, args.target, args.count, args.interval, args.timeout, args.size,
                                  out, err=err, stop=stop)
    except (OSError, NicError) as exc:
        print(f"ping: {exc}", file=err)
        return EXIT_NO_REPLY


# -- ``child-partition run --ping``: a monitor, as fping -l, not a command ----------------------------------------

MIN_PERIODIC_TIMEOUT = 1.0  # a reply later than the interval (and at least this) counts as lost
NEIGHBOURS = "neighbours"  # ``--ping neighbours``: every host heard on the link (also spelt "neighbors")
MAX_PINGED = 32  # neighbours pinged at once: the first heard; the others wait for one of them to go
ANNOUNCE_EVERY = 5.0  # seconds between gratuitous ARPs while pinging neighbours


def ping_targets(text: str) -> list[str]:
    """argparse type for ``--ping``: comma-separated partition names or IPv4 addresses, or ``neighbours``."""
    if text.strip().lower() in (NEIGHBOURS, "neighbors"):
        return [NEIGHBOURS]
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more partition names or IPv4 addresses, "
                                         "separated by commas")
    for target in targets:
        try:
            target_address(target)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return targets


@dataclass
class Watch:
    """One ``--ping`` target and what came back from it over the partition's life (across NIC changes)."""

    target: str
    address: IPv4Address
    ident: int  # ICMP identifier, one per target so replies match their request
    sent: int = 0
    received: int = 0
    last_rtt: float | None = None  # seconds

    @classmethod
    def of(cls, targets: list[str], stack_address: IPv4Interface) -> list[Watch]:
        """One Watch per target; ValueError names a target that is not a host on this partition's network."""
        watches = []
        base = os.getpid()
        for i, target in enumerate(dict.fromkeys(targets)):
            address = target_address(target)
            network = stack_address.network
            if address not in network or address in (network.network_address, network.broadcast_address):
                raise ValueError(f"--ping {target}: {address} is not a host on this partition's network {network}")
            watches.append(cls(target, address, (base + i) & 0xFFFF))
        return watches

    @classmethod
    def neighbour(cls, address: IPv4Address, others: list[Watch]) -> Watch:
        """A watch on a neighbour found on the link (its address is its only name), with an ICMP identifier
        none of ``others`` uses."""
        used = {w.ident for w in others}
        ident = next(i for i in ((os.getpid() + n) & 0xFFFF for n in range(len(used) + 1)) if i not in used)
        return cls(str(address), address, ident)


async def ping_periodically(stack: GuestStack, watches: list[Watch], interval: float, log: Any,
                            size: int = 56) -> None:
    """Ping every target once per ``interval`` seconds until cancelled, logging each outcome: ``ping reply``
    (``rtt_ms``) or ``ping lost`` (``reason`` timeout or unreachable), each with the running ``sent`` and
    ``received`` counts. At most one request per target is on its way, so nothing queues up."""
    await asyncio.gather(*(_watch(stack, w, interval, log, size) for w in watches))


async def _watch(stack: GuestStack, w: Watch, interval: float, log: Any, size: int) -> None:
    data = bytes(i & 0xFF for i in range(size))
    timeout = max(interval, MIN_PERIODIC_TIMEOUT)
    fields = {"target": w.target, "address": str(w.address)}
    while not stack.nic.closed:
        started = stack.now()
        w.sent += 1
        seq = w.sent & 0xFFFF
        try:
            reply = await stack.echo(w.address, seq, data, ident=w.ident, timeout=timeout)
            reason = "timeout"
        except HostUnreachable:
            reply, reason = None, "unreachable"
        if reply is not None:
            w.received += 1
            w.last_rtt = reply.rtt
            log.info("ping reply", **fields, seq=seq, rtt_ms=round(reply.rtt * 1000, 3), sent=w.sent,
                     received=w.received)
        else:
            log.info("ping lost", **fields, seq=seq, reason=reason, sent=w.sent, received=w.received)
        await asyncio.sleep(max(0.0, started + interval - stack.now()))


async def ping_neighbours(stack: GuestStack, watches: dict[IPv4Address, Watch], interval: float, log: Any,
                          *, limit: int = MAX_PINGED, announce_every: float = ANNOUNCE_EVERY, size: int = 56) -> None:
    """Ping every neighbour the stack has heard (at most ``limit``) once per ``interval`` until cancelled, as
    :func:`ping_periodically` does for fixed targets: ``neighbour found`` starts a watch, ``neighbour gone`` (not
    heard for the stack's neighbour lifetime) ends it and forgets its counts. ``watches`` keeps the counts of
    the neighbours being pinged across NIC changes. Announces this partition every ``announce_every`` seconds."""
    pinging: dict[IPv4Address, asyncio.Task[None]] = {}
    announced = -math.inf
    try:
        while not stack.nic.closed:
            now = stack.now()
            if now - announced >= announce_every:
                stack.announce()
                announced = now
            heard = stack.neighbours.current(now)
            if len(watches) > limit:  # counts kept from before a NIC change, of neighbours not heard since
                for address in [a for a in watches if a not in pinging and a not in heard]:
                    del watches[address]
            for address in [a for a in pinging if a not in heard]:
                pinging.pop(address).cancel()
                w = watches.pop(address)
                log.info("neighbour gone", address=str(address), sent=w.sent, received=w.received)
            for address in heard:
                if address in pinging or len(pinging) >= limit:
                    continue
                w = watches.get(address) or watches.setdefault(address, Watch.neighbour(address, [*watches.values()]))
                log.info("neighbour found", address=str(address), pinging=len(pinging) + 1)
                pinging[address] = asyncio.get_running_loop().create_task(_watch(stack, w, interval, log, size))
            await asyncio.sleep(interval)
    finally:
        for task in pinging.values():
            task.cancel()
        await asyncio.gather(*pinging.values(), return_exceptions=True)
