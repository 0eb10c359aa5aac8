"""The parent-partition daemon: listeners, the shared VSPs, and staged graceful shutdown.

The shape of the Hyper-V host side (one VMBus server per guest, one VSP per device class serving every
guest), run as one asyncio process. Shutdown goes in bounded stages like aiohttp's ``web_runner``: stop
accepting, rescind every offer, drain in-flight I/O and flush the backends, then close.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from vmbus_proto.aio import logs
from vmbus_proto.aio.cli import os_reason
from vmbus_proto.aio.endpoint import parse_endpoint, tls_query
from vmbus_proto.aio.tls import TlsGate
from vmbus_proto.devices.registry import EMULATED, load
from vmbus_proto.limits import MemoryBudget

from .accept import UnixAcceptor
from .config import Config, ConfigError
from .connection import NameClaims, PartitionConnection
from .counters import Totals
from .gc_policy import GcPolicy
from .ioports import EmulatedDevice
from .vsp import HostContext, Vsp


class StartupError(Exception):
    """The daemon cannot start: a listener cannot be bound (the message says which and why)."""


def host_context(config: Config) -> HostContext:
    return HostContext(data_path=config.data_path, trace=config.trace, source=config.source)


def build_vsps(config: Config) -> list[Vsp]:
    """The VSPs this parent offers, in registry order, each made from its configuration section."""
    host = host_context(config)
    return [cls.create(config.section(name), host) for name, cls in config.vsp_classes().items()
            if config.devices[name]]


def build_emulated(config: Config, vsps: list[Vsp]) -> list[EmulatedDevice]:
    """The enabled non-VMBus devices (the emulated ATA disk), on the disks of the VSPs that offer them."""
    out: list[EmulatedDevice] = []
    for entry in EMULATED:
        if config.devices[entry.name]:
            cls: Any = load(entry.device)
            out.append(cls.create(vsps, config.section("storage"), host_context(config)))
    return out


class ParentDaemon:
    def __init__(self, config: Config, vsps: list[Vsp] | None = None, name: str = "parent", *,
                 gc_settle: bool = False) -> None:
        """``gc_settle``: freeze the partitions' state out of full collections once it settles (``GcPolicy``;
        for the daemon process, which owns its interpreter)."""
        self.config = config
        self.name = name
        self.log = logs.get(component="parent")
        self.vsps = vsps if vsps is not None else build_vsps(config)
        self.emulated = build_emulated(config, self.vsps)  # devices on trapped I/O ports (IOPORT frames)
        self.connections: set[PartitionConnection] = set()
        self.partitions: dict[str, PartitionConnection] = {}
        self.totals = Totals()
        self.budget = MemoryBudget(config.limits.memory_budget)  # bytes held for all partitions ([limits])
        self.servers: list[asyncio.Server | UnixAcceptor] = []
        self.endpoints: list[str] = []
        self.accepting = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unix_paths: list[Path] = []
        self.gc: GcPolicy | None = GcPolicy(self.log) if gc_settle else None
        self.claims: NameClaims | None = None  # a worker process asks its supervisor (workers.py)

    def partitions_changed(self) -> None:
        """A partition connected or left, or a channel opened (the GC policy waits for this to settle)."""
        if self.gc is not None:
            self.gc.changed()

    def device(self, name: str) -> Vsp | None:
        """This parent's VSP for device ``name`` ("keyboard", "mouse", "video", ...), or None when it is not offered:
        how the HTTP side reaches a device's API (``KeyboardVsp.type_text``, ``MouseVsp.send_mouse``)."""
        return next((v for v in self.vsps if v.name == name), None)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Check the data directory and LUN images (ConfigError), then bind every listener (StartupError)."""
        check_paths(self.config)
        try:
            for url in self.config.listen:
                try:
                    await self._listen(url)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {url}: {os_reason(exc)}{_listen_hint(exc)}") from None
        except BaseException:
            for server in self.servers:
                server.close()
            for path in self._unix_paths:
                path.unlink(missing_ok=True)
            raise
        self.accepting = True
        self.log.info("parent partition listening", listen=self.endpoints,
                      devices=[v.name for v in self.vsps], data_dir=str(self.config.data_path))
        warn_auth(self.config, self.log)

    async def _listen(self, url: str) -> None:
        listener = bind_listener(url)
        if listener.unix_path is not None:
            self._unix_paths.append(listener.unix_path)
        try:
            await self.serve_on(listener)
        except BaseException:
            listener.sock.close()
            raise

    async def serve_on(self, listener: Listener) -> None:
        """Accept partitions on ``listener``'s bound socket: the one accept path of every listener (a worker
        process calls it with the sockets its supervisor bound; ``bind_listener``)."""
        loop = asyncio.get_running_loop()
        kind, url = listener.kind, listener.url
        open_allowed = self.config.auth.open_allowed(url)
        if kind in ("tcp", "tls"):
            factory: Callable[[], asyncio.BaseProtocol] = lambda: PartitionConnection(self, kind,  # noqa: E731
                                                                                      open_allowed=open_allowed)
            if kind == "tls":
                factory = self._tls_gate(url, factory)
            server: asyncio.Server | UnixAcceptor = await loop.create_server(factory, sock=listener.sock,
                                                                             backlog=1024)
        else:
            server = self._unix_acceptor(listener.sock, open_allowed)
        self.endpoints.append(listener.endpoint)
        self.servers.append(server)

    def _unix_acceptor(self, sock: socket.socket, open_allowed: bool) -> UnixAcceptor:
        """Children on a Unix listener: each one's first message is read with its fds (a memfd for shared
        memory, docs/protocol.md §14) before it becomes a partition connection."""
        return UnixAcceptor(sock, lambda first: PartitionConnection(self, "unix", open_allowed=open_allowed,
                                                                     first=first),
                            self.config.handshake_timeout, self.log.bind(transport="unix"))

    # ---- cross-process hooks (a worker process overrides them; parent_partition.workers) ----------------

    def room_for_connection(self) -> bool:
        """Whether one more connection fits ``max_partitions`` (counted over every worker process)."""
        return len(self.connections) < self.config.max_partitions

    def name_released(self, name: str) -> None:
        """Partition ``name`` left this process (another worker process may take the name now)."""

    def _tls_gate(self, url: str, factory: Callable[[], asyncio.BaseProtocol]) -> Callable[[], TlsGate]:
        """Connections to a ``tls://`` listener shake hands first (``[tls]``'s certificate), then are partitions."""
        ctx = tls_listener_context(self.config, url)
        timeout = self.config.handshake_timeout
        log, certs = self.log.bind(transport="tls"), self.config.tls.client_ca_file is not None
        return lambda: TlsGate(ctx, factory, timeout, log, require_cert=certs)

    async def shutdown(self) -> None:
        """Stop accepting, rescind every offer, drain I/O, flush backends, close."""
        timeout = self.config.shutdown_timeout
        self.accepting = False
        for server in self.servers:
            server.close()
        self.log.info("shutting down", partitions=len(self.connections))
        # Stage 1: rescind every offer so guests close their channels.
        for conn in list(self.connections):
            for vsp in self.vsps:
                conn.rescind(vsp.name)
        # Stage 2: drain in-flight I/O: the rescinds close every open channel's device.
        await _bounded(self._until_idle(), timeout, self.log, "drain")
        # Stage 3: flush backends.
        flushes = [*(d.shutdown() for d in self.emulated), *(v.shutdown() for v in self.vsps)]
        await _bounded(asyncio.gather(*flushes, return_exceptions=True), timeout, self.log, "flush")
        # Stage 4: close connections.
        for conn in list(self.connections):
            conn.close("parent shutting down")
        if self._tasks:
            await _bounded(asyncio.gather(*self._tasks, return_exceptions=True), timeout, self.log, "tasks")
        for server in self.servers:
            await _bounded(server.wait_closed(), timeout, self.log, "listeners")
        for path in self._unix_paths:
            path.unlink(missing_ok=True)
        if self.gc is not None:
            self.gc.close()
        self.log.info("parent partition stopped")

    async def _until_idle(self) -> None:
        while busy := [conn for conn in self.connections if not conn.idle.is_set()]:
            await busy[0].idle.wait()


