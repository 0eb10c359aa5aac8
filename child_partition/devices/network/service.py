"""The network device's service to the rest of the guest: the NetVSC's NIC, and on it the built-in IPv4
stack (ARP and ICMP echo, ``stack.py``) so other partitions can ping this one through the parent's switch.

Its address is derived from the partition's name (``stack.address_for_name``) unless ``--address`` says
otherwise. With ``--tap NAME`` (optionally ``--tap-netns NS``) the built-in stack does not run: the child
creates that TAP device and bridges it to the NIC (``tap_bridge.py``), so the host kernel's stack is the
guest's. The NIC outlives nothing: a new NetVSC (after a rescind or a reconnect) brings a new one, and the
stack moves to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from ipaddress import IPv4Interface
from typing import TYPE_CHECKING, Any

from vmbus_proto.aio.tap import IFNAMSIZ, TapError

from ...vsc import GuestContext, GuestService, GuestServiceError, Vsc
from .nic import Nic
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
        parser.add_argument("--net-queues", metavar="N", type=queues_arg,
                            help="channels the NIC may use, the primary and its NVSP sub-channels, as ethtool -L "
                                 "combined N (default 8, as Linux; the host may offer fewer; 1: no sub-channels)")

    async def start(self) -> None:
        if self.tap_netns and not self.tap_name:
            raise GuestServiceError("--tap-netns needs --tap NAME")
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

    def on_lost(self, vsc: Vsc) -> None:
        if self.nic is not None and getattr(vsc, "nic", None) is self.nic:
            self._stop_stack()
            self.nic = None
            self.nic_ready.clear()

    def _stop_stack(self) -> None:
        if self.bridge is not None:
            self.bridge.detach()
        if self.stack is not None:
            self.stack.close()
            self.stack = None
        if self._stack_task is not None:
            self._stack_task.cancel()
            self._stack_task = None

    async def close(self) -> None:
        task = self._stack_task
        self._stop_stack()
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
