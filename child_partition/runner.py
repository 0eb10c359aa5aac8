"""One child partition's life: connect, negotiate, bind a VSC to every offer, run, and shut down cleanly.

The guest-side order is Linux's: vmbus_connect (INITIATE_CONTACT, newest version first), REQUESTOFFERS,
probe a driver per offer (GPADL for the ring, OPENCHANNEL, device handshake); on rescind the driver is
removed (CLOSECHANNEL, no teardown, RELID_RELEASED); on shutdown every channel is closed and its GPADL
torn down, then UNLOAD waits for UNLOAD_RESPONSE (drivers/hv/vmbus_drv.c ``hv_kexec_handler`` /
``vmbus_initiate_unload``). A lost connection is retried with exponential backoff and renegotiated;
a refusal no retry can change (the name is taken, no version in common) ends the run. A device that fails
to open costs that device only, as a Linux driver whose probe fails leaves the other devices bound.

The runner names no device: drivers come from the registry by class GUID, sub-channel offers go to their
primary's driver (Linux ``vmbus_onoffer`` → the primary's ``sc_creation_callback``), and what a device
gives the rest of the guest (storage: its disks and their NBD export) is its guest service, told
``on_ready``/``on_lost`` as drivers come and go.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import random
import socket
import ssl
import stat
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from vmbus_proto import messages as m
from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import ChannelClosed
from vmbus_proto.aio.endpoint import parse_endpoint, without_query
from vmbus_proto.aio.tls import client_context, permanent, tls_reason
from vmbus_proto.aio.transport import KEEPALIVE
from vmbus_proto.envelope import SHARED, STREAM
from vmbus_proto.errors import DeviceProtocolError, ProtocolError
from vmbus_proto.framing import FrameKind, encode_frame
from vmbus_proto.versions import version_text

from .bus import BusError, GuestBus, ParentRefused
from .devices import vsc_classes
from .guest_memory import GuestMemory
from .services import guest_services
from .vsc import GuestContext, GuestService, GuestServiceError, Vsc

S = TypeVar("S", bound=GuestService)

NEGOTIATE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0  # a TCP connect (and TLS handshake) that has had no answer by then is tried again

# Exit statuses of ``ChildPartition.run`` (2 is left to usage errors, as argparse uses it).
EXIT_OK = 0  # unloaded cleanly after stop
EXIT_LOST = 1  # the parent could not be reached or the session ended, and reconnecting is off
EXIT_REFUSED = 3  # the parent refused this child, or the address can never be connected to


# connect() errors that mean "no parent there yet": retried.
_NOT_YET = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                      errno.ECONNRESET, errno.EAGAIN, errno.ECONNABORTED})
# What to do about each kind of ParentRefused.
_REFUSAL_HINTS = {
    "name-taken": "choose another --name (or stop the child that uses this one)",
    "hello": "check --name: 1-64 printable characters",
    "envelope": "run a parent-partition and a child-partition of the same release",
    "auth": "give this child --secret-file with the secret the parent holds for this name ([[auth.partition]]; "
            "parent-partition secret new NAME makes one)",
    "auth-failed": "check --secret-file: it must hold the same secret as the parent's [[auth.partition]] "
                   "secret_file for this name",
    "auth-parent": "the parent does not hold this partition's secret: check its [[auth.partition]] secret_file "
                   "and that --connect reaches the right parent",
    "auth-cert": "give --tls-cert and --tls-key: a certificate signed by the parent's [tls] client_ca_file whose "
                 "CN or DNS subjectAltName is this --name",
    "replaced": "another child authenticated under this name took over ([auth] replace = true); stop one of them",
    "not-a-parent": "check --connect: it must be an address given to parent-partition serve --listen",
    "versions": "drop --vmbus-version to offer Linux's versions (5.3 to 2.4), or offer one that the parent's "
                "[parent] vmbus_versions lists",
}


async def open_bus(url: str, name: str, **kw: Any) -> GuestBus:
    """Connect to the parent at ``url`` (``tls://``: with the TLS options of its query, ``tls.ClientTls``) and
    send the HELLO. A TLS handshake failure is an ssl.SSLError (``tls.permanent`` says whether to retry)."""
    loop = asyncio.get_running_loop()
    kind, where, port = parse_endpoint(url)
    bus: GuestBus
    if kind == "tls":
        ctx, server_name = client_context(url)
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, bus = await loop.create_connection(lambda: GuestBus(name, **kw), where, port, ssl=ctx,
                                                  server_hostname=server_name or where,
                                                  ssl_handshake_timeout=NEGOTIATE_TIMEOUT)
    elif kind == "tcp":
        async with asyncio.timeout(CONNECT_TIMEOUT):  # a path that drops SYNs: the kernel would retry ~2 min
            _, bus = await loop.create_connection(lambda: GuestBus(name, **kw), where, port)
    else:
        bus = GuestBus(name, **kw)
        memory: GuestMemory | None = kw.get("memory")
        if memory is None or memory.fd is None:
            await loop.create_unix_connection(lambda: bus, where)
            return bus
        # Shared-memory mode (docs/protocol.md §14): the guest's memory travels with the HELLO's bytes.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, where)
            bus.offer_shared = True
            frame = encode_frame(FrameKind.HELLO, 0, bus.hello().encode())
            sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memory.fd]))])
            if sent < len(frame):
                await loop.sock_sendall(sock, frame[sent:])
            await loop.create_unix_connection(lambda: bus, sock=sock)
        except BaseException:
            sock.close()
            raise
    return bus


MEMORY_MODE_ENV = "VMBUS_MEMORY_MODE"
MEMORY_MODE_CHOICES = ("auto", SHARED, STREAM)


def memory_mode_for(url: str, asked: str | None = None) -> str:
    """The memory mode a child offers at ``url`` (docs/protocol.md §14): ``asked`` (or ``$VMBUS_MEMORY_MODE``)
    when it is "shared" or "stream", and "auto" is shared on a Unix socket; TCP and TLS always stream."""
    mode = asked or os.environ.get(MEMORY_MODE_ENV) or "auto"
    if mode not in MEMORY_MODE_CHOICES:
        raise ValueError(f"memory mode {mode!r} is not one of {', '.join(MEMORY_MODE_CHOICES)}")
    unix = parse_endpoint(url)[0] == "unix"
    return SHARED if unix and mode != STREAM else STREAM


class ChildPartition:
    def __init__(self, url: str, name: str, *, trace: bool = False, memory: int = 512 * 1024 * 1024,
                 versions: list[int] | None = None, reconnect: bool = True, log: Any = None,
                 secret: bytes | None = None, keepalive: tuple[int, int, int] = KEEPALIVE,
                 plugins: Sequence[type[Vsc]] = (), memory_mode: str | None = None, **options: Any) -> None:
        """``options`` are the guest services' own (storage: ``nbd``, the URL to export the disks at);
        ``secret`` the partition's, proved to the parent on every connection (docs/protocol.md §3.1); a
        ``tls://`` ``url`` carries its TLS options in its query (``tls.connect_url``);
        ``keepalive`` TCP keepalive's idle, interval and count: a parent gone silent is left after their sum;
        ``plugins`` more drivers (``--device-plugin``), bound by their spec's class GUID like the registry's;
        ``memory_mode`` "shared", "stream" or "auto" (shared on a Unix socket; default: ``$VMBUS_MEMORY_MODE``,
        else auto; ``memory_mode_for``)."""
        self.connect_url = url
        self.url = without_query(url)  # what messages show
        self.name = name
        self.secret = secret
        self.keepalive = keepalive
        self.trace = trace
        self.versions = versions
        self.reconnect = reconnect
        self.log = log if log is not None else logs.get(partition=name)
        self.memory_mode = memory_mode_for(url, memory_mode)
        self.memory = GuestMemory(memory, shared=self.memory_mode == SHARED)
        self.vscs: dict[int, Vsc] = {}
        self.bus: GuestBus | None = None
        self.version = 0
        self.ready = asyncio.Event()
        self.sessions = 0
        ctx = GuestContext(name, self.log, options, self)
        self.drivers: dict[uuid.UUID, type[Vsc]] = {**vsc_classes(), **{p.spec.class_id: p for p in plugins}}
        extra = [p.Service for p in plugins if p.Service is not None]
        self.services: dict[type[GuestService], GuestService] = {
            cls: cls(ctx) for cls in dict.fromkeys([*guest_services(), *extra])}
        self.exit_status = 0
        self._stop: asyncio.Event | None = None
        self.failure: str | None = None  # why run() gave up, in one line
        self.negotiated = False  # a session of ours was accepted (its name was ours)
        self.failed_devices: dict[int, str] = {}  # relid -> why its driver could not attach
        self._tasks: set[asyncio.Task[Any]] = set()
        self._silent = 0  # TLS connections in a row the parent dropped without a word (_tls_silent)

    def service(self, cls: type[S]) -> S:
        """This child's instance of a guest service (``StorageService`` holds the disks)."""
        svc = self.services[cls]
        assert isinstance(svc, cls)
        return svc

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the exit status (0 after a clean unload). Raises
        GuestServiceError, before connecting to the parent, if a guest service cannot start (a busy NBD
        port)."""
        self._stop = stop
        started: list[GuestService] = []
        try:
            for svc in self.services.values():
                await svc.start()
                started.append(svc)
            status = await self._run(stop)
            return status or self.exit_status
        finally:
            for svc in started:
                await svc.close()

    async def _run(self, stop: asyncio.Event) -> int:
        backoff = 0.1
        waiting = False  # the last connect found no parent (the hint how to start one is given once)
        while not stop.is_set():
            try:
                self.bus = await open_bus(self.connect_url, self.name, trace=self.trace, versions=self.versions,
                                          memory=self.memory, log=self.log, secret=self.secret,
                                          keepalive=self.keepalive)
            except OSError as exc:
                reason, not_yet = self._connect_failed(exc)
                if self._tls_silent(isinstance(exc, ConnectionResetError | ssl.SSLEOFError)):
                    return self._give_up(EXIT_REFUSED, self._tls_refusal())
                if not not_yet:
                    return self._give_up(EXIT_REFUSED, f"cannot connect to the parent at {self.url}: {reason}")
                if not self.reconnect:
                    return self._give_up(EXIT_LOST, f"no parent at {self.url} ({reason}); start one with "
                                                    f"'parent-partition serve --listen {self.url}'")
                hint = {} if waiting else {"hint": f"start one with: parent-partition serve --listen {self.url}"}
                self.log.warning("waiting for the parent", url=self.url, error=reason, retry_in=round(backoff, 2),
                                 **hint)
                waiting = True
                if await _wait(stop, backoff):
                    break
                backoff = min(backoff * 2, 5.0)
                continue
            waiting = False
            try:
                await self._session(self.bus, stop)
                backoff = 0.1
            except ParentRefused as exc:
                await self._forget(self.bus)
                # Our own previous connection may still hold the name until the parent notices it is gone.
                if not (exc.kind == "name-taken" and self.negotiated and self.reconnect):
                    return self._give_up(EXIT_REFUSED, self._refusal(exc))
                self.log.warning("the parent still holds this partition's previous connection", error=str(exc))
            except (ConnectionError, BusError, TimeoutError, ChannelClosed, ProtocolError) as exc:
                error = (str(exc) or type(exc).__name__) + self._unanswered_hint()
                await self._forget(self.bus)
                if self._tls_silent(isinstance(exc, ConnectionError) and self.bus.bytes_in == 0):
                    return self._give_up(EXIT_REFUSED, self._tls_refusal())
                if not self.reconnect:
                    return self._give_up(EXIT_LOST, f"the session with the parent at {self.url} ended: {error}")
                self.log.warning("session with the parent ended", error=error)
            if stop.is_set():
                break  # unloaded because we were asked to stop
            delay = backoff * (0.5 + random.random())
            self.log.info("reconnecting", retry_in=round(delay, 2))
            if await _wait(stop, delay):
                break
            backoff = min(backoff * 2, 5.0)
        return EXIT_OK

    def _give_up(self, status: int, why: str) -> int:
        """End the run: ``failure`` is the one line the command prints."""
        self.failure = why
        return status

    def _refusal(self, exc: ParentRefused) -> str:
        if exc.kind == "name-taken":
            what = f"partition name {self.name!r} is already connected to the parent at {self.url}"
        else:
            what = f"the parent at {self.url} refused this child: {exc.reason}"
        return f"{what}; {_REFUSAL_HINTS[exc.kind]}"

    def _tls_silent(self, silent: bool) -> bool:
        """Count a TLS connection the parent dropped without a word (no byte after the handshake, or a reset in
        it): how a TLS server refuses a client certificate (asyncio sends no alert). True on the second in a row
        (the first may be a parent that was restarting), when the run should end."""
        if not self.url.startswith("tls://"):
            return False
        self._silent = self._silent + 1 if silent else 0
        return self._silent >= 2

    def _tls_refusal(self) -> str:
        return (f"the parent at {self.url} dropped the TLS connection without a word, twice: it does not accept "
                f"this child's certificate (the parent's log says why); check --tls-cert and --tls-key: the "
                f"parent's [tls] client_ca_file must have signed it")

    def _unanswered_hint(self) -> str:
        """For a session that ended before the parent said a word: a TLS listener drops a plain client."""
        if self.bus is not None and self.bus.bytes_in == 0 and self.url.startswith("tcp://"):
            return ("; the parent closed the connection before answering HELLO: if it listens with TLS, connect "
                    "with tls:// (and --tls-ca)")
        return ""

    def _connect_failed(self, exc: OSError) -> tuple[str, bool]:
        """Why a connect failed, and whether that means the parent is not there yet (retry) rather than
        that the address never can work."""
        if isinstance(exc, ssl.SSLError):
            hint = "; is it a tcp:// listener?" if "does not speak TLS" in tls_reason(exc) else ""
            return f"TLS: {tls_reason(exc)}{hint}", not permanent(exc)
        if isinstance(exc, TimeoutError):
            return f"no answer within {CONNECT_TIMEOUT:g} s (a path that drops packets, or a parent too busy)", True
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve the host: {exc.strerror}", exc.errno == socket.EAI_AGAIN
        if exc.errno == errno.ENOENT:
            return "no socket file there", True
        if exc.errno == errno.ECONNREFUSED and self.url.startswith("unix:"):
            with contextlib.suppress(OSError):
                if not stat.S_ISSOCK(os.stat(parse_endpoint(self.url)[1]).st_mode):
                    return "that path is not a socket", False
        text = os.strerror(exc.errno) if exc.errno else str(exc)
        return text[:1].lower() + text[1:], exc.errno in _NOT_YET

    async def _session(self, bus: GuestBus, stop: asyncio.Event) -> None:
        self.sessions += 1
        self.failed_devices.clear()
        offers = await asyncio.wait_for(bus.negotiate(), NEGOTIATE_TIMEOUT)
        self.negotiated = True
        self.version = bus.core.version
        self.log.info("VMBus negotiated", version=version_text(bus.core.version), offers=len(offers))
        bus.on_rescind = lambda relid: self._spawn(self._rescinded(relid))
        bus.on_offer = lambda offer: self._spawn(self._attach(offer))
        # Every driver probes; a device's own failure is logged by _attach, anything else ends the session.
        results = await asyncio.gather(*(self._attach(o) for o in sorted(offers.values(), key=lambda o: o.child_relid)),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        devices = sorted(v.spec.name for v in self.vscs.values())
        versions = {v.spec.name: v.spec.version_text(v.version) for v in self.vscs.values() if v.version is not None}
        if self.failed_devices:
            self.log.warning("offered channels open except the failed devices", channels=len(self.vscs),
                             devices=devices, failed=sorted(self.failed_devices.values()))
        else:
            self.log.info("all offered channels open", channels=len(self.vscs), devices=devices, versions=versions)
        await self._session_ready()
        self.ready.set()
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        lost: asyncio.Future[Any] = bus.closed_future
        await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if bus.closed_future.done():
            self.ready.clear()
            why = f"connection to the parent lost: {bus.closed_future.result()}"
            raise bus.refused or ConnectionResetError(bus.close_reason or why)
        await self.shutdown(bus)

    async def _attach(self, offer: m.OfferChannel) -> None:
        if offer.sub_channel_index:
            await self._attach_subchannel(offer)
            return
        cls = self.drivers.get(offer.if_type)
        if cls is None:
            self.log.info("no driver for offer", relid=offer.child_relid, class_id=str(offer.if_type))
            return
        assert self.bus is not None
        bus = self.bus
        vsc = cls(bus, self.memory, offer, self.log)
        vsc.service = self.services.get(cls.Service) if cls.Service is not None else None
        self.vscs[offer.child_relid] = vsc
        try:
            await vsc.attach()
        except (BusError, TimeoutError, DeviceProtocolError, ChannelClosed) as exc:
            if bus.closing or isinstance(exc, ParentRefused):
                raise  # the connection went, not the device
            await self._drop_device(vsc, str(exc) or type(exc).__name__)
            return
        except Exception as exc:  # a driver's bug costs its device, as a Linux driver whose probe oopses
            if bus.closing:
                raise
            vsc.log.error("device driver raised during attach", exc_info=True)
            await self._drop_device(vsc, f"{type(exc).__name__}: {exc}")
            return
        vsc.log.info("device ready", version=vsc.spec.version_text(vsc.version) if vsc.version is not None else None)
        if cls.Service is not None:
            await self.services[cls.Service].on_ready(vsc)

    def _primary_of(self, offer: m.OfferChannel) -> Vsc | None:
        return next((v for v in self.vscs.values()
                     if (v.offer.if_type, v.offer.if_instance) == (offer.if_type, offer.if_instance)), None)

    async def _attach_subchannel(self, offer: m.OfferChannel) -> None:
        primary = self._primary_of(offer)
        if primary is None:
            self.log.warning("sub-channel offer without its primary", relid=offer.child_relid,
                             index=offer.sub_channel_index)
            return
        try:
            await primary.on_subchannel_offer(offer)
        except (BusError, TimeoutError, DeviceProtocolError, ChannelClosed) as exc:
            if primary.bus.closing or isinstance(exc, ParentRefused):
                raise
            primary.log.error("sub-channel failed to open; the device goes on without it", relid=offer.child_relid,
                              error=str(exc) or type(exc).__name__)

    async def _drop_device(self, vsc: Vsc, error: str) -> None:
        """A driver whose probe failed: log why, give back what it holds; the other devices carry on."""
        self.vscs.pop(vsc.relid, None)
        self.failed_devices[vsc.relid] = vsc.spec.name
        vsc.log.error("device failed to attach; continuing without it", error=error,
                      hint="the parent's log ('device failed to open') says why it refused")
        try:
            await asyncio.wait_for(vsc.detach(), NEGOTIATE_TIMEOUT)
        except (BusError, TimeoutError, ChannelClosed, ConnectionError):
            vsc.forget()

    async def _session_ready(self) -> None:
        """Tell each guest service the session is up; one that fails unloads the VM cleanly (status 1)."""
        for svc in self.services.values():
            try:
                await svc.session_ready()
            except GuestServiceError as exc:
                self.log.error("a guest service failed; shutting the VM down", error=str(exc))
                self.exit_status = 1
                if self._stop is not None:
                    self._stop.set()

    def _lost(self, vsc: Vsc) -> None:
        if vsc.Service is not None:
            self.services[vsc.Service].on_lost(vsc)

    async def _rescinded(self, relid: int) -> None:
        vsc = self.vscs.pop(relid, None)
        owner = next((v for v in self.vscs.values() if relid in v.subchannels), None)
        device = vsc or owner
        self.log.info("offer rescinded", relid=relid, device=device.spec.name if device else None)
        if vsc is not None:
            self._lost(vsc)
            await vsc.detach(rescinded=True)
        elif owner is not None:
            await owner.on_subchannel_rescind(relid)
        if self.bus is not None:
            self.bus.release_relid(relid)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A hot-added device or a rescind whose connection went meanwhile: the session loop reports that.
            self.log.debug("background task ended with the connection", error=str(task.exception()))

    async def shutdown(self, bus: GuestBus) -> None:
        """Close every channel, tear down its GPADL, then UNLOAD."""
        for task in list(self._tasks):
            task.cancel()
        for svc in self.services.values():
            await svc.close()  # in-flight service requests (NBD) finish on the channels first
        for vsc in self.vscs.values():
            self._lost(vsc)
        await asyncio.gather(*(v.detach() for v in list(self.vscs.values())))
        self.vscs.clear()
        await asyncio.wait_for(bus.unload(), NEGOTIATE_TIMEOUT)
        self.log.info("unloaded cleanly")
        bus.close()
        await asyncio.shield(bus.closed_future)

    async def _forget(self, bus: GuestBus | None) -> None:
        """After a lost connection: guest-side state goes; pages are returned."""
        for vsc in self.vscs.values():
            self._lost(vsc)
            vsc.forget()
        self.vscs.clear()
        if bus is not None:
            bus.close()


async def _wait(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` unless ``stop`` is set first; returns whether it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()
