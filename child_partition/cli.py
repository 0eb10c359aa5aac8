"""``child-partition``: run a guest VM's VMBus side against a parent partition."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from vmbus_proto.aio import logs
from vmbus_proto.versions import parse_version

from .nbd import parse_listen
from .runner import ChildPartition, parse_connect


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="child-partition", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="connect, negotiate, open every offered channel and run the guest")
    run.add_argument("--connect", required=True, metavar="URL", help="tcp://HOST:PORT or unix:PATH")
    run.add_argument("--name", required=True, help="this partition's name (unique per parent)")
    run.add_argument("--trace", action="store_true", help="log every control message, decoded")
    run.add_argument("--nbd", metavar="URL", help="export the VM's disk over NBD: HOST:PORT, tcp://HOST:PORT "
                                                 "or unix:PATH (qemu-img, qemu-io, nbdcopy can then use it)")
    run.add_argument("--vmbus-version", action="append", metavar="V",
                     help="versions to try, newest first (e.g. 5.3); default: 6.0 down to 0.13")
    run.add_argument("--no-reconnect", action="store_true", help="exit instead of reconnecting")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--json-logs", action="store_true", help="JSON log lines even on a terminal")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        parse_connect(args.connect)
        if args.nbd:
            parse_listen(args.nbd)
        versions = [int(parse_version(v)) for v in args.vmbus_version] if args.vmbus_version else None
    except ValueError as exc:
        print(f"child-partition: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level, json=True if args.json_logs else None)
    return uvloop.run(_run(args, versions))


async def _run(args: argparse.Namespace, versions: list[int] | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    child = ChildPartition(args.connect, args.name, trace=args.trace, versions=versions,
                           reconnect=not args.no_reconnect, nbd=args.nbd)
    return await child.run(stop)
