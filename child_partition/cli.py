"""``child-partition``: run a guest VM's VMBus side against a parent partition."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from vmbus_proto.aio import logs, malloc
from vmbus_proto.aio.endpoint import parse_endpoint
from vmbus_proto.versions import parse_version

from .nbd import parse_listen
from .runner import ChildPartition, NbdListenError


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
    load = sub.add_parser("load", help="generate load from one or many partitions")
    devices = load.add_subparsers(dest="device", required=True)
    st = devices.add_parser("storage", help="fio-style block I/O through StorVSC channels")
    st.add_argument("--connect", required=True, metavar="URL", help="tcp://HOST:PORT or unix:PATH")
    st.add_argument("--rw", default="randread", choices=["read", "write", "randread", "randwrite", "randrw", "rw"])
    st.add_argument("--bs", default="4k", help="block size (e.g. 4k, 1M)")
    st.add_argument("--iodepth", type=int, default=32, help="requests in flight per partition")
    st.add_argument("--runtime", type=float, default=10.0, help="seconds to measure")
    st.add_argument("--ramp", type=float, default=0.5, help="seconds of warm-up not measured")
    st.add_argument("--partitions", type=int, default=1, help="guests to run from this process")
    st.add_argument("--size", help="bytes of each disk to use (default: all)")
    st.add_argument("--rwmixread", type=int, default=50, help="percent reads for randrw/rw")
    st.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    st.add_argument("--keep-disks", action="store_true",
                    help="leave the partitions' disks as the run left them (default: discard them at the end)")
    st.add_argument("--data-dir", metavar="DIR",
                    help="the parent's data directory (same host): also delete the images it created for the run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    malloc.tune()
    if args.command == "load":
        from .load import main as load_main  # noqa: PLC0415 - only the load tool needs rich and hdrh

        return load_main(args)
    try:
        parse_endpoint(args.connect)
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
    try:
        return await child.run(stop)
    except NbdListenError as exc:
        print(f"child-partition: {exc}", file=sys.stderr)
        return 1
