"""The network device's service to the rest of the guest: the NetVSC's NIC, and on it the built-in IPv4
stack (ARP and ICMP echo, ``stack.py``) so other partitions can ping this one through the parent's switch.

Its address is derived from the partition's name (``stack.address_for_name``) unless ``--address`` says
otherwise. With ``--tap NAME`` (optionally ``--tap-netns NS``) the built-in stack does not run: the child
creates that TAP device and bridges it to the NIC (``tap_bridge.py``), so the host kernel's stack is the
guest's. With ``--ping TARGET[,TARGET...]`` the partition pings those partitions (or addresses) every
``--ping-interval`` seconds once its session is up, for as long as it runs, and logs each reply's round-trip
time or its loss (``ping.ping_periodically``); ``--ping neighbours`` pings every host heard on the link
instead, as they come and go (``ping.ping_neighbours``), for when the other partitions' names are not known
up front (replicas of a compose service). The NIC outlives nothing: a new NetVSC (after a rescind or a
reconnect) brings a new one, and the stack (and the pinging) moves to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from ipaddress import IPv4Address, IPv4Interface
from typing import TYPE_CHECKING, Any

from vmbus_proto.aio.tap import IFNAMSIZ, TapError

from ...vsc import GuestContext, GuestService, GuestServiceError, Vsc
from .nic import Nic
from .ping import NEIGHBOURS, Watch, ping_neighbours, ping_periodically, ping_targets
from .stack import GuestStack, address_for_name
from .tap_bridge import TapBridge

if TYPE_CHECKING:
    from .vsc import NetworkVsc


def interface_arg(text: str) -> IPv4Interface:
    """argparse type: an IPv4 address with its prefix length, as 10.1.2.3/8."""
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: give the prefix length too, as 10.1.2.3/8")
    try:
        return IPv4Interface(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ifname_arg(text: str) -> str:
    """argparse type: a Linux interface name (1..15 bytes, no '/' or whitespace)."""
    if not 0 < len(text.encode()) < IFNAMSIZ or "/" in text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: an interface name is 1..{IFNAMSIZ - 1} bytes, "
                                         "without '/' or spaces")
    return text


def interval_arg(text: str) -> float:
    """argparse type: seconds between pings, 0.01 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0.01:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} must be at least 0.01 seconds")
    return value


