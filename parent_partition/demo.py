"""``parent-partition demo``: a parent and three child partitions as real processes, narrated at a human pace.

Starts ``parent-partition serve`` and then ``child-partition run`` for vm1 with ``--trace``: vm1's VMBus
lifecycle is shown stage by stage (version negotiation, offers, the ring GPADL, the open, each device's own
handshake packets), each stage with a plain explanation and a pause to read it. vm2 (TCP) and vm3 (Unix
socket) then start and are summarised in one line each. Then every VM's disk does verified random I/O
through its own StorVSC while each VM pings the next through the parent's virtual switch (vm1 → vm2 → vm3 →
vm1), with live counts, until Ctrl-C or --duration: the children close, tear down and unload, and the
parent shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.padding import Padding
from rich.rule import Rule
from rich.text import Text

from vmbus_proto.devices.registry import ALL as DEVICES

from .demo_network import STATS_INTERVAL, NetworkWorkload, ring
from .demo_storage import NbdError, StorageWorkload
from .narration import INTRO, STOPPING, STYLES, Gutter, Record, body_text, build_story, is_trace, render_records

PROTOCOL = {spec.name: spec.protocol for spec in DEVICES}
START_TIMEOUT = 60.0  # a loaded machine can take a while to start four Python processes
STOP_TIMEOUT = 30.0
PROGRESS_EVERY = 5  # seconds between progress lines when the output is not a terminal
VMS = ("vm1", "vm2", "vm3")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parent-partition demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pace", type=float, default=2.0, metavar="SECONDS",
                   help="pause after each stage of the narrated walk (default 2; 0 = no pauses)")
    p.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                   help="stop by itself once the VMs have done disk I/O this long (default: run until Ctrl-C)")
    p.add_argument("--port", type=int, metavar="N",
                   help="the parent's TCP port on 127.0.0.1 (default: any free port, printed at start)")
    p.add_argument("--listen", action="append", metavar="URL",
                   help="tcp://HOST:PORT or unix:PATH for the parent, may repeat (default: TCP on 127.0.0.1 and "
                        "unix:./run/demo-PID.sock); vm1 and vm2 use the first TCP one, vm3 the first Unix one")
    p.add_argument("--data-dir", metavar="DIR", help="keep the VMs' disks here (default: a temporary directory)")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="the parent's web console (default 127.0.0.1:8080, skipped if taken; 'none': off)")
    p.add_argument("--iodepth", type=int, default=4, metavar="N", help="disk requests in flight per VM (default 4)")
    p.add_argument("--trace-parent", action="store_true",
                   help="run the parent with --trace too and show its side of vm1's lifecycle")
    return p


class Workload(Protocol):
    """Something the VMs do while a person watches: one part of the live view (disk I/O and pings today;
    consoles plug in the same way)."""

    async def stop(self) -> None: ...

    def sample(self) -> None: ...

    def view(self) -> Group: ...

    def progress(self) -> list[tuple[str, Text]]: ...


class DemoError(Exception):
    """A partition did not come up; the message says which and why."""


class Proc:
    """One partition process whose JSON log lines are read into ``records``, except those ``on_record`` takes
    (a workload's stream of counts: kept, they would grow without bound)."""

    def __init__(self, who: str, proc: asyncio.subprocess.Process, on_record: Callable[[Record], bool]) -> None:
        self.who = who
        self.proc = proc
        self.records: list[Record] = []
        self.changed = asyncio.Event()
        self._on_record = on_record
        self.started = time.monotonic()
        self.up_after = 0.0  # seconds from start to "all offered channels open"
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            raw = line.decode(errors="replace").rstrip()
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = None
            rec: Record = parsed if isinstance(parsed, dict) else {"event": raw, "level": "raw"}
            rec["who"] = self.who
            if self._on_record(rec):
                continue
            self.records.append(rec)
            self.changed.set()
        self.changed.set()

    async def wait_event(self, event: str | tuple[str, ...], stop: asyncio.Event,
                         timeout: float = START_TIMEOUT) -> Record | None:
        """The first record named ``event`` (or any of several); None if ``stop`` is set first. Raises DemoError
        if the process exits or the timeout passes without it."""
        deadline = time.monotonic() + timeout
        events = (event,) if isinstance(event, str) else event
        seen = 0
        while True:
            for rec in self.records[seen:]:
                if rec.get("event") in events:
                    if event == "all offered channels open":
                        self.up_after = time.monotonic() - self.started
                    return rec
            seen = len(self.records)
            if stop.is_set():
                return None
            if self.reader.done():
                code = await self.proc.wait()
                raise DemoError(f"{self.who} exited with status {code} before '{event}'")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(f"{self.who}: no '{event}' within {timeout:g}s")
            self.changed.clear()
            waiters = [asyncio.ensure_future(self.changed.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=min(left, 1.0), return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        return self.proc.returncode if self.proc.returncode is not None else -1


def _bin(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    module = "parent_partition" if name.startswith("parent") else "child_partition"
    return [sys.executable, "-m", module]


def listen_urls(args: argparse.Namespace) -> list[str]:
    urls = list(args.listen or [])
    if args.port is not None or not urls:
        urls.insert(0, f"tcp://127.0.0.1:{args.port or 0}")
    if not args.listen:
        urls.append(f"unix:./run/demo-{os.getpid()}.sock")
    return urls


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console, stop: asyncio.Event, workdir: Path) -> None:
        self.args = args
        self.console = console
        self.stop = stop
        self.workdir = workdir
        self.procs: dict[str, Proc] = {}
        self.echo: set[str] = set()  # partitions whose every line is printed as it comes (while stopping)
        self.failed = False
        self.endpoints: dict[str, str] = {}
        self.network = NetworkWorkload(ring(list(VMS)), lambda who, text: self.print(Gutter(who, text)))

    # ---- output -----------------------------------------------------------------------------------------

    def print(self, *items: Any) -> None:
        self.console.print(*items)

    def on_record(self, rec: Record) -> bool:
        """Warnings, errors and stray output are shown as they come; everything else waits for its stage, but
        for the network workload's lines, which it takes (True)."""
        who, level = rec["who"], rec.get("level")
        if level == "info" and self.network.on_record(rec):
            return True
        if level in ("warning", "error", "critical", "raw") or (who in self.echo and not self._quiet(rec)):
            if level in ("error", "critical", "raw"):
                self.failed = self.failed or level != "raw" or bool(str(rec.get("event", "")).strip())
            self.print(Gutter(who, body_text(rec)))
        return False

    @staticmethod
    def _quiet(rec: Record) -> bool:
        """While stopping: vm1's trace and each partition's last words are shown."""
        if is_trace(rec):
            return bool(rec["who"] != "vm1")
        return rec.get("event") not in ("unloaded cleanly", "shutting down", "parent partition stopped")

    def stage(self, n: int, total: int, title: str, explanation: str, style: str = "bold") -> None:
        self.print()
        self.print(Rule(Text(f" {n}/{total}  {title} ", style=style), align="left", style="dim"))
        if explanation:
            self.print(Padding(Text(explanation, style="italic"), (0, 2)))

    async def pause(self, seconds: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.args.pace if seconds is None else seconds)

    # ---- processes --------------------------------------------------------------------------------------

    async def spawn(self, who: str, cmd: list[str]) -> Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Own session: a terminal's Ctrl-C reaches only the demo, which stops children before the parent.
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
                                                    limit=1 << 20)
        self.procs[who] = Proc(who, proc, self.on_record)
        return self.procs[who]

    def child_cmd(self, who: str, url: str, trace: bool) -> list[str]:
        cmd = [*_bin("child-partition"), "run", "--connect", url, "--name", who, "--json-logs",
               "--nbd", f"unix:{self.workdir / (who + '.nbd')}"]
        target = self.network.vms[who].target if who in self.network.vms else None
        return cmd + (["--ping", target] if target else []) + (["--trace"] if trace else [])

    # ---- the story --------------------------------------------------------------------------------------

    async def run(self) -> None:
        args = self.args
        self.print(Rule(Text(" vmbus-emu demo: one parent partition, three child partitions ", style="bold")))
        self.print(Padding(Text(INTRO, style="italic"), (0, 2)))
        data_dir = args.data_dir or str(self.workdir / "disks")
        config = self.workdir / "parent.toml"  # the switch's counters in the log, for the network view
        config.write_text(f"[network]\nstats_interval = {STATS_INTERVAL}\n")
        cmd = [*_bin("parent-partition"), "serve", "--json-logs", "--data-dir", data_dir, "--config", str(config)]
        for url in listen_urls(args):
            cmd += ["--listen", url]
        if args.http:
            cmd += ["--http", args.http]
        if args.trace_parent:
            cmd.append("--trace")
        self.print(Gutter("demo", Text("$ parent-partition " + " ".join(cmd[cmd.index("serve"):]), style="dim")))
        parent = await self.spawn("parent", cmd)
        ready = await parent.wait_event("parent partition listening", self.stop)
        if ready is None:
            return
        listening = [str(u) for u in ready.get("listen", [])]
        tcp = next((u for u in listening if u.startswith("tcp://")), None)
        unix = next((u for u in listening if u.startswith("unix:")), None)
        self.endpoints = {"vm1": tcp or unix or "", "vm2": tcp or unix or "", "vm3": unix or tcp or ""}
        self.print(Gutter("parent", Text.assemble(("listening on ", "bold"), " and ".join(listening),
                                                  ("  VSPs: ", "dim"), ", ".join(ready.get("devices", [])))))
        if args.http != "none":
            await self.web_console(parent)
        await self.pause()
        if self.stop.is_set():
            return
        await self.narrate_vm1()
        if self.stop.is_set():
            return
        await self.start_others()
        if self.stop.is_set():
            return
        await self.work()

    async def web_console(self, parent: Proc) -> None:
        """Where to watch the VMs' screens: the parent's web console, or why there is none."""
        web = await parent.wait_event(("web console and API listening", "web console and API not started"),
                                      self.stop, timeout=10)
        if web is None:
            return
        if web.get("url"):
            self.print(Gutter("parent", Text.assemble(("web console ", "bold"), (f"{web['url']}/", "underline cyan"),
                                                      ("  open it to watch the VMs' screens and type into them",
                                                       "dim"))))
        else:
            self.print(Gutter("parent", Text(f"no web console: {web.get('reason', 'not started')}", style="yellow")))

    async def narrate_vm1(self) -> None:
        cmd = self.child_cmd("vm1", self.endpoints["vm1"], trace=True)
        self.print()
        self.print(Gutter("demo", Text("$ child-partition " + " ".join(cmd[cmd.index("run"):]), style="dim")))
        vm1 = await self.spawn("vm1", cmd)
        if await vm1.wait_event("all offered channels open", self.stop) is None:
            return
        parent_side = [r for r in self.procs["parent"].records if r.get("partition") == "vm1"] \
            if self.args.trace_parent else []
        upto = next(i for i, r in enumerate(vm1.records) if r.get("event") == "all offered channels open")
        stages = build_story([*vm1.records[:upto + 1], *parent_side])
        for n, stage in enumerate(stages, 1):
            self.stage(n, len(stages), stage.title, stage.explanation, style=STYLES["vm1"] + " bold")
            if stage.key == "ready":
                self.print(Gutter("vm1", self.summary("vm1", vm1.records[upto])))
            for line in render_records(stage.records if stage.key != "ready" else []):
                self.print(line)
            await self.pause()
            if self.stop.is_set():
                return

    async def start_others(self) -> None:
        self.print()
        self.print(Rule(Text(" vm2 and vm3 start the same way (shown in one line each) ", style="bold"),
                        align="left", style="dim"))
        others = ["vm2", "vm3"]
        for who in others:
            await self.spawn(who, self.child_cmd(who, self.endpoints[who], trace=False))
        for who in others:
            rec = await self.procs[who].wait_event("all offered channels open", self.stop)
            if rec is None:
                return
            self.print(Gutter(who, self.summary(who, rec)))
        await self.pause()

    def summary(self, who: str, ready: Record) -> Text:
        """One line for a VM that is up: its transport, time to come up, and every negotiated version."""
        proc = self.procs[who]
        recs, seconds = proc.records, proc.up_after
        vmbus = next((r.get("version") for r in recs if r.get("event") == "VMBus negotiated"), "?")
        versions: dict[str, str] = ready.get("versions", {})
        text = Text.assemble(("up", "bold"), f" over {self.endpoints[who]} in {seconds:.1f}s: ",
                             ("VMBus ", "dim"), str(vmbus))
        for device, version in versions.items():
            text.append(f" · {device} ", style="dim")
            text.append(f"{PROTOCOL.get(device, device)} {version}")
        return text

    async def work(self) -> None:
        names = [who for who in VMS if who in self.procs]
        for who in names:  # each VM's disk is exported once it is attached
            if await self.procs[who].wait_event("disk exported over NBD", self.stop) is None:
                return
        self.print()
        self.print(Rule(Text(" The VMs at work ", style="bold"), align="left", style="dim"))
        self.print(Padding(Text(
            "Each VM's disk is exported over NBD by the VM itself. The demo writes stamped 4 KiB blocks and "
            "reads them back: every request goes NBD → the VM's StorVSC → an EXECUTE_SRB on its VMBus ring → "
            "the parent's StorVSP → the VM's disk image, and the answer comes back as a COMPLETE_IO. "
            "Meanwhile each VM pings the next (vm1 → vm2 → vm3 → vm1) with its built-in ARP and ICMP stack: "
            "an echo request is an RNDIS packet on the VM's NetVSC ring, the parent's NetVSP hands its frame to "
            "the virtual switch, which forwards it to the other VM's port and ring; the reply comes back the same "
            "way. "
            + ("Ctrl-C stops." if not self.args.duration else f"It stops by itself after {self.args.duration:g}s."),
            style="italic"), (0, 2)))
        storage = StorageWorkload(self.args.iodepth)
        for who in names:
            via = "unix" if self.endpoints[who].startswith("unix:") else "tcp"
            storage.add(who, via, str(self.workdir / f"{who}.nbd"))
        try:
            await storage.start()
        except (OSError, NbdError, asyncio.IncompleteReadError) as exc:
            await storage.stop()
            raise DemoError(f"cannot reach the VMs' disks over NBD: {exc}") from None
        await self.network.start()
        workloads: list[Workload] = [storage, self.network]  # consoles join here
        if self.args.duration:
            asyncio.get_running_loop().call_later(self.args.duration, self.stop.set)
        try:
            with Live(self._view(workloads), console=self.console, refresh_per_second=4) as live:
                for tick in itertools.count(1):
                    await self.pause(1.0)
                    if self.stop.is_set():
                        live.update(self._view(workloads, final=True))
                        break
                    for w in workloads:
                        w.sample()
                    live.update(self._view(workloads))
                    if not self.console.is_terminal and tick % PROGRESS_EVERY == 0:
                        for w in workloads:  # a log or a pipe gets a line per VM now and then instead
                            for name, line in w.progress():
                                self.print(Gutter(name, line))
        finally:
            for w in workloads:
                await w.stop()
        for vm in storage.vms:
            if vm.errors:
                self.failed = True
                self.print(Gutter(vm.name, Text(f"{vm.errors} disk errors; last: {vm.last_error}", style="bold red")))

    def _view(self, workloads: list[Workload], final: bool = False) -> Group:
        hint = ("Ctrl-C to stop" if not self.args.duration else f"stops after --duration {self.args.duration:g}s")
        return Group(*(w.view() for w in workloads), Text("" if final else hint, style="dim"))

    # ---- stopping ---------------------------------------------------------------------------------------

    async def shutdown(self) -> int:
        """Children first (each closes, tears down and unloads), then the parent. Returns the exit status."""
        status = 1 if self.failed else 0
        children = [p for who, p in self.procs.items() if who != "parent"]
        self.print()
        self.print(Rule(Text(" Stopping ", style="bold"), align="left", style="dim"))
        self.print(Padding(Text(STOPPING, style="italic"), (0, 2)))
        self.echo.update(p.who for p in children)
        for p in children:
            p.signal(signal.SIGINT)
        for p in children:
            code = await p.wait(STOP_TIMEOUT)
            if code != 0:
                status = 1
                self.print(Gutter(p.who, Text(f"exited with status {code}", style="bold red")))
        parent = self.procs.get("parent")
        if parent is not None:
            self.echo.add("parent")
            parent.signal(signal.SIGINT)
            code = await parent.wait(STOP_TIMEOUT)
            if code != 0:
                status = 1
                self.print(Gutter("parent", Text(f"exited with status {code}", style="bold red")))
        if status == 0:
            self.print(Rule(Text(" clean shutdown: every child unloaded, the parent stopped ", style="bold green")))
        return status


async def _main(args: argparse.Namespace, console: Console) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="vmbus-demo-") as tmp:
        demo = Demo(args, console, stop, Path(tmp))
        try:
            await demo.run()
        except DemoError as exc:
            demo.failed = True
            console.print(Gutter("demo", Text(str(exc), style="bold red")))
        except OSError as exc:
            demo.failed = True
            console.print(Gutter("demo", Text(f"cannot run the demo: {exc}", style="bold red")))
        return await demo.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pace < 0 or args.duration < 0 or args.iodepth < 1:
        print("parent-partition demo: --pace and --duration must be >= 0 and --iodepth >= 1", file=sys.stderr)
        return 2
    # On a terminal rich follows its width; into a pipe or a file, 120 columns unless COLUMNS says otherwise.
    console = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)
    with _no_echoed_ctrl_c():
        return asyncio.run(_main(args, console))


@contextlib.contextmanager
def _no_echoed_ctrl_c() -> Iterator[None]:
    """The terminal does not echo ^C, which would shift the live table's redraw by a line."""
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, termios.error):
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHOCTL
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
