"""Command-line conventions shared by ``parent-partition`` and ``child-partition``.

What users of Unix tools expect: ``--help`` shows every default, ``--version`` prints the package's
version, and a mistake on the command line costs one line on stderr (``prog: error: ...``) and exit 2,
the status argparse and most tools give a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import metadata
from typing import NoReturn

from vmbus_proto.versions import Version, parse_version

from .endpoint import parse_endpoint

EXIT_USAGE = 2


def package_version() -> str:
    try:
        return metadata.version("vmbus-emu")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option that has a default shows it (flags and unset options do
    not: 'default: None' and 'default: False' say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: what is wrong and where to look."""

    def __init__(self, *args: object, **kw: object) -> None:
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")


def checked_url(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that checks a URL with ``parse`` and returns it as given."""
    def check(url: str) -> str:
        try:
            parse(url)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return url
    return check


endpoint = checked_url(parse_endpoint)
"""argparse type: a ``tcp://HOST:PORT``, ``tls://HOST:PORT`` or ``unix:PATH`` URL (checked, returned as given)."""


def connect_endpoint(url: str) -> str:
    """argparse type: an endpoint a child can connect to (port 0 only makes sense for listening)."""
    endpoint(url)
    kind, _, port = parse_endpoint(url)
    if kind in ("tcp", "tls") and port == 0:
        raise argparse.ArgumentTypeError(f"{url!r}: port 0 cannot be connected to; give the parent's port")
    return url


def vmbus_version(text: str) -> int:
    """A VMBus version as '5.3', 'WIN10_V5_3' or '0x50003'; the error lists the versions there are."""
    try:
        return int(parse_version(text))
    except ValueError:
        known = ", ".join(v.text for v in sorted(Version))
        raise ValueError(f"{text!r} is not a VMBus version (known: {known})") from None


def vmbus_version_arg(text: str) -> int:
    """argparse type for :func:`vmbus_version`."""
    try:
        return vmbus_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def os_reason(exc: OSError) -> str:
    """An OSError as its reason alone ('address already in use'), without errno numbers or addresses."""
    text = exc.strerror or str(exc)
    if text.startswith("error while attempting"):  # asyncio/uvloop: "... on address ('h', p): reason"
        text = text.rpartition(": ")[2]
    return text