def queues_arg(text: str) -> int:
    """argparse type: a NIC queue count, 1..64 (Linux VRSS_CHANNEL_MAX)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: a queue count is a whole number from 1 to 64")
    return value


class NetworkService(GuestService):
    def __init__(self, ctx: GuestContext) -> None:
        super().__init__(ctx)
        address: IPv4Interface | None = ctx.options.get("address")
        self.address = address or address_for_name(ctx.name)
        self.tap_name: str | None = ctx.options.get("tap")
        self.tap_netns: str | None = ctx.options.get("tap_netns")
        # ping brings its own stack; with a TAP the kernel's stack is the guest's
        self.run_stack: bool = ctx.options.get("guest_stack", True) and self.tap_name is None
        self.bridge: TapBridge | None = None
        self.nic: Nic | None = None
        self.nic_ready = asyncio.Event()
        self.stack: GuestStack | None = None
        self._stack_task: asyncio.Task[Any] | None = None
        self.ping_interval: float = ctx.options.get("ping_interval") or 1.0
        self.watches: list[Watch] = []  # run --ping: one per target, counts kept across NIC changes
        self.neighbours: dict[IPv4Address, Watch] | None = None  # run --ping neighbours: one per neighbour pinged
        self._pinger: asyncio.Task[None] | None = None
        self._session_seen = False  # a session was ready: a NIC that comes back later pings at once

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--address", metavar="A/N", type=interface_arg,
                            help="this partition's IPv4 address and prefix on the virtual switch, for the built-in "
                                 "ARP/ICMP stack (default: derived from --name, in 10.0.0.0/8)")
        parser.add_argument("--tap", metavar="NAME", type=ifname_arg,
                            help="create TAP device NAME (virtio-net headers, checksum and TSO offloads) and bridge "
                                 "it to the NIC: the host kernel's stack is this partition's (no built-in stack)")
        parser.add_argument("--tap-netns", metavar="NS",
                            help="move the --tap device into network namespace NS (ip netns)")
        parser.add_argument("--ping", metavar="TARGET[,TARGET...]", type=ping_targets,
                            help="once up, ping these partitions (names) or IPv4 addresses through the switch for as "
                                 "long as the partition runs, logging each reply's round-trip time or its loss; "
                                 f"'{NEIGHBOURS}': every partition heard on the switch (ARP, or traffic to this "
                                 "one), as they come and go, this partition announcing itself every few seconds")
        parser.add_argument("--ping-interval", metavar="SECONDS", type=interval_arg, default=1.0,
                            help="seconds between the pings of each --ping target (default 1); a reply later than "
                                 "this (and 1 s) counts as lost")
        parser.add_argument("--net-queues", metavar="N", type=queues_arg,
                            help="channels the NIC may use, the primary and its NVSP sub-channels, as ethtool -L "
                                 "combined N (default 8, as Linux; the host may offer fewer; 1: no sub-channels)")

    async def start(self) -> None:
        if self.tap_netns and not self.tap_name:
            raise GuestServiceError("--tap-netns needs --tap NAME")
        targets: list[str] = self.ctx.options.get("ping") or []
        if targets and not self.run_stack:
            raise GuestServiceError("--ping needs the built-in network stack; with --tap, run ping in the TAP's "
                                    "namespace instead")
        if targets == [NEIGHBOURS]:
            self.neighbours = {}
        else:
            try:
                self.watches = Watch.of(targets, self.address)
            except ValueError as exc:
                raise GuestServiceError(str(exc)) from None
        if self.tap_name:
            try:
                self.bridge = TapBridge.open(self.tap_name, self.tap_netns, self.log)
            except (TapError, OSError) as exc:
                raise GuestServiceError(f"cannot create TAP device {self.tap_name}: {exc}") from None
            self.log.info("TAP device created", tap=self.tap_name, netns=self.tap_netns or "")

    async def on_ready(self, vsc: Vsc) -> None:
        net: NetworkVsc = vsc  # type: ignore[assignment]  # this service's VSC is the NetVSC
        if net.nic is None:
            return
        self._stop_stack()
        self.nic = net.nic
        self.nic_ready.set()
        if self.bridge is not None:
            self.bridge.attach(net.nic)
            self.log.info("TAP bridged to the NIC", tap=self.tap_name, mac=net.nic.mac.hex(":"))
        if self.run_stack:
            self.stack = GuestStack(net.nic, self.address)
            self._stack_task = asyncio.get_running_loop().create_task(self.stack.run())
            self.log.info("guest network stack up", address=str(self.address))
            if self._session_seen:
                self._start_pinger()

    async def session_ready(self) -> None:
        """Every channel of the session is open: start pinging (not earlier, so the pings follow the bring-up
        in the log)."""
        self._session_seen = True
        if self._pinger is None:
            self._start_pinger()

    def _start_pinger(self) -> None:
        if self.neighbours is not None and self.stack is not None:
            self.log.info("pinging the neighbours heard on the switch", interval=self.ping_interval)
            self._pinger = asyncio.get_running_loop().create_task(
                ping_neighbours(self.stack, self.neighbours, self.ping_interval, self.log))
        elif self.watches and self.stack is not None:
            self.log.info("pinging", targets=[w.target for w in self.watches], interval=self.ping_interval)
            self._pinger = asyncio.get_running_loop().create_task(
                ping_periodically(self.stack, self.watches, self.ping_interval, self.log))

    def on_lost(self, vsc: Vsc) -> None:
        if self.nic is not None and getattr(vsc, "nic", None) is self.nic:
            self._stop_stack()
            self.nic = None
            self.nic_ready.clear()

    def _stop_stack(self) -> None:
        if self._pinger is not None:  # before the stack: closing it cancels the pinger's echo waits
            self._pinger.cancel()
            self._pinger = None
        if self.bridge is not None:
            self.bridge.detach()
        if self.stack is not None:
            self.stack.close()
            self.stack = None
        if self._stack_task is not None:
            self._stack_task.cancel()
            self._stack_task = None

    async def close(self) -> None:
        tasks = [t for t in (self._pinger, self._stack_task) if t is not None]
        self._stop_stack()
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
