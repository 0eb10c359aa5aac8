"""A parent that uses every core: a supervisor process and its worker processes (``[parent] workers``).

The pre-fork model of nginx and gunicorn: the supervisor (the ``serve`` process) binds every listener once,
so port 0, Unix paths and start-up errors are as with one process, then starts N workers that inherit the
listening sockets and accept on them through ``ParentDaemon.serve_on``, the accept path a single process
uses. A shared socket (not SO_REUSEPORT) because Unix listeners have no SO_REUSEPORT balancing, and because
connections waiting in the queue of a worker that dies are then taken by the others instead of being reset.
The kernel wakes whichever worker waits, so an idle worker takes new partitions from a busy one.

Workers are fresh interpreters (``python -m parent_partition _worker SPEC serve ARGS``), not forks: no event
loop, thread or open device is copied, and each one reads the same flags and configuration file as the
supervisor did, so they cannot disagree (the supervisor checked them first). The supervisor answers each
worker on a Unix socketpair in msgpack (``Control``): a partition name is claimed from it before a partition
is accepted, so a name is connected once in the whole parent (and ``[auth] replace`` ends it on the worker
that had it); the connection count and the memory budget are in shared memory (``shared.py``). Each worker
serves the JSON API on a private Unix socket; the supervisor's HTTP server (``web/aggregate.py``) merges what
the workers answer. A worker that dies is logged and started again: its partitions reconnect, as after a
parent restart. SIGINT or SIGTERM stops the workers (each with the staged shutdown) and the supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO, cast

import msgpack
import uvloop

from vmbus_proto.aio import logs, malloc
from vmbus_proto.aio.cli import os_reason
from vmbus_proto.envelope import REPLACED

from .config import Config, ConfigError, worker_count
from .connection import NAME_GRACE, PartitionConnection
from .daemon import (
    Listener,
    ParentDaemon,
    StartupError,
    _listen_hint,
    bind_listener,
    check_paths,
    tls_listener_context,
    warn_auth,
)
from .devices.network.trunk import TrunkLink
from .shared import SharedState, WorkerSlot

HEADER = struct.Struct(">I")
MAX_MESSAGE = 1 << 20
READY_TIMEOUT = 120.0  # a worker's start (imports, devices) on a loaded machine
TRUNK_BUFFER = 4 << 20  # bytes of frames between two workers' switches (the kernel may cap it lower)
RESTART_PAUSE = 1.0  # between a worker's death and its restart (a worker that cannot start does not spin)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


class LineWriter(io.TextIOBase):
    """Standard error for processes sharing one: each log line leaves in one write(2), so lines of the
    supervisor and its workers never interleave mid-line (a pipe keeps writes up to PIPE_BUF whole)."""

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.fd = fd
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in text:
            lines, _, self._pending = self._pending.rpartition("\n")
            data = (lines + "\n").encode(errors="replace")
            while data:
                data = data[os.write(self.fd, data):]
        return len(text)

    def isatty(self) -> bool:
        return os.isatty(self.fd)


def line_writer() -> TextIO:
    return cast(TextIO, LineWriter())


class Control:
    """One end of a supervisor-worker socketpair: msgpack messages with a length prefix. A message with an
    ``id`` is a request and gets a reply (``re``: its id); one without is a notice."""

    def __init__(self, sock: socket.socket, handler: Handler, log: Any) -> None:
        self.sock = sock
        self.handler = handler
        self.log = log
        self.closed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._reader = asyncio.get_running_loop().create_task(self._read(reader))

    def send(self, msg: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            return
        body = msgpack.packb(msg)
        self._writer.write(HEADER.pack(len(body)) + body)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send request ``op`` and wait for its reply (a ConnectionError if the other end goes)."""
        if self.closed.is_set():
            raise ConnectionError("the other process is gone")
        rid = next(self._ids)
        fut = self._waiting[rid] = asyncio.get_running_loop().create_future()
        self.send({"op": op, "id": rid, **fields})
        try:
            reply: dict[str, Any] = await fut
        finally:
            self._waiting.pop(rid, None)
        return reply

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if size > MAX_MESSAGE:
                    raise ValueError(f"control message of {size} bytes")
                msg = msgpack.unpackb(await reader.readexactly(size))
                if not isinstance(msg, dict):
                    raise ValueError("control message is not a map")
                if "re" in msg:
                    fut = self._waiting.get(msg["re"])
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    task = asyncio.get_running_loop().create_task(self._answer(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (ValueError, msgpack.UnpackException) as exc:
            self.log.error("bad control message from the other process; closing the channel", error=str(exc))
        finally:
            self.closed.set()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the other process is gone"))
            if self._writer is not None:
                self._writer.close()

    async def _answer(self, msg: dict[str, Any]) -> None:
        try:
            reply = await self.handler(msg)
        except Exception:
            self.log.exception("control request failed", op=msg.get("op"))
            reply = {"error": True}
        if "id" in msg:
            self.send({"re": msg["id"], **(reply or {})})

    async def drain(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# ---- the supervisor ---------------------------------------------------------------------------------------

class Worker:
    """The supervisor's view of worker ``index``: its process, its control channel, its API socket."""

    def __init__(self, index: int, http_path: Path) -> None:
        self.index = index
        self.http_path = http_path
        self.proc: asyncio.subprocess.Process | None = None
        self.control: Control | None = None
        self.ready = asyncio.Event()
        self.started = 0  # how many times it was started
        self.pid: int | None = None
        self.failure: str | None = None  # a configuration error the worker met starting (its devices)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    """Binds the listeners, runs the workers, keeps each partition name on one worker."""

    def __init__(self, config: Config, argv: list[str], workers: int | None = None) -> None:
        self.config = config
        self.argv = argv  # the serve command line the workers read their configuration from again
        self.count = workers or worker_count(config)
        self.name = "parent"
        self.log = logs.get(component="parent")
        self.listeners: list[Listener] = []
        self.endpoints: list[str] = []
        self.names: dict[str, int] = {}  # partition name -> the worker that has it (or is taking it)
        self._released = asyncio.Condition()  # a name came free
        self.runtime = Path(tempfile.mkdtemp(prefix="vmbus-workers-"))
        self.runtime.chmod(0o700)
        self.state = SharedState(self.count)
        # The virtual switch's trunks (devices/network/trunk.py): a datagram socketpair per pair of workers,
        # both ends kept here so that a restarted worker inherits its end again.
        self.trunks: dict[tuple[int, int], tuple[socket.socket, socket.socket]] = {}
        if config.devices.get("network"):
            for i, j in itertools.combinations(range(self.count), 2):
                pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                for end in pair:
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TRUNK_BUFFER)
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TRUNK_BUFFER)
                self.trunks[i, j] = pair
        self.workers = [Worker(i, self.runtime / f"api-{i}.sock") for i in range(self.count)]
        self.stopping = False
        self._watch: list[asyncio.Task[None]] = []

    @property
    def devices(self) -> list[str]:
        return [n for n in self.config.vsp_classes() if self.config.devices[n]]

    async def start(self) -> None:
        """Check the configuration, bind every listener (as one process would), start the workers and wait
        until each accepts."""
        check_paths(self.config)
        try:
            for url in self.config.listen:
                if url.startswith("tls:"):
                    tls_listener_context(self.config, url)
                try:
                    listener = bind_listener(url)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {url}: {os_reason(exc)}{_listen_hint(exc)}") from None
                self.listeners.append(listener)
                self.endpoints.append(listener.endpoint)
            for w in self.workers:
                await self._start(w)
            await self._until_ready()
        except BaseException:
            await self.shutdown()
            raise
        self.log.info("parent partition listening", listen=self.endpoints, devices=self.devices,
                      data_dir=str(self.config.data_path), workers=self.count,
                      worker_pids=[w.pid for w in self.workers])
        warn_auth(self.config, self.log)

    async def _until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for w in self.workers:
            while not w.ready.is_set():
                if not w.alive and w.control is not None:
                    with contextlib.suppress(TimeoutError):  # its last words (a "failed" notice) first
                        await asyncio.wait_for(w.control.closed.wait(), 5)
                if w.failure is not None:
                    raise ConfigError(w.failure)
                if not w.alive:
                    raise StartupError(f"worker process {w.index} exited with status "
                                       f"{w.proc.returncode if w.proc else '?'} while starting (its log says why)")
                if time.monotonic() > deadline:
                    raise StartupError(f"worker process {w.index} did not start within {READY_TIMEOUT:g}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.ready.wait(), 0.2)

    async def _start(self, w: Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        trunks = [[j if i == w.index else i, pair[0 if i == w.index else 1].fileno()]
                  for (i, j), pair in self.trunks.items() if w.index in (i, j)]
        fds = [theirs.fileno(), self.state.fd, *(lst.sock.fileno() for lst in self.listeners),
               *(fd for _, fd in trunks)]
        spec = {"trunks": trunks, "index": w.index, "workers": self.count, "control": theirs.fileno(),
                "shared": self.state.fd,
                "http": str(w.http_path) if self.config.http.enabled else None,
                "listeners": [[lst.url, lst.kind, lst.sock.fileno(), lst.endpoint] for lst in self.listeners]}
        w.ready.clear()
        self.state.clear(w.index)
        w.http_path.unlink(missing_ok=True)
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "parent_partition", "_worker", json.dumps(spec), *self.argv,
                pass_fds=fds, stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        w.pid = w.proc.pid
        w.started += 1
        w.control = Control(ours, lambda msg: self._handle(w, msg), self.log.bind(worker=w.index))
        await w.control.start()
        self._watch.append(asyncio.get_running_loop().create_task(self._watch_worker(w, w.proc)))

    async def _watch_worker(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        status = await proc.wait()
        if w.control is not None:
            await w.control.close()
        gone = [name for name, i in self.names.items() if i == w.index]
        for name in gone:
            del self.names[name]
        async with self._released:
            self._released.notify_all()
        self.state.clear(w.index)
        if self.stopping:
            return
        self.log.error("worker process died; starting it again (its partitions reconnect)", worker=w.index,
                       pid=proc.pid, status=status, partitions=len(gone))
        await asyncio.sleep(RESTART_PAUSE)
        if not self.stopping:
            await self._start(w)

    async def _handle(self, w: Worker, msg: dict[str, Any]) -> dict[str, Any] | None:
        op = msg.get("op")
        if op == "failed":
            w.failure = str(msg.get("error"))
        elif op == "ready":
            w.ready.set()
            self.log.info("worker process ready", worker=w.index, pid=w.pid, started=w.started)
        elif op == "claim":
            return {"ok": await self._claim(w.index, str(msg["name"]), bool(msg["replace"]), str(msg["peer"]))}
        elif op == "release" and self.names.get(msg["name"]) == w.index:
            del self.names[msg["name"]]
            async with self._released:
                self._released.notify_all()
        return None

    async def _claim(self, index: int, name: str, replace: bool, peer: str) -> bool:
        """Worker ``index`` takes partition ``name`` unless another worker has it after ``NAME_GRACE`` seconds
        (its connection may be going) or, with ``replace``, at once: it is ended there first, and the
        newcomer's answer waits until its devices have let go."""
        if not replace and not self._free_for(name, index):  # its old connection may be going: a grace
            async with self._released:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait_for(lambda: self._free_for(name, index)),
                                           NAME_GRACE)
        if self._free_for(name, index):
            self.names[name] = index
            return True
        if not replace:
            return False
        owner = self.names[name]
        self.names[name] = index
        control = self.workers[owner].control
        if control is not None:
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(control.request("replace", name=name, by=peer),
                                       self.config.handshake_timeout)
        return True

    def _free_for(self, name: str, index: int) -> bool:
        owner = self.names.get(name)
        return owner is None or owner == index or not self.workers[owner].alive

    def worker_of(self, name: str) -> Worker | None:
        i = self.names.get(name)
        return None if i is None else self.workers[i]

    async def shutdown(self) -> None:
        """Every worker shuts down (the staged shutdown of each), then the listeners close."""
        self.stopping = True
        started = any(w.proc is not None for w in self.workers)
        if started:
            self.log.info("shutting down", workers=self.count)
        for w in self.workers:
            if w.alive and w.proc is not None:
                w.proc.send_signal(signal.SIGTERM)
        limit = self.config.shutdown_timeout * 5 + 5  # a worker bounds each of its stages by shutdown_timeout
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), limit)
            except TimeoutError:
                self.log.warning("worker process did not stop; killing it", worker=w.index, pid=w.pid)
                w.proc.kill()
                await w.proc.wait()
        for task in self._watch:
            task.cancel()
        await asyncio.gather(*self._watch, return_exceptions=True)
        for lst in self.listeners:
            lst.sock.close()
            if lst.unix_path is not None:
                lst.unix_path.unlink(missing_ok=True)
        for pair in self.trunks.values():
            for end in pair:
                end.close()
        self.state.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
        if started:
            self.log.info("parent partition stopped")


async def supervise(config: Config, argv: list[str]) -> None:
    """``serve`` with more than one worker: run until SIGINT or SIGTERM."""
    sup = Supervisor(config, argv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sup.start()
    web_server = None
    if config.http.enabled:
        from .web.aggregate import start_web  # noqa: PLC0415 - aiohttp only when serving HTTP

        try:
            web_server = await start_web(sup)
        except BaseException:
            await sup.shutdown()
            raise
    await stop.wait()
    if web_server is not None:
        await web_server.stop()
    await sup.shutdown()


# ---- a worker ------------------------------------------------------------------------------------------------

class _Connections(set[PartitionConnection]):
    """A worker's connections; their number is published in its shared slot."""

    def __init__(self, slot: WorkerSlot) -> None:
        super().__init__()
        self.slot = slot

    def add(self, conn: PartitionConnection) -> None:
        super().add(conn)
        self.slot.connections_now(len(self))

    def discard(self, conn: object) -> None:
        super().discard(conn)
        self.slot.connections_now(len(self))


class _Claims:
    def __init__(self, control: Control) -> None:
        self.control = control

    async def claim(self, name: str, replace: bool, peer: str) -> bool:
        try:
            reply = await self.control.request("claim", name=name, replace=replace, peer=peer)
        except ConnectionError:
            return False  # the supervisor is gone: this worker is stopping
        return bool(reply.get("ok"))


class WorkerDaemon(ParentDaemon):
    """A ``ParentDaemon`` in worker process ``index``: the limits count every worker, names are claimed."""

    def __init__(self, config: Config, index: int, slot: WorkerSlot, control: Control) -> None:
        network = config.sections.get("network")
        if index and network is not None:  # the external TAP is worker 0's; the others reach it by trunk
            network.external_tap = ""
        super().__init__(config, gc_settle=True)
        self.index = index
        self.log = self.log.bind(worker=index)
        self.slot = slot
        self.budget = slot.budget
        self.connections = _Connections(slot)
        self.control = control
        self.claims = _Claims(control)

    def room_for_connection(self) -> bool:
        return self.slot.room_for_connection(len(self.connections), self.config.max_partitions)

    def name_released(self, name: str) -> None:
        self.control.send({"op": "release", "name": name})

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """A request from the supervisor: ``replace`` ends partition ``name`` here for a newcomer elsewhere."""
        if msg.get("op") == "replace":
            conn = self.partitions.get(str(msg["name"]))
            if conn is not None:
                by = str(msg.get("by", "?"))
                conn.log.warning("partition replaced by a new authenticated connection", by=by)
                conn.close(f"partition {conn.partition!r} was replaced by a new authenticated connection from "
                           f"{by}", REPLACED)
                await conn.released.wait()
        return {}


def worker_main(argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``python -m parent_partition _worker SPEC serve ARGS...``: one worker of a supervisor."""
    from .cli import serve_config  # noqa: PLC0415 - cli imports this module

    spec = json.loads(argv[0])
    args = parser.parse_args(argv[1:])
    try:
        config = serve_config(args)
    except ConfigError as exc:
        print(f"parent-partition worker: error: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, line_writer(), json=True if args.json_logs else None)
    malloc.tune()
    uvloop.run(run_worker(config, spec))
    return 0


async def run_worker(config: Config, spec: dict[str, Any]) -> None:
    index = int(spec["index"])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    state = SharedState(int(spec["workers"]), fd=int(spec["shared"]))
    slot = WorkerSlot(state, index, config.limits.memory_budget)
    holder: list[WorkerDaemon] = []

    async def handle(msg: dict[str, Any]) -> dict[str, Any] | None:
        return await holder[0].handle(msg) if holder else None

    control = Control(socket.socket(fileno=int(spec["control"])), handle, logs.get(component="worker"))
    await control.start()
    try:
        daemon = WorkerDaemon(config, index, slot, control)
        for url, kind, fd, endpoint in spec["listeners"]:
            await daemon.serve_on(Listener(url, kind, socket.socket(fileno=int(fd)), endpoint, None))
    except ConfigError as exc:  # a device that cannot start (an external TAP): the supervisor says so
        control.send({"op": "failed", "error": str(exc)})
        await control.drain()
        await control.close()
        raise SystemExit(2) from None
    holder.append(daemon)
    switch = getattr(daemon.device("network"), "switch", None)
    links = [] if switch is None else [TrunkLink(switch, int(peer), socket.socket(fileno=int(fd)))
                                       for peer, fd in spec["trunks"]]
    daemon.accepting = True
    runner = None
    if spec["http"]:
        from .web.aggregate import worker_api  # noqa: PLC0415

        runner = await worker_api(daemon, spec["http"])
    control.send({"op": "ready"})
    daemon.log.info("worker process accepting", pid=os.getpid(), listen=daemon.endpoints)
    closed = loop.create_task(control.closed.wait())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
    if closed.done() and not stop.is_set():
        daemon.log.warning("the supervisor is gone; this worker stops")
    closed.cancel()
    stopped.cancel()
    if runner is not None:
        await runner.cleanup()
    await daemon.shutdown()
    for link in links:
        link.close()
    await control.close()
