"""``child-partition``: run a guest VM's VMBus side against a parent partition (what Linux's hv_vmbus and
its device drivers do in a Hyper-V guest)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from vmbus_proto.aio import logs, malloc
from vmbus_proto.aio.cli import ArgumentParser, add_version, connect_endpoint, vmbus_version_arg
from vmbus_proto.envelope import Hello
from vmbus_proto.errors import FrameError
from vmbus_proto.framing import ENVELOPE_VERSION
from vmbus_proto.versions import GUEST_ORDER, guest_order

from .devices.network.nic import Nic, NicError
from .devices.network.service import NetworkService, interface_arg
from .runner import ChildPartition
from .services import guest_services
from .vsc import GuestServiceError

if TYPE_CHECKING:
    from .devices.network.ping import NicFactory

DESCRIPTION = """\
A child partition: the guest side of VMBus. It connects to a parent partition (parent-partition serve),
negotiates a VMBus version, opens a channel for every device offered (storage, network, video, keyboard,
mouse) and keeps them running until interrupted."""

RUN_EPILOG = """\
exit status: 0 after a clean unload (SIGINT or SIGTERM); 1 when the parent cannot be reached or the session
ends and --no-reconnect is given; 2 for a mistake in the arguments; 3 when the parent refuses this child
for a reason retrying cannot fix (the name is taken, no VMBus version in common) or the --connect address
can never be connected to. The reason is the last line on stderr."""

JSON_LOGS_HELP = (f"log JSON lines (default: readable lines, coloured on a terminal; {logs.FORMAT_ENV}=json in the "
                  "environment asks for JSON too)")

URL_HELP = "the parent's address: tcp://HOST:PORT or unix:PATH, as given to parent-partition serve --listen"


def _name(text: str) -> str:
    """argparse type: a partition name the parent accepts (its HELLO rule: 1-64 printable characters)."""
    try:
        Hello.decode(Hello(ENVELOPE_VERSION, text).encode())
    except FrameError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {str(exc).removeprefix('HELLO ')}") from None
    return text


NAME_ENV = "VMBUS_NAME"


def default_name() -> str | None:
    """``run --name``'s default: ``$VMBUS_NAME``, else this host's name (a container's is unique: its ID, or
    its compose ``hostname:``). None when neither is a name the parent accepts."""
    for text in (os.environ.get(NAME_ENV, ""), socket.gethostname()):
        with contextlib.suppress(argparse.ArgumentTypeError):
            if text:
                return _name(text)
    return None


def _number(kind: Callable[[str], float], low: float, high: float | None = None) -> Callable[[str], float]:
    """argparse type: a number of ``kind`` in [low, high]."""
    def check(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}-{high:g}" if high is not None
                                             else f"{text} must be at least {low:g}")
        return value
    return check


def _size(text: str) -> str:
    """argparse type: a byte count as fio writes it (4k, 1M, 512)."""
    from .load.storage import parse_size  # noqa: PLC0415 - only the load tool needs it (and rich)

    try:
        if parse_size(text) <= 0:
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4k, 1M or 512") from None
    return text


def _output(text: str) -> str:
    """argparse type: a file that can be written when the run ends."""
    where = Path(text)
    if where.is_dir() or not where.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: not a file in an existing directory")
    return text


def _max_version(text: str) -> list[int]:
    """``--vmbus-max-version``: Linux's version list from that version down (hv_vmbus.max_version)."""
    try:
        return [int(v) for v in guest_order(vmbus_version_arg(text))]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PING_DESCRIPTION = """\
Send ICMP echo requests to another partition through the parent's virtual switch, as iputils ping does.
This partition connects with --name, brings up its NetVSC and runs a minimal IPv4 stack (ARP and ICMP echo)
on it. Addresses: each partition's is derived from its name (10.0.0.0/8, SHA-256 of the name), so TARGET may be
another partition's name or an IPv4 address."""

PING_EPILOG = "exit status: 0 when any reply came, 1 when none did (or the parent cannot be reached), 2 for a " \
              "mistake in the arguments or a target that is not on this network."


