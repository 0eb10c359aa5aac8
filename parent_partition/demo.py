"""``parent-partition demo``: a parent and three child partitions as real processes, narrated.

Starts ``parent-partition serve`` on its embedded defaults (TCP on 127.0.0.1 and a Unix socket under
./run/), then three ``child-partition run`` processes, two over TCP and one over the Unix socket, each with
``--trace``. Their JSON log lines are merged into one readable view: the VMBus version negotiation, the
five offers, the ring GPADLs, the opens and each device's protocol handshake. Ctrl-C (or --duration)
stops the children first (each closes, tears down and unloads) and then the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from .config import DEFAULT_TCP, DEFAULT_UNIX

CHILDREN = [("vm1", DEFAULT_TCP), ("vm2", DEFAULT_TCP), ("vm3", DEFAULT_UNIX)]
STYLES = {"parent": "bold magenta", "vm1": "cyan", "vm2": "green", "vm3": "yellow"}
QUIET_EVENTS = {"device packet"}


def _bin(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    module = "parent_partition" if name.startswith("parent") else "child_partition"
    return [sys.executable, "-m", module]


_ZERO_FIELD = re.compile(r" (?:reserved\d|padding|mmio_megabytes_optional|monitor_page\d|target_vcpu|"
                         r"sub_channel_index|monitor_allocated|user_def|userdata|msgnumber)=0(?:x0)?\b")


class _BodyCollapse:
    """Consecutive GPADL_BODY lines of one partition are shown as the first one and a count."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, int]] = {}  # who -> (bodies hidden, pfns hidden)

    def feed(self, console: Console, who: str, rest: str) -> bool:
        if rest.startswith("CHANNELMSG_GPADL_BODY"):
            if who in self.pending:
                n, pfns = self.pending[who]
                m = re.search(r"\((\d+) pfns\)", rest)
                self.pending[who] = (n + 1, pfns + (int(m.group(1)) if m else 0))
                return False
            self.pending[who] = (0, 0)
            return True
        self.flush(console, who)
        return True

    def flush(self, console: Console, who: str) -> None:
        n, pfns = self.pending.pop(who, (0, 0))
        if n:
            console.print(Text(f"{who:>6} | ", style=STYLES.get(who, ""))
                          + Text(f"→   … {n} more GPADL_BODY with {pfns} pfns", style="dim"))


_COLLAPSE = _BodyCollapse()


def _render(console: Console, who: str, line: str, trace_parent: bool) -> dict[str, object] | None:
    try:
        rec: dict[str, object] = json.loads(line)
    except ValueError:
        console.print(Text(f"{who:>6} | ", style=STYLES.get(who, "")) + Text(line.rstrip()))
        return None
    event = str(rec.pop("event", ""))
    if event in QUIET_EVENTS:
        return {**rec, "event": event}
    level = str(rec.pop("level", "info"))
    for key in ("timestamp", "component", "transport", "peer"):
        rec.pop(key, None)
    if who != "parent":
        rec.pop("partition", None)
    trace = event.startswith(("G>H ", "H>G "))
    if trace and who == "parent" and not trace_parent:
        return {**rec, "event": event}
    text = Text(f"{who:>6} | ", style=STYLES.get(who, ""))
    if trace:
        arrow, _, rest = event.partition(" ")
        if not _COLLAPSE.feed(console, who, rest):
            return {**rec, "event": event}
        rest = _ZERO_FIELD.sub("", rest)
        text.append(("→ " if arrow == "G>H" else "← ") + rest, style="dim" if "GPADL_BODY" in rest else "")
    else:
        _COLLAPSE.flush(console, who)
        style = {"warning": "yellow", "error": "bold red"}.get(level, "bold")
        text.append(event, style=style)
        extras = " ".join(f"{k}={v}" for k, v in rec.items())
        if extras:
            text.append("  " + extras, style="dim")
    console.print(text, overflow="fold")
    return {**rec, "event": event}


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: a terminal's Ctrl-C reaches only the demo, which stops children before the parent.
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)


def _fd(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stderr is not None
    return proc.stderr.fileno()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parent-partition demo", description=__doc__)
    ap.add_argument("--duration", type=float, default=0.0, help="stop by itself after this many seconds")
    ap.add_argument("--trace-parent", action="store_true", help="also show the parent's side of the trace")
    args = ap.parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    console.rule("vmbus-emu demo: one parent partition, three child partitions")
    procs["parent"] = _spawn([*_bin("parent-partition"), "serve", "--json-logs", "--trace"], env)
    streams: dict[int, tuple[str, bytearray]] = {_fd(procs["parent"]): ("parent", bytearray())}
    parent_ready = False
    parent_signalled = False
    opened: set[str] = set()
    stop_at = time.monotonic() + args.duration if args.duration else None
    stopping = False
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    deadline = time.monotonic() + 15
    status = 0
    try:
        while streams:
            if (interrupted or (stop_at and time.monotonic() >= stop_at)) and not stopping:
                stopping = True
                console.rule("stopping: children close, tear down and unload; then the parent")
                for name, proc in procs.items():
                    if name != "parent" and proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
            children_done = all(p.poll() is not None for n, p in procs.items() if n != "parent")
            if stopping and children_done and not parent_signalled:
                parent_signalled = True
                procs["parent"].send_signal(signal.SIGINT)
            if not parent_ready and time.monotonic() > deadline:
                console.print("[bold red]the parent did not start[/]")
                status = 1
                break
            readable, _, _ = select.select(list(streams), [], [], 0.2)
            for fd in readable:
                who, buf = streams[fd]
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                    continue
                buf += chunk
                *lines, rest = buf.split(b"\n")
                buf[:] = rest
                for raw in lines:
                    rec = _render(console, who, raw.decode(errors="replace"), args.trace_parent)
                    if rec is None:
                        continue
                    start_next = False
                    if who == "parent" and rec.get("event") == "parent partition listening" and not parent_ready:
                        parent_ready = start_next = True
                    if rec.get("event") == "all offered channels open":
                        opened.add(who)
                        start_next = True
                        if len(opened) == len(CHILDREN):
                            console.rule("all three partitions have all five channels open; Ctrl-C to stop")
                    if start_next and not stopping and len(procs) - 1 < len(CHILDREN):
                        # One child at a time, so each one's lifecycle reads as a story.
                        name, url = CHILDREN[len(procs) - 1]
                        console.rule(f"{name}: child-partition run --connect {url} --name {name} --trace",
                                     style=STYLES[name])
                        procs[name] = _spawn([*_bin("child-partition"), "run", "--connect", url, "--name", name,
                                              "--trace", "--json-logs"], env)
                        streams[_fd(procs[name])] = (name, bytearray())
    finally:
        for name, proc in procs.items():
            if proc.poll() is None and (name != "parent" or not parent_signalled):
                proc.send_signal(signal.SIGINT)
        for name, proc in procs.items():
            try:
                code = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0:
                status = 1
                console.print(f"[bold red]{name} exited with status {code}[/]")
    if status == 0:
        console.rule("clean shutdown: every partition unloaded, the parent stopped")
    return status
