"""The network device's service to the rest of the guest: the NetVSC's NIC, and on it the built-in IPv4
stack (ARP and ICMP echo, ``stack.py``) so other partitions can ping this one through the parent's switch.

Its address is derived from the partition's name (``stack.address_for_name``) unless ``--address`` says
otherwise. The NIC outlives nothing: a new NetVSC (after a rescind or a reconnect) brings a new one, and the
stack moves to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from ipaddress import IPv4Interface
from typing import TYPE_CHECKING, Any

from ...vsc import GuestContext, GuestService, Vsc
from .nic import Nic
from .stack import GuestStack, address_for_name

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


class NetworkService(GuestService):
    def __init__(self, ctx: GuestContext) -> None:
        super().__init__(ctx)
        address: IPv4Interface | None = ctx.options.get("address")
        self.address = address or address_for_name(ctx.name)
        self.run_stack: bool = ctx.options.get("guest_stack", True)  # ping brings its own stack
        self.nic: Nic | None = None
        self.nic_ready = asyncio.Event()
        self.stack: GuestStack | None = None
        self._stack_task: asyncio.Task[Any] | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--address", metavar="A/N", type=interface_arg,
                            help="this partition's IPv4 address and prefix on the virtual switch, for the built-in "
                                 "ARP/ICMP stack (default: derived from --name, in 10.0.0.0/8)")

    async def on_ready(self, vsc: Vsc) -> None:
        net: NetworkVsc = vsc  # type: ignore[assignment]  # this service's VSC is the NetVSC
        if net.nic is None:
            return
        self._stop_stack()
        self.nic = net.nic
        self.nic_ready.set()
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
        if self.stack is not None:
            self.stack.close()
            self.stack = None
        if self._stack_task is not None:
            self._stack_task.cancel()
            self._stack_task = None

    async def close(self) -> None:
        task = self._stack_task
        self._stop_stack()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