def _add_ping(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    ping = sub.add_parser("ping", help="ping another partition (ICMP echo over the NetVSC)",
                          description=PING_DESCRIPTION, epilog=PING_EPILOG)
    add_version(ping)
    ping.add_argument("--connect", required=True, metavar="URL", type=connect_endpoint, help=URL_HELP)
    ping.add_argument("--name", required=True, type=_name, help="this partition's name (unique among the children)")
    ping.add_argument("--address", metavar="A/N", type=interface_arg,
                      help="this partition's IPv4 address and prefix (default: derived from --name, in 10.0.0.0/8)")
    ping.add_argument("-c", dest="count", metavar="COUNT", type=_number(int, 1),
                      help="stop after COUNT requests (default: until interrupted)")
    ping.add_argument("-i", dest="interval", metavar="INTERVAL", type=_number(float, 0.001), default=1.0,
                      help="seconds between requests")
    ping.add_argument("-W", dest="timeout", metavar="TIMEOUT", type=_number(float, 0.001), default=10.0,
                      help="seconds to wait for each reply")
    ping.add_argument("-s", dest="size", metavar="SIZE", type=_number(int, 0, 65507), default=56,
                      help="data bytes per request (56 makes 84 with the IPv4 and ICMP headers)")
    ping.add_argument("target", metavar="TARGET", help="another partition's name, or an IPv4 address")


PROBE_DESCRIPTION = """\
Check that a parent partition serves VMBus: connect, negotiate a VMBus version (INITIATE_CONTACT, newest
first, as a Linux guest), take the offers, and UNLOAD cleanly, opening no channel. Prints one line saying what
was negotiated. For health checks (the docker-compose file's) and scripts."""


def _add_probe(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    probe = sub.add_parser("probe", help="check that a parent serves VMBus (negotiate, then unload)",
                           description=PROBE_DESCRIPTION,
                           epilog="exit status: 0 when the parent negotiated and unloaded, 1 when it did not (the "
                                  "reason is on stderr), 2 for a mistake in the arguments.")
    add_version(probe)
    probe.add_argument("--connect", required=True, metavar="URL", type=connect_endpoint, help=URL_HELP)
    probe.add_argument("--timeout", metavar="SECONDS", type=_number(float, 0.1), default=5.0,
                       help="give up after this long (default 5)")


def build_parser() -> argparse.ArgumentParser:
    versions = ", ".join(v.text for v in GUEST_ORDER)
    p = ArgumentParser(prog="child-partition", description=DESCRIPTION)
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="connect, negotiate, open every offered channel and run the guest",
                         description=DESCRIPTION, epilog=RUN_EPILOG)
    add_version(run)
    run.add_argument("--connect", required=True, metavar="URL", type=connect_endpoint, help=URL_HELP)
    run.add_argument("--name", type=_name, default=None,
                     help="this partition's name: 1-64 printable characters, unique among the parent's children "
                          f"(its disks are kept under that name); default: ${NAME_ENV}, else the host name, which "
                          "in a container is unique (its ID, or the compose hostname:)")
    run.add_argument("--trace", action="store_true", help="log every control message, decoded")
    offered = run.add_mutually_exclusive_group()
    offered.add_argument("--vmbus-version", action="append", metavar="V", type=vmbus_version_arg,
                         help=f"a VMBus version to offer, as 5.3; repeat for several, newest first; any known "
                              f"version, 1.1 and 0.13 too (default: {versions}, as a current Linux guest)")
    offered.add_argument("--vmbus-max-version", metavar="V", type=_max_version,
                         help="offer Linux's VMBus versions from V down, as hv_vmbus.max_version does; 6.0 "
                              "starts at 6.0, as kernels with the 2025 'default VMBus version 6.0' series")
    run.add_argument("--no-reconnect", action="store_true",
                     help="exit with the reason instead of waiting for the parent or reconnecting to it")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="least severe level logged")
    run.add_argument("--json-logs", action="store_true", help=JSON_LOGS_HELP)
    for service in guest_services():  # each guest service adds its own options (storage: --nbd, --no-console)
        service.add_arguments(run)
    _add_ping(sub)
    _add_probe(sub)
    load = sub.add_parser("load", help="generate load from one or many partitions",
                          description="Generate load on a parent's devices from partitions run in this process.")
    add_version(load)
    devices = load.add_subparsers(dest="device", required=True, metavar="DEVICE")
    st = devices.add_parser("storage", help="fio-style block I/O through StorVSC channels",
                            description="fio-style block I/O through StorVSC channels: each partition connects,\n"
                                        "opens its storage channel and keeps --iodepth SCSI requests in flight.")
    add_version(st)
    st.add_argument("--connect", required=True, metavar="URL", type=connect_endpoint, help=URL_HELP)
    st.add_argument("--rw", default="randread", choices=["read", "write", "randread", "randwrite", "randrw", "rw"],
                    help="I/O pattern, as fio's --rw")
    st.add_argument("--bs", default="4k", metavar="SIZE", type=_size, help="block size, a multiple of 512 (as 4k, 1M)")
    st.add_argument("--iodepth", metavar="N", type=_number(int, 1), default=32, help="requests in flight per partition")
    st.add_argument("--runtime", metavar="SECONDS", type=_number(float, 0.1), default=10.0, help="seconds to measure")
    st.add_argument("--ramp", metavar="SECONDS", type=_number(float, 0), default=0.5,
                    help="seconds of warm-up not measured")
    st.add_argument("--partitions", metavar="N", type=_number(int, 1), default=1,
                    help="guests to run from this process")
    st.add_argument("--size", metavar="SIZE", type=_size,
                    help="bytes of each disk to use, as 64M (default: the whole disk)")
    st.add_argument("--rwmixread", metavar="PERCENT", type=_number(int, 0, 100), default=50,
                    help="percent reads for randrw and rw")
    st.add_argument("--json", metavar="FILE", type=_output, help="also write the results as JSON to FILE")
    st.add_argument("--keep-disks", action="store_true",
                    help="leave the partitions' disks as the run left them (default: discard them at the end)")
    st.add_argument("--data-dir", metavar="DIR",
                    help="the parent's data directory (same host): also delete the images it created for the run")
    _add_load_network(devices)
    return p


