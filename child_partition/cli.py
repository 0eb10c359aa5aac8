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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import uvloop

from vmbus_proto.aio import logs, malloc
from vmbus_proto.aio.cli import ArgumentParser, add_version, connect_endpoint, vmbus_version_arg
from vmbus_proto.aio.keyfile import secret_file_arg
from vmbus_proto.aio.tls import add_client_options, connect_url
from vmbus_proto.aio.transport import KEEPALIVE, KEEPALIVE_RULE, check_keepalive
from vmbus_proto.devices.plugins import PluginError
from vmbus_proto.envelope import Hello
from vmbus_proto.errors import FrameError
from vmbus_proto.framing import ENVELOPE_VERSION
from vmbus_proto.versions import GUEST_ORDER, guest_order

from .devices import load_vsc_plugin
from .devices.network.nic import Nic, NicError
from .devices.network.service import NetworkService, interface_arg
from .load.args import number as _number
from .runner import MEMORY_MODE_CHOICES, MEMORY_MODE_ENV, ChildPartition
from .services import guest_services
from .vsc import GuestServiceError, Vsc

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
can never be connected to, or authentication fails (a wrong or missing --secret-file, a parent that cannot
prove it holds the secret, or another connection authenticated under this name replaced this one), or TLS
does (the parent's certificate is not trusted, or the parent refuses this child's certificate or its lack of
one). The reason is the last line on stderr."""

SECRET_HELP = ("this partition's secret (at least 32 random bytes, or their hex; readable by this user only), "
               "proved to the parent without sending it; the parent must hold the same one for --name "
               "([[auth.partition]]). Without it the child connects unauthenticated, which a parent allows only "
               "for names it has no secret for, on loopback or a Unix socket")

JSON_LOGS_HELP = (f"log JSON lines (default: readable lines, coloured on a terminal; {logs.FORMAT_ENV}=json in the "
                  "environment asks for JSON too)")

URL_HELP = ("the parent's address: tcp://HOST:PORT, tls://HOST:PORT (with --tls-ca) or unix:PATH, as given to "
            "parent-partition serve --listen")


def _name(text: str) -> str:
    """argparse type: a partition name the parent accepts (its HELLO rule: 1-64 printable characters)."""
    try:
        Hello.decode(Hello(ENVELOPE_VERSION, text).encode())
    except FrameError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {str(exc).removeprefix('HELLO ')}") from None
    return text


def _keepalive(text: str) -> tuple[int, int, int]:
    """argparse type: ``IDLE,INTERVAL,COUNT`` (the parent's ``keepalive = [idle, interval, count]``)."""
    parts = text.split(",")
    try:
        return check_keepalive([int(x) if x.strip().isdigit() else x for x in parts])
    except ValueError:
        why = f"must be IDLE,INTERVAL,COUNT: {KEEPALIVE_RULE}, as 10,5,3"
        raise argparse.ArgumentTypeError(f"{text!r}: {why}") from None


NAME_ENV = "VMBUS_NAME"


def default_name() -> str | None:
    """``run --name``'s default: ``$VMBUS_NAME``, else this host's name (a container's is unique: its ID, or
    its compose ``hostname:``). None when neither is a name the parent accepts."""
    for text in (os.environ.get(NAME_ENV, ""), socket.gethostname()):
        with contextlib.suppress(argparse.ArgumentTypeError):
            if text:
                return _name(text)
    return None


def _plugin(ref: str) -> type[Vsc]:
    try:
        return load_vsc_plugin(ref)
    except PluginError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    ping.add_argument("--secret-file", dest="secret", metavar="PATH", type=secret_file_arg, help=SECRET_HELP)
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
    add_client_options(ping)


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
    probe.add_argument("--secret-file", dest="secret", metavar="PATH", type=secret_file_arg,
                       help="a secret the parent holds for the probe's name (probe-HOST-PID: a \"probe-*\" or \"*\" "
                            "[[auth.partition]] entry), needed where the parent takes only authenticated partitions")
    probe.add_argument("--timeout", metavar="SECONDS", type=_number(float, 0.1), default=5.0,
                       help="give up after this long")
    probe.add_argument("--wait", action="store_true",
                       help="while nothing listens at URL yet (connection refused, no socket file), try again until "
                            "--timeout: for scripts that start a parent and go on")
    add_client_options(probe)


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
    run.add_argument("--secret-file", dest="secret", metavar="PATH", type=secret_file_arg, help=SECRET_HELP)
    run.add_argument("--trace", action="store_true", help="log every control message, decoded")
    offered = run.add_mutually_exclusive_group()
    offered.add_argument("--vmbus-version", action="append", metavar="V", type=vmbus_version_arg,
                         help=f"a VMBus version to offer, as 5.3; repeat for several, newest first; any known "
                              f"version, 1.1 and 0.13 too (default: {versions}, as a current Linux guest)")
    offered.add_argument("--vmbus-max-version", metavar="V", type=_max_version,
                         help="offer Linux's VMBus versions from V down, as hv_vmbus.max_version does; 6.0 "
                              "starts at 6.0, as kernels with the 2025 'default VMBus version 6.0' series")
    run.add_argument("--keepalive", metavar="IDLE,INTERVAL,COUNT", type=_keepalive,
                     default=",".join(map(str, KEEPALIVE)),
                     help="TCP keepalive: seconds of silence before the first probe, seconds between probes, "
                          "unanswered probes before a silent parent is given up and reconnected to")
    run.add_argument("--memory-mode", choices=MEMORY_MODE_CHOICES,
                     help=f"shared: the guest's memory is a memfd the parent maps, rings and data stay in it, only "
                          f"events cross the socket (Unix sockets only); stream: everything travels as frames; auto: "
                          f"shared on unix: URLs (default: ${MEMORY_MODE_ENV}, else auto; docs/protocol.md 14)")
    run.add_argument("--no-reconnect", action="store_true",
                     help="exit with the reason instead of waiting for the parent or reconnecting to it")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="least severe level logged")
    run.add_argument("--json-logs", action="store_true", help=JSON_LOGS_HELP)
    run.add_argument("--device-plugin", dest="plugins", action="append", default=[], metavar="FILE.py:CLASS",
                     type=_plugin, help="also bind this VSC class (a Vsc subclass in a Python file, or "
                                        "package.module:Class) to its device's offers; may repeat")
    for service in guest_services():  # each guest service adds its own options (storage: --nbd, --no-console)
        service.add_arguments(run)
    add_client_options(run)
    _add_ping(sub)
    _add_probe(sub)
    # ``load`` has its own parser (child_partition.load.command), built only when it runs: main() hands it the
    # rest of the command line. This entry lists it in --help.
    sub.add_parser("load", help="generate load on the parent's devices from many partitions (see 'load --help')",
                   add_help=False)
    return p