def tls_listener_context(config: Config, url: str) -> ssl.SSLContext:
    """The server context of ``tls://`` listener ``url`` (a ConfigError when ``[tls]`` has none)."""
    ctx = config.tls.context
    if tls_query(url):
        raise ConfigError(f"listener {url}: a listening URL takes no TLS options; the parent's certificate "
                          f"and client CA are in [tls]")
    if ctx is None:
        raise ConfigError(f"listener {url} needs the parent's certificate: [tls] cert_file and key_file")
    return ctx


def warn_auth(config: Config, log: Any) -> None:
    """Say once where partitions may connect without a secret, and where none can connect at all."""
    auth = config.auth
    open_on = [u for u in config.listen if auth.open_allowed(u)]
    if open_on:
        log.warning("partitions with no secret configured may connect unauthenticated on local "
                    "listeners ([auth] mode = \"open-on-loopback\")", listeners=open_on,
                    hint='[auth] mode = "required" refuses them')
    closed = [u for u in config.listen if not auth.open_allowed(u)]
    if closed and not auth.configured:
        log.warning("no partition can connect on these listeners: they take only authenticated "
                    "partitions, and no [[auth.partition]] has a secret", listeners=closed,
                    hint="parent-partition secret new NAME --dir secrets/")


class Listener:
    """A bound listening socket: its URL as configured, what it is bound to (``endpoint``), and for a Unix
    listener the path to remove once nobody listens there."""

    def __init__(self, url: str, kind: str, sock: socket.socket, endpoint: str, unix_path: Path | None) -> None:
        self.url, self.kind, self.sock, self.endpoint, self.unix_path = url, kind, sock, endpoint, unix_path


