"""``parent-partition``: the VMBus host daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from vmbus_proto.aio import logs, malloc

from .config import Config
from .daemon import ParentDaemon


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parent-partition", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the VMBus host with the storage, network, video and HID VSPs")
    serve.add_argument("--listen", action="append", metavar="URL",
                       help="tcp://HOST:PORT or unix:PATH; may repeat (default: tcp://127.0.0.1:6464 and "
                            "unix:./run/vmbus.sock)")
    serve.add_argument("--data-dir", metavar="DIR", help="where disks live (default ./var)")
    serve.add_argument("--config", metavar="FILE", help="TOML file ([parent] and [devices] tables)")
    serve.add_argument("--trace", action="store_true", help="log every control message, decoded")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--json-logs", action="store_true", help="JSON log lines even on a terminal")
    sub.add_parser("demo", help="a parent and three children as real processes, narrated (see --help)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main  # noqa: PLC0415 - keeps rich off the daemon's import path

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = Config.load(args.config)
    except (OSError, ValueError) as exc:
        print(f"parent-partition: {exc}", file=sys.stderr)
        return 2
    if args.listen:
        config.listen = args.listen
    if args.data_dir:
        config.data_dir = args.data_dir
    if args.trace:
        config.trace = True
    if args.log_level:
        config.log_level = args.log_level
    logs.setup(config.log_level, json=True if args.json_logs else None)
    malloc.tune()
    try:
        uvloop.run(serve(config))
    except OSError as exc:
        print(f"parent-partition: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(config: Config) -> None:
    daemon = ParentDaemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    await stop.wait()
    await daemon.shutdown()
