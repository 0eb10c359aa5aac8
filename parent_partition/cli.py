"""``parent-partition``: the VMBus host daemon's command line (the Hyper-V host's VMBus server and VSPs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

import uvloop

from vmbus_proto.aio import logs, malloc
from vmbus_proto.aio.cli import ArgumentParser, add_version, endpoint
from vmbus_proto.aio.keyfile import SecretFileError, new_secret_file, token_file_arg
from vmbus_proto.devices.registry import REGISTRY

from .auth import MODES, OPEN_ON_LOOPBACK, REQUIRED, PartitionSecret, name_pattern
from .config import (
    DEFAULT_TCP,
    DEFAULT_UNIX,
    LOG_LEVELS,
    WORKER_COMMAND,
    Config,
    ConfigError,
    tables_help,
    worker_count,
    workers_setting,
)
from .daemon import ParentDaemon, StartupError
from .web.settings import DEFAULT_HTTP, http_address

DEFAULT_API = f"http://{DEFAULT_HTTP}"

DESCRIPTION = f"""\
The parent partition: a VMBus host that offers its devices ({", ".join(e.name for e in REGISTRY if e.enabled)})
to the child partitions that connect to it (child-partition run --connect URL --name NAME)."""

CONFIG_HELP = "TOML file of settings; flags override it. Tables: {tables}. See README.md. (default: none)"

EPILOG = """\
exit status: 0 after a clean shutdown (SIGINT or SIGTERM), 1 when a listener cannot be bound,
2 for a mistake in the flags or the configuration (the message names it)."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="parent-partition", description=DESCRIPTION)
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the VMBus host with every device's VSP",
                           description=DESCRIPTION, epilog=EPILOG)
    add_version(serve)
    serve.add_argument("--listen", action="append", metavar="URL", type=endpoint,
                       help=f"tcp://HOST:PORT (port 0: any free port) or unix:PATH to accept children on; "
                            f"may repeat (default: {DEFAULT_TCP} and {DEFAULT_UNIX}, or [parent] listen)")
    serve.add_argument("--data-dir", metavar="DIR",
                       help="directory for the partitions' disk images, created if missing "
                            "(default: ./var, or [parent] data_dir)")
    serve.add_argument("--config", metavar="FILE", help=CONFIG_HELP.format(tables=tables_help()))
    serve.add_argument("--workers", metavar="N", type=_workers,
                       help="worker processes serving the partitions: a number, or 'auto' for one per core; 1 "
                            "runs everything in this process (default: auto, or [parent] workers)")
    serve.add_argument("--trace", action="store_true", help="log every control message, decoded")
    serve.add_argument("--log-level", choices=LOG_LEVELS,
                       help="least severe level logged (default: info, or [parent] log_level)")
    serve.add_argument("--json-logs", action="store_true",
                       help=f"log JSON lines (default: readable lines, coloured on a terminal; {logs.FORMAT_ENV}=json "
                            "in the environment asks for JSON too)")
    serve.add_argument("--http", metavar="HOST:PORT", type=_http,
                       help=f"where the JSON API, /metrics and the web console listen; 'none' turns them off "
                            f"(default: {DEFAULT_HTTP}, or [http] listen; a busy default is skipped with a warning)")
    serve.add_argument("--http-token-file", metavar="FILE",
                       help="the token every HTTP request must carry (a Bearer header, or the cookie a browser gets "
                            "from ?token=); needed to listen off loopback (default: none, or [http] token_file)")
    serve.add_argument("--auth-mode", choices=MODES,
                       help=f"who may connect: {REQUIRED!r}, every partition proves its secret; {OPEN_ON_LOOPBACK!r}, "
                            f"partitions with no secret may connect on loopback and Unix listeners (default: "
                            f"{OPEN_ON_LOOPBACK}, or [auth] mode)")
    serve.add_argument("--partition-secret", action="append", metavar="NAME=FILE", type=_partition_secret,
                       help='a partition (or a name prefix ending in "*") and its secret file, as an '
                            "[[auth.partition]] table; may repeat (for containers with no config file)")
    keys = sub.add_parser("send-keys", help="type text or press keys in a partition, through the parent's API",
                          description="Type TEXT into partition NAME's keyboard (US layout; characters outside it "
                                      "go as unicode events), then press --keys, through the parent's JSON API.",
                          epilog="example: parent-partition send-keys vm1 $'ls\\n'; "
                                 "parent-partition send-keys --keys ctrl+alt+del vm1\n"
                                 "exit status: 0 once the parent took every key, 1 when it refused (the message "
                                 "says why) or cannot be reached, 2 for a mistake in the arguments.")
    add_version(keys)
    keys.add_argument("--api", metavar="URL", default=DEFAULT_API,
                      help="the parent's HTTP address, its serve --http")
    keys.add_argument("--token-file", dest="token", metavar="FILE", type=token_file_arg,
                      help="the file holding the parent's API token (its [http] token_file), sent as a Bearer "
                           "token; needed when the parent has one")
    keys.add_argument("--keys", metavar="KEYS",
                      help='named keys and chords pressed after TEXT, whitespace-separated: "ctrl+alt+del", '
                           '"Escape", "shift+Tab Enter"')
    keys.add_argument("name", metavar="NAME", help="the partition (its child-partition run --name)")
    keys.add_argument("text", metavar="TEXT", nargs="?", help="text to type (a newline presses Enter)")
    sub.add_parser("demo", help="a parent and three children as real processes, narrated (see demo --help)",
                   add_help=False)
    _add_secret(sub)
    return p


