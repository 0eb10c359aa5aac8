"""The console's built-in commands, as a tiny shell runs them: ``help``, ``channels``, ``disk``, ``ping``, ``clear``,
``uptime``, ``whoami``. Each writes its output a line at a time through ``Shell.say``; ``ping`` is iputils' (the
same lines as ``child-partition ping``), run over the network service's guest stack while the console stays
responsive, and Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import io
import shlex
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..devices.network.ping import ping
from ..devices.network.service import NetworkService
from ..devices.storage.service import StorageService
from .terminal import ACCENT, DIM, FG, GREEN, RED, RGB, YELLOW

if TYPE_CHECKING:
    from .service import ConsoleService

PING_INTERVAL = 1.0
PING_TIMEOUT = 2.0
PING_MAX = 1000


def human(n: int) -> str:
    """Bytes as 512 B, 4.0 KiB, 1.5 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class _Lines(io.StringIO):
    """A text stream whose complete lines go to the console (what ``ping`` prints to)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self._say = say
        self._partial = ""

    def write(self, s: str) -> int:
        *lines, self._partial = (self._partial + s).split("\n")
        for line in lines:
            self._say(line)
        return len(s)


class _Usage(Exception):
    pass


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # raise, not exit
        raise _Usage(f"{self.prog}: {message}")


def _count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= PING_MAX:
        raise ValueError
    return value


_PING = _ArgParser(prog="ping", add_help=False)
_PING.add_argument("-c", dest="count", type=_count, default=4)
_PING.add_argument("target")


class Shell:
    """Runs a typed line; ``say`` writes an output line (and logs it)."""

    def __init__(self, console: ConsoleService) -> None:
        self.console = console
        self.commands: dict[str, tuple[Callable[[list[str]], Awaitable[None]], str]] = {
            "help": (self.help, "this list"),
            "channels": (self.channels, "the VMBus channels, their states and sub-channels"),
            "disk": (self.disk, "the disks: size, identity, I/O done"),
            "ping": (self.ping, "ping NAME|ADDR [-c N]: ICMP echo to another partition"),
            "uptime": (self.uptime, "how long this partition has run, its sessions"),
            "whoami": (self.whoami, "this partition's name, address and screen"),
            "clear": (self.clear, "clear the events pane"),
        }

    def say(self, text: str, colour: RGB = FG) -> None:
        self.console.say(text, colour)

    async def run(self, line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.say(f"console: {exc}", RED)
            return
        if not words:
            return
        entry = self.commands.get(words[0])
        if entry is None:
            self.say(f"{words[0]}: command not found (type 'help')", RED)
            return
        await entry[0](words[1:])

    async def help(self, args: list[str]) -> None:
        for name, (_, what) in self.commands.items():
            self.say(f"{name:<9} {what}", ACCENT if name == "help" else FG)

    async def channels(self, args: list[str]) -> None:
        rows = self.console.channel_rows(detail=True)
        if not rows:
            self.say("no channels: not connected to the parent", YELLOW)
        for row in rows:
            version = f"  {row.version}" if row.version else ""
            self.say(f"relid {row.relid:<3} {row.device:<10} {row.state:<8}{version}  {row.subchannels}".rstrip(),
                     GREEN if row.state == "open" else YELLOW)

    async def disk(self, args: list[str]) -> None:
        storage = self.console.peer(StorageService)
        if storage is None or not storage.disks:
            self.say("no disks: the storage channel has reported no LUN", YELLOW)
            return
        for lun, d in sorted(storage.disks.items()):
            ident = f"{d.vendor} {d.product}".strip() or "unknown"
            state = "attached" if d.disk is not None else "waiting for its channel"
            mode = "read-only" if d.read_only else "read-write"
            self.say(f"lun {lun}: {human(d.size)} ({d.size // d.block_size} x {d.block_size} B) {ident}, {mode}, "
                     f"{state}", FG)
            self.say(f"        {d.reads} reads ({human(d.bytes_read)}), {d.writes} writes "
                     f"({human(d.bytes_written)})", DIM)

    async def ping(self, args: list[str]) -> None:
        try:
            opts = _PING.parse_args(args)
        except _Usage as exc:
            self.say(f"{exc} (usage: ping NAME|ADDR [-c N], N 1-{PING_MAX})", RED)
            return
        net = self.console.peer(NetworkService)
        if net is None or net.nic is None or net.stack is None:
            self.say("ping: no network: the NIC is not up (or runs --tap, with the host's stack)", RED)
            return
        out, err = _Lines(self.say), _Lines(lambda line: self.say(line, RED))
        await ping(net.nic, net.stack, opts.target, opts.count, PING_INTERVAL, PING_TIMEOUT, 56, out, err=err,
                   stop=self.console.job_stop)

    async def uptime(self, args: list[str]) -> None:
        c = self.console
        p = c.ctx.partition
        sessions = p.sessions if p is not None else 0
        opened = sum(1 for row in c.channel_rows() if row.state == "open")
        self.say(f"up {c.uptime()}, {sessions} session{'s' if sessions != 1 else ''} with the parent, "
                 f"VMBus {c.vmbus_version() or 'not connected'}, {opened} channels open", FG)

    async def whoami(self, args: list[str]) -> None:
        c = self.console
        net = c.peer(NetworkService)
        self.say(f"partition {c.ctx.name}", GREEN)
        if net is not None:
            mac = net.nic.mac.hex(":") if net.nic is not None else "no NIC"
            self.say(f"address {net.address}, MAC {mac}", FG)
        if c.renderer is not None:
            r = c.renderer
            self.say(f"screen {r.width}x{r.height}, console {r.cols}x{r.rows} cells of {r.cell_w}x{r.cell_h}", FG)

    async def clear(self, args: list[str]) -> None:
        self.console.clear()