def bind_listener(url: str) -> Listener:
    """Bind ``url``'s socket (an OSError says why not): what every listener's accept path is given."""
    kind, where, port = parse_endpoint(url)
    if kind in ("tcp", "tls"):
        family, *_, address = socket.getaddrinfo(where or None, port, type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, (exc.strerror or str(exc)).lower()) from None  # as asyncio words it
        except BaseException:
            sock.close()
            raise
        host, bound = sock.getsockname()[:2]
        return Listener(url, kind, sock, f"{kind}://{host}:{bound}", None)
    path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        if _unix_in_use(path):
            raise OSError(errno.EADDRINUSE, "another parent is listening there")
        path.unlink()
    elif path.exists() or path.is_symlink():
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; remove it or choose another path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1024)
        os.chmod(path, 0o660)
    except BaseException:
        sock.close()
        raise
    return Listener(url, "unix", sock, f"unix:{path}", path)


async def _bounded(aw: Any, timeout: float, log: Any, stage: str) -> None:
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.warning("shutdown stage timed out", stage=stage, timeout=timeout)


def _unix_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def _listen_hint(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "; is another parent-partition running? stop it or choose another --listen"
    if exc.errno == errno.EACCES:
        return "; choose a path or port this user may use"
    return ""


# ---- start-up checks: what would otherwise fail later, for every child, with an opaque status -----------

def check_paths(config: Config) -> None:
    """The data directory can hold disks, and each enabled device's own checks pass (LUN images open)."""
    data = config.data_path
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data directory {data}: {os_reason(exc)}; choose another --data-dir") from None
    if not os.access(data, os.W_OK | os.X_OK):
        raise ConfigError(f"data directory {data}: not writable by this user; choose another --data-dir")
    host = host_context(config)
    for name, cls in config.vsp_classes().items():
        if config.devices[name]:
            cls.check(config.section(name), host)