SECRET_EPILOG = """example: parent-partition secret new vm1 --dir secrets >> parent.toml
then:    child-partition run --connect URL --name vm1 --secret-file secrets/vm1.key
exit status: 0 once the file is written, 1 when it cannot be (it exists, or the directory cannot be made)."""


def _add_secret(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    secret = sub.add_parser("secret", help="make a partition's secret file ([[auth.partition]], --secret-file)",
                            description="Partition secrets: each configured partition proves it holds its secret "
                                        "when it connects (docs/protocol.md 3.1).")
    add_version(secret)
    what = secret.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = what.add_parser("new", help="write a new random secret for a partition, mode 0600",
                          description="Write 32 random bytes, as hex, to DIR/NAME.key (mode 0600; an existing file "
                                      "is never overwritten) and print the [[auth.partition]] table that names it "
                                      "on stdout, ready to append to the parent's config file.",
                          epilog=SECRET_EPILOG)
    new.add_argument("--dir", metavar="DIR", default="secrets",
                     help="directory for the file, created (mode 0700) if missing")
    new.add_argument("name", metavar="NAME", type=_secret_name,
                     help='the partition\'s name, or a name prefix ending in "*" for a secret that partitions '
                          'named so share (the load tool\'s: "--name-prefix P" and "P-*"; "*" alone: every name, '
                          'written to all.key)')


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_COMMAND]:  # a worker process of a supervisor (workers.py), not for people
        from .workers import worker_main  # noqa: PLC0415

        return worker_main(argv[1:], build_parser())
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main  # noqa: PLC0415 - keeps rich off the daemon's import path

        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.wants_json()
    except logs.LogFormatError as exc:
        parser.error(str(exc))
    if args.command == "secret":
        return _new_secret(args.name, args.dir)
    if args.command == "send-keys":
        if not args.text and not args.keys:
            parser.error("send-keys: give TEXT to type, --keys to press, or both")
        from .web.client import run  # noqa: PLC0415 - aiohttp's client only for this command

        return run(args.api, args.name, args.text, args.keys, args.token)
    try:
        config = serve_config(args)
    except ConfigError as exc:
        return _fail(exc, 2)
    if worker_count(config) > 1:
        from .workers import line_writer  # noqa: PLC0415

        logs.setup(config.log_level, line_writer(), json=True if args.json_logs else None)
    else:
        logs.setup(config.log_level, json=True if args.json_logs else None)
    malloc.tune()
    try:
        if worker_count(config) > 1:
            from .workers import supervise  # noqa: PLC0415

            uvloop.run(supervise(config, argv))
        else:
            uvloop.run(serve(config))
    except ConfigError as exc:
        return _fail(exc, 2)
    except (StartupError, OSError) as exc:
        return _fail(exc, 1)
    return 0


def serve_config(args: argparse.Namespace) -> Config:
    """The configuration ``serve``'s flags and file give (a worker process makes it again from the same ones)."""
    config = Config.load(args.config)
    if args.listen:
        config.listen = args.listen
    if args.data_dir:
        config.data_dir = args.data_dir
    if args.trace:
        config.trace = True
    if args.log_level:
        config.log_level = args.log_level
    if args.http:
        config.http.listen, config.http.explicit = args.http, True
    if args.auth_mode:
        config.auth.mode = args.auth_mode
    if args.workers:
        config.workers = args.workers
    if args.http_token_file:
        config.http.token_file = args.http_token_file
        config.http.load_token("--http-token-file")
    if args.partition_secret:
        config.auth.partition += args.partition_secret
        config.auth.load_secrets("--partition-secret")
    return config


def _workers(text: str) -> int | str:
    try:
        return workers_setting(text if text == "auto" else int(text) if text.isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _http(text: str) -> str:
    try:
        return http_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _partition_secret(text: str) -> PartitionSecret:
    name, eq, path = text.partition("=")
    try:
        if not eq or not path:
            raise ValueError("must be NAME=FILE, as in vm1=secrets/vm1.key")
        return PartitionSecret(name_pattern(name), path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _secret_name(text: str) -> str:
    try:
        name = name_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if "/" in name or name.startswith("."):
        raise argparse.ArgumentTypeError(f"{text!r}: a name for a secret file has no '/' and no leading '.'")
    return name


def _new_secret(name: str, directory: str) -> int:
    where = Path(directory)
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = new_secret_file(where / f"{name.removesuffix('*') or 'all'}.key")  # "*": every name
    except OSError as exc:
        return _fail(SecretFileError(f"directory {where}: {exc.strerror or exc}"), 1)
    except SecretFileError as exc:
        return _fail(exc, 1)
    print(f"# {path}: a new secret for partition {name!r}; the child runs with --secret-file {path}\n"
          f"[[auth.partition]]\nname = {json.dumps(name)}\nsecret_file = {json.dumps(str(path))}")
    return 0


def _fail(exc: Exception, status: int) -> int:
    print(f"parent-partition: error: {exc}", file=sys.stderr)
    return status


async def serve(config: Config) -> None:
    daemon = ParentDaemon(config, gc_settle=True)  # a long-running process: see gc_policy
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before start: a signal right after "listening" is clean
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    web_server = None
    if config.http.enabled:
        from .web import console  # noqa: PLC0415 - aiohttp and prometheus-client only when serving HTTP
        from .web.server import WebServer  # noqa: PLC0415

        web_server = WebServer(daemon, config.http, plugins=[console.setup])
        try:
            await web_server.start()
        except BaseException:
            await daemon.shutdown()
            raise
    await stop.wait()
    if web_server is not None:
        await web_server.stop()
    await daemon.shutdown()