def main(argv: list[str] | None = None, *, nic_factory: NicFactory | None = None) -> int:
    """The command. ``nic_factory`` brings up the NIC ``ping`` uses (default: this partition's NetVSC)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        logs.wants_json()
    except logs.LogFormatError as exc:
        build_parser().error(str(exc))
    if argv[:1] == ["load"]:
        from .load.command import main as load_main  # noqa: PLC0415 - only the load tool needs rich and hdrh

        malloc.tune()
        return load_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.connect = connect_url(args, f"child-partition {args.command}")
    except ValueError as exc:
        parser.error(f"{args.command}: {exc}")
    if args.command == "ping":
        return _ping(args, nic_factory or vmbus_nic)
    if args.command == "probe":
        from .probe import probe  # noqa: PLC0415

        return uvloop.run(probe(args.connect, args.timeout, args.secret, wait=args.wait))
    if args.command == "run" and args.name is None:
        args.name = default_name()
        if args.name is None:
            parser.error(f"run: give --name: neither ${NAME_ENV} nor the host name is a partition name")
    malloc.tune()
    logs.setup(args.log_level, json=True if args.json_logs else None)
    return uvloop.run(_run(args))


_RUN_ARGS = {"command", "connect", "name", "secret", "trace", "vmbus_version", "vmbus_max_version", "no_reconnect",
             "memory_mode",
             "log_level", "json_logs", "keepalive", "plugins", "tls_ca", "tls_cert", "tls_key", "tls_insecure"}


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    options = {k: v for k, v in vars(args).items() if k not in _RUN_ARGS}  # the guest services' own options
    child = ChildPartition(args.connect, args.name, trace=args.trace,
                           versions=args.vmbus_version or args.vmbus_max_version,
                           reconnect=not args.no_reconnect, secret=args.secret, keepalive=args.keepalive,
                           plugins=args.plugins, memory_mode=args.memory_mode, **options)
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
    child = ChildPartition(args.connect, args.name, reconnect=False, address=args.address, guest_stack=False,
                           secret=args.secret)
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