def _add_load_network(devices: argparse._SubParsersAction[ArgumentParser]) -> None:
    net = devices.add_parser("network", help="frames between partitions through the parent's virtual switch",
                             description="Frames between partitions through the parent's virtual switch: each\n"
                                         "partition brings up its NetVSC, sends to its peers and counts what arrives.")
    add_version(net)
    net.add_argument("--connect", required=True, metavar="URL", type=connect_endpoint, help=URL_HELP)
    net.add_argument("--partitions", metavar="N", type=_number(int, 2), default=2,
                     help="guests to run from this process")
    net.add_argument("--frame-size", metavar="BYTES", type=_number(int, 64, 1514), default=64,
                     help="Ethernet frame length without the FCS, 64-1514")
    net.add_argument("--rate", metavar="FPS", type=_number(float, 1), help="frames/s per partition (default: as fast "
                     "as the NIC takes them)")
    net.add_argument("--window", metavar="FRAMES", type=_number(int, 1),
                     help="at most FRAMES of each partition's frames on their way, as a TCP window (default: no limit)")
    net.add_argument("--flows", default="ring", choices=["ring", "pairs", "all-to-all"],
                     help="who sends to whom: each to the next, in pairs (even N), or each to every other")
    net.add_argument("--runtime", metavar="SECONDS", type=_number(float, 0.1), default=10.0, help="seconds to measure")
    net.add_argument("--ramp", metavar="SECONDS", type=_number(float, 0), default=0.5,
                     help="seconds of warm-up not measured")
    net.add_argument("--json", metavar="FILE", type=_output, help="also write the results as JSON to FILE")


def main(argv: list[str] | None = None, *, nic_factory: NicFactory | None = None) -> int:
    """The command. ``nic_factory`` brings up the NIC ``ping`` uses (default: this partition's NetVSC)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.wants_json()
    except logs.LogFormatError as exc:
        parser.error(str(exc))
    if args.command == "ping":
        return _ping(args, nic_factory or vmbus_nic)
    if args.command == "probe":
        from .probe import probe  # noqa: PLC0415

        return uvloop.run(probe(args.connect, args.timeout))
    if args.command == "run" and args.name is None:
        args.name = default_name()
        if args.name is None:
            parser.error(f"run: give --name: neither ${NAME_ENV} nor the host name is a partition name")
    malloc.tune()
    if args.command == "load":
        from .load.network import main as load_network  # noqa: PLC0415
        from .load.storage import main as load_main  # noqa: PLC0415 - only the load tool needs rich and hdrh

        return load_network(args) if args.device == "network" else load_main(args)
    logs.setup(args.log_level, json=True if args.json_logs else None)
    return uvloop.run(_run(args))


_RUN_ARGS = {"command", "connect", "name", "trace", "vmbus_version", "vmbus_max_version", "no_reconnect", "log_level",
             "json_logs"}


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    options = {k: v for k, v in vars(args).items() if k not in _RUN_ARGS}  # the guest services' own options
    child = ChildPartition(args.connect, args.name, trace=args.trace,
                           versions=args.vmbus_version or args.vmbus_max_version,
                           reconnect=not args.no_reconnect, **options)
    try:
        status = await child.run(stop)
    except GuestServiceError as exc:
        print(f"child-partition: error: {exc}", file=sys.stderr)
        return 1
    if child.failure:
        print(f"child-partition: error: {child.failure}", file=sys.stderr, flush=True)
    return status


@contextlib.asynccontextmanager
async def vmbus_nic(args: argparse.Namespace) -> AsyncIterator[Nic]:
    """Bring this partition up (``--connect``, ``--name``, every offered device) and yield its NetVSC's NIC;
    on exit, shut it down cleanly (UNLOAD). Its own log lines go to stderr, at warning and above."""
    logs.setup("warning")
    child = ChildPartition(args.connect, args.name, reconnect=False, address=args.address, guest_stack=False)
    stop = asyncio.Event()
    running = asyncio.get_running_loop().create_task(child.run(stop))
    net = child.service(NetworkService)
    up = asyncio.ensure_future(net.nic_ready.wait())
    await asyncio.wait([running, up], return_when=asyncio.FIRST_COMPLETED)
    try:
        if not up.done():
            status = running.result()
            raise NicError(child.failure or f"the session ended before the NIC was up (status {status})")
        assert net.nic is not None
        yield net.nic
    finally:
        up.cancel()
        stop.set()
        with contextlib.suppress(Exception):
            await running


def _ping(args: argparse.Namespace, nic_factory: NicFactory | None) -> int:
    from .devices.network.ping import run_ping  # noqa: PLC0415 - only ping needs the guest stack

    if nic_factory is None:
        print("child-partition: error: ping: this child has no NetVSC NIC to ping from", file=sys.stderr)
        return 1

    async def interruptible() -> int:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        return await run_ping(args, nic_factory, stop=stop)

    return uvloop.run(interruptible())
