"""One child partition's connection to the parent: the asyncio shell around ``vmbus_proto.server``.

It plays the part of the Hyper-V VMBus server for one guest (OpenVMM vmbus_server/src/lib.rs: one async
loop driving the synchronous channel state machine): control messages go into the core, the core's
actions come out as messages to send and device open/close calls on the shared VSPs.

It also holds what the devices of this partition share (OpenVMM gives a device the same): the guest-memory
view, each channel's GPADL map (a GPADL_TEARDOWN waits until the device let go of that GPADL) and the
sub-channels each primary has offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, assert_never

from vmbus_proto import messages as m
from vmbus_proto import server as core
from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import Channel
from vmbus_proto.aio.shared import SharedChannel
from vmbus_proto.aio.tls import name_matches, peer_names
from vmbus_proto.aio.transport import FramedConnection
from vmbus_proto.auth import AuthError, HostAuth
from vmbus_proto.channel import ChannelRings
from vmbus_proto.envelope import AUTH_NONE, CERT_REFUSED, REPLACED, SHARED, Hello
from vmbus_proto.errors import DeviceProtocolError, FrameError, MessageError, PacketError
from vmbus_proto.framing import ENVELOPE_VERSION, Frame, FrameKind
from vmbus_proto.limits import OUTPUT, MemoryBudget, PartitionBytes, Strikes, TokenBucket
from vmbus_proto.packets import PAGE_SIZE
from vmbus_proto.shm_ring import RingIn, RingOut
from vmbus_proto.versions import version_text

from .accept import FirstMessage
from .auth import AuthSettings
from .config import LimitsSettings
from .counters import Totals
from .guest_map import SharedGuestMemory, SharedMemoryError
from .ioports import EmulatedDevice, PartitionPorts
from .memory import GpadlMap, HostMemory, MappedMemory, ShadowMemory
from .vsp import ChannelResources, NoSubchannels, SubchannelControl, Vsp

_CONNECTION_IDS = itertools.count(1)  # keys the log limiter per connection (logs.LIMIT_KEY)
ABUSE = "abuse"  # the CLOSE code of a connection ended for repeated limit violations
NAME_GRACE = 2.0  # seconds a newcomer waits for a name's old connection to go before "already connected"
OUTPUT_SAMPLE = 0.05  # seconds between samples of output a partition has not read yet (while there is some)


def _no_secret(_name: str) -> bytes | None:
    return None


class ConnectionConfig(Protocol):
    """The settings a partition's connection uses (``config.Config`` has them)."""

    max_frame: int
    stall_timeout: float
    frame_timeout: float
    keepalive: tuple[int, int, int]
    channel_data_window: int
    handshake_timeout: float
    max_partitions: int
    shared_memory: bool
    vmbus_versions: list[int]
    max_gpadls: int
    trace: bool
    auth: AuthSettings
    limits: LimitsSettings


class Host(Protocol):
    """What a partition's connection sees of the daemon: its settings, its VSPs and the other partitions
    (only to refuse a second connection under one name and to count toward the limit)."""

    name: str
    log: Any
    vsps: list[Vsp]
    emulated: list[EmulatedDevice]  # devices on trapped I/O ports, attached to each accepted partition
    accepting: bool
    connections: set[PartitionConnection]
    partitions: dict[str, PartitionConnection]
    totals: Totals  # what closed channels and gone connections carried (the JSON API and /metrics read it)
    budget: MemoryBudget  # bytes held for all partitions ([limits] memory_budget)

    @property
    def config(self) -> ConnectionConfig: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    def partitions_changed(self) -> None: ...  # a partition came or went, or a channel opened

    def room_for_connection(self) -> bool: ...  # one more connection fits max_partitions (every worker's)

    def name_released(self, name: str) -> None: ...  # the partition left (another worker may take its name)

    # None in a single process; a worker process asks its supervisor whether a name is free (workers.py)
    claims: NameClaims | None


class NameClaims(Protocol):
    """Partition names across worker processes: each is connected at most once in the whole parent."""

    async def claim(self, name: str, replace: bool, peer: str) -> bool: ...


class PartitionConnection(FramedConnection):
    def __init__(self, daemon: Host, transport_name: str, *, open_allowed: bool = False,
                 first: FirstMessage | None = None) -> None:
        """``open_allowed``: a partition with no secret configured may connect unauthenticated here (the
        listener is local and ``[auth] mode`` is open-on-loopback; ``AuthSettings.open_allowed``). ``first``:
        a Unix child's first bytes and the fds that came with them (its guest memory, docs/protocol.md §14)."""
        cfg = daemon.config
        super().__init__(max_frame=cfg.max_frame, stall_timeout=cfg.stall_timeout,
                         data_window=cfg.channel_data_window, frame_timeout=cfg.frame_timeout,
                         keepalive=cfg.keepalive, log=daemon.log.bind(transport=transport_name))
        self.daemon = daemon
        self.open_allowed = open_allowed
        self.handshake: HostAuth | None = None  # from the guest's HELLO on
        self.authenticated = False
        self.released = asyncio.Event()  # gone, and its devices have let go of its channels and GPADLs
        self.partition: str | None = None
        self.peer = "?"
        self.cert_names: list[str] | None = None
        self.core: core.HostConnection | None = None
        self.vsps: dict[str, Vsp] = {}
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.opened_channels = 0
        self.dropped_messages = 0
        self.transport_name = transport_name
        self.connected_at: float | None = None  # wall-clock time of the accepted HELLO
        self.vmbus_connected_at: float | None = None  # of the accepted INITIATE_CONTACT (None while not connected)
        lim = cfg.limits
        # Every byte the parent holds on this partition's behalf, charged to its cap and the parent's budget.
        self.account = PartitionBytes(lim.partition_bytes, daemon.budget)
        self.memory: HostMemory = ShadowMemory(account=self.account,
                                   on_refused=lambda why: self._refused("bytes held for the partition", why))
        self._output_sample: asyncio.TimerHandle | None = None
        self.idle = asyncio.Event()  # no channel open (shutdown waits for every partition's)
        self.idle.set()
        self._gpadl_maps: dict[int, GpadlMap] = {}  # by relid
        self._subchannels: dict[int, list[int]] = {}  # primary relid -> its sub-channels' relids
        self._control_rate = TokenBucket(lim.control_per_second, lim.control_burst)
        self._strikes = Strikes(lim.strikes, lim.strike_window)
        self.limit_refusals = 0  # requests refused for a [limits] limit
        self.ports: PartitionPorts | None = None  # the partition's I/O-port space, once accepted
        self.first = first
        self.shared: SharedGuestMemory | None = None  # the guest's memory, mapped (shared-memory mode)

    # ---- connection lifetime ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.cert_names = peer_names(transport)  # a TLS listener's verified client certificate, else None
        self.log = self.log.bind(peer=self.peer, **{logs.LIMIT_KEY: next(_CONNECTION_IDS)})
        if not self.daemon.accepting:
            self.close("parent is shutting down")
            return
        if not self.daemon.room_for_connection():
            self.log.warning("partition limit reached; refusing connection")
            self.close(f"partition limit of {self.daemon.config.max_partitions} reached")
            return
        self.daemon.connections.add(self)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.daemon.config.handshake_timeout, self._handshake_expired)
        if self.first is not None:
            self.feed(self.first.data)  # what the acceptor's recvmsg read, HELLO first

    def _handshake_expired(self) -> None:
        what = ("HELLO" if self.handshake is None else "AUTH" if self.partition is None
                else "accepted INITIATE_CONTACT")
        self.fail(f"handshake timeout: no {what} within {self.daemon.config.handshake_timeout:g}s")

    def on_connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.first is not None:
            self.first.close()
        if self.shared is not None:
            self.shared.close()
        self.daemon.connections.discard(self)
        if self.partition is not None and self.daemon.partitions.get(self.partition) is self:
            del self.daemon.partitions[self.partition]
            self.daemon.name_released(self.partition)
            self.daemon.partitions_changed()
        # Release this child's channels and GPADLs only; every other partition is untouched.
        open_now = [(self.vsps[ch.name], ch) for ch in list(self.channels.values()) if ch.name in self.vsps]
        totals = self.daemon.totals
        for ch in self.channels.values():
            totals.retire(self.partition or "?", ch)
        totals.transport_bytes_in += self.bytes_in
        totals.transport_bytes_out += self.bytes_out
        totals.dropped_messages += self.dropped_messages
        if self.partition is not None:
            totals.forget(self.partition)
        if self.ports is not None:
            self.ports.close()
        self.channels.clear()
        if self.core is not None:
            self.core.release()  # its GPADLs' bytes go back to the memory budget
        if self._output_sample is not None:
            self._output_sample.cancel()
        self.account.release()  # and so does all else it held
        self.idle.set()
        if open_now:
            self.daemon.spawn(self._release_devices(open_now))
        else:
            self.released.set()
        self.log.info("partition disconnected", channels_released=len(open_now), reason=self.loss_reason(exc))

    async def _release_devices(self, open_now: list[tuple[Vsp, Channel]]) -> None:
        try:
            for vsp, ch in open_now:
                await vsp.close(ch)
            for gpadls in self._gpadl_maps.values():
                gpadls.release_all()
        finally:
            self.released.set()

    def add_channel(self, ch: Channel) -> None:
        super().add_channel(ch)
        self.idle.clear()

    def remove_channel(self, relid: int) -> Channel | None:
        ch = super().remove_channel(relid)
        if ch is not None:
            self.daemon.totals.retire(self.partition or "?", ch)
        if not self.channels:
            self.idle.set()
        return ch

    # ---- frames -----------------------------------------------------------------------------------------

    def on_hello(self, frame: Frame) -> None:
        if self.handshake is not None:
            raise FrameError("second HELLO on one connection")
        try:
            hello = Hello.decode(frame.body)
        except FrameError as exc:
            self._refuse("hello", f"FrameError: {exc}")
            return
        if hello.envelope != ENVELOPE_VERSION:
            self._refuse("envelope", f"envelope version {hello.envelope} is not supported "
                                     f"(this parent speaks {ENVELOPE_VERSION})")
            return
        auth = self.daemon.config.auth
        lookup: Callable[[str], bytes | None] = auth.lookup
        open_allowed = self.open_allowed
        if self.cert_names is not None:  # docs/protocol.md §3.3: a verified client certificate names the partition
            if not name_matches(hello.partition, self.cert_names):
                self._refuse(CERT_REFUSED, f"the client certificate is for {', '.join(map(repr, self.cert_names))}, "
                                           f"not partition {hello.partition!r}", partition=hello.partition)
                return
            if hello.auth == AUTH_NONE:  # the certificate is the proof; a guest with a secret proves it as well
                lookup, open_allowed, self.authenticated = _no_secret, True, True
        self.handshake = HostAuth(self.daemon.name, lookup, open_allowed, data_window=self.data_window)
        try:
            challenge = self.handshake.receive_hello(hello)
        except AuthError as exc:
            self._refuse(exc.code, exc.reason, partition=hello.partition, **exc.log_fields)
            return
        try:
            mode = self._memory_mode(hello)
        except SharedMemoryError as exc:
            self._refuse("hello", f"shared memory refused: {exc}", partition=hello.partition)
            return
        if challenge is not None:  # docs/protocol.md §3.1: the guest proves itself in an AUTH frame
            self.send_frame(FrameKind.HELLO, 0, dataclasses.replace(challenge, memory_mode=mode).encode())
            return
        self._admit(hello, FrameKind.HELLO, dataclasses.replace(self.handshake.reply(), memory_mode=mode).encode())

    def _memory_mode(self, hello: Hello) -> str | None:
        """The memory mode our HELLO answers (docs/protocol.md §14): "shared" when the child asked for it and its
        memfd passes the checks (a SharedMemoryError says why not), else None (a stream)."""
        first = self.first
        if hello.memory_mode != SHARED:
            if first is not None:
                first.close()  # fds nobody asked for
            return None
        if first is None or not first.fds:
            raise SharedMemoryError("HELLO memory_mode shared came without its memfd (SCM_RIGHTS on a Unix socket)")
        if len(first.fds) != 1 or first.truncated:
            raise SharedMemoryError(f"{len(first.fds)} fds came with the HELLO; shared memory is exactly one memfd")
        if not self.daemon.config.shared_memory:
            first.close()
            return None
        assert hello.memory is not None and hello.memory_base is not None  # Hello.decode's rule
        size = min(hello.memory, self.daemon.config.limits.guest_memory) - hello.memory_base
        self.shared = SharedGuestMemory.check(first.fds.pop(), size, hello.memory_base)
        return SHARED

    def on_auth(self, frame: Frame) -> None:
        if self.handshake is None or self.handshake.guest is None:
            raise FrameError("AUTH frame before HELLO")
        hello = self.handshake.guest
        try:
            answer = self.handshake.receive_proof(frame.body)
        except AuthError as exc:
            self._refuse(exc.code, exc.reason, partition=hello.partition, **exc.log_fields)
            return
        self.authenticated = True
        self._admit(hello, FrameKind.AUTH, answer)

    def _admit(self, hello: Hello, kind: FrameKind, answer: bytes, claimed: bool = False,
               waited: bool = False) -> None:
        """Take partition ``hello.partition`` under its name, answer with ``answer`` (the parent's HELLO, or
        its AUTH after a good proof) and get ready for INITIATE_CONTACT. A name already connected is refused,
        or, with ``[auth] replace`` and an authenticated newcomer, taken over: the old connection is closed
        and the answer waits until its devices have let go of its channels. A name still held is waited for
        up to ``NAME_GRACE`` seconds first (``waited``: it was). With worker processes the name is claimed
        from the supervisor first (``claimed``: it was)."""
        name = hello.partition
        old = self.daemon.partitions.get(name)
        replace = self.authenticated and self.daemon.config.auth.replace
        if old is not None and not replace:
            if waited:
                self._refuse("name-taken", f"partition name {name!r} is already connected", partition=name)
            else:  # a guest that unloads and reconnects at once can be back before its old connection is gone
                self._spawn(self._after(old, hello, kind, answer, claimed))
            return
        if old is None and self.daemon.claims is not None and not claimed:
            self._spawn(self._claim(hello, kind, answer, replace))
            return
        self.partition = name
        self.connected_at = time.time()
        self.daemon.totals.connections += 1
        self.peer_data_window = hello.data_window
        self.daemon.partitions[hello.partition] = self
        self.daemon.partitions_changed()
        self.log = self.log.bind(partition=hello.partition)
        if hello.partition.startswith(logs.PROBE_PREFIX):
            self.log = self.log.bind(probe=True)
        self._declare_memory(hello)
        if self.shared is not None:
            self.shared.map()
            self.memory = MappedMemory(self.shared.pages)
            self.log = self.log.bind(memory="shared")
        if old is None:
            self._accepted(kind, answer)
            return
        old.log.warning("partition replaced by a new authenticated connection", by=self.peer)
        old.close(f"partition {name!r} was replaced by a new authenticated connection from {self.peer}", REPLACED)
        self._spawn(self._replace(old, kind, answer))

    async def _after(self, old: PartitionConnection, hello: Hello, kind: FrameKind, answer: bytes,
                     claimed: bool) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(old.released.wait(), NAME_GRACE)
        if not self.closing:
            self._admit(hello, kind, answer, claimed, waited=True)

    async def _claim(self, hello: Hello, kind: FrameKind, answer: bytes, replace: bool) -> None:
        """Another worker process may hold the name: the supervisor says (and with ``replace`` ends it there)."""
        assert self.daemon.claims is not None
        name = hello.partition
        ok = await self.daemon.claims.claim(name, replace, self.peer)
        if self.closing:
            if ok and name not in self.daemon.partitions:
                self.daemon.name_released(name)
        elif not ok:
            self._refuse("name-taken", f"partition name {name!r} is already connected", partition=name)
        else:
            self._admit(hello, kind, answer, claimed=True)

    async def _replace(self, old: PartitionConnection, kind: FrameKind, answer: bytes) -> None:
        await old.released.wait()  # bounded by this connection's handshake timer
        if not self.closing:
            self._accepted(kind, answer, replaced=old.peer)

    def _accepted(self, kind: FrameKind, answer: bytes, **extra: Any) -> None:
        """The answer goes out and the VMBus server for this partition starts: INITIATE_CONTACT is next."""
        cfg = self.daemon.config
        self.vsps = {v.name: v for v in self.daemon.vsps}
        self.core = core.HostConnection([v.offer(self.partition or "?") for v in self.daemon.vsps],
                                        supported=cfg.vmbus_versions,
                                        limits=core.Limits(max_gpadls=cfg.max_gpadls,
                                                           total_gpadl_pages=cfg.limits.gpadl_pages,
                                                           budget=self.account, pfn_bound=self.pfn_bound))
        if self.daemon.emulated:
            self.ports = PartitionPorts(self.partition or "?", self.daemon.emulated, self.send_frame, self.log)
            self.ioport = self.ports.on_frame
        self.send_frame(kind, 0, answer)
        self.log.info("partition connected", authenticated=self.authenticated, **extra)

    def _declare_memory(self, hello: Hello) -> None:
        """The guest's memory map (HELLO ``memory``), capped by ``[limits] guest_memory``: GPA ranges and
        GPADLs naming a page beyond it are refused (Hyper-V's rule; docs/protocol.md §7.4)."""
        if hello.memory is None:
            return  # not declared: any page, as before; the shadow's own limit still holds
        cap = self.daemon.config.limits.guest_memory
        if hello.memory > cap:
            self.log.warning("guest memory capped", declared=hello.memory, cap=cap)
        self.pfn_bound = min(hello.memory, cap) // PAGE_SIZE
    def _refuse(self, code: str, reason: str, **fields: Any) -> None:
        """A HELLO (or proof) this parent will not accept however often it comes: not a protocol error, a
        refusal. ``fields`` go to the log only (``detail``: what the guest is not told)."""
        self.log.warning("partition refused", code=code, reason=reason, **fields)
        self.close(reason, code)

    def on_control(self, frame: Frame) -> None:
        if self.core is None:
            raise FrameError("CONTROL frame before HELLO" if self.handshake is None
                             else "CONTROL frame before the partition was accepted")
        if not self._control_rate.take(time.monotonic()):
            self.dropped_messages += 1
            lim = self.daemon.config.limits
            self._refused("control messages per second",
                          f"control message dropped: over {lim.control_per_second} a second "
                          f"(burst {lim.control_burst})")
            return
        try:
            msg = m.decode(frame.body)
        except MessageError as exc:
            # Linux and OpenVMM drop a message they cannot parse; so do we (a GPADL still gets its answer).
            self.core.receive_malformed(exc)
            self._run_actions()
            return
        if self.daemon.config.trace:
            self.log.info("G>H " + msg.describe(self.core.version or None))
        self.core.receive(msg)
        self._run_actions()

    # ---- the core's actions -----------------------------------------------------------------------------

    def _run_actions(self) -> None:
        """Carry out every action the core has queued, including those that carrying one out queues."""
        assert self.core is not None
        while acts := self.core.actions():
            for act in acts:
                self._run_action(act)

    def _run_action(self, act: core.Action) -> None:
        assert self.core is not None
        match act:
            case core.Send(message=msg):
                if self.daemon.config.trace:
                    self.log.info("H>G " + msg.describe(self.core.version or None))
                self.send_frame(FrameKind.CONTROL, 0, msg.encode())
            case core.DeviceOpen():
                self._spawn(self._device_open(act))
            case core.DeviceClose():
                self._spawn(self._device_close(act))
            case core.TeardownGpadl():
                self._spawn(self._teardown_gpadl(act))
            case core.Dropped(message=msg, kind=kind, reason=reason):
                self.dropped_messages += 1
                self.log.warning("control message dropped", kind=kind.value, reason=reason,
                                 message=msg.describe() if msg else None)
                if kind in core.LIMIT_KINDS:
                    self._refused(kind.value.replace("_", " "))
            case core.Connected(version=version):
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                    self._handshake_timer = None
                self.vmbus_connected_at = time.time()
                self.log.info("VMBus connected", version=version_text(version))
            case core.Disconnected(reason=reason):
                # No timer: a guest that unloaded (firmware, kexec, kdump) may contact again much later.
                self.vmbus_connected_at = None
                self.log.info("VMBus disconnected", reason=reason.value)
                self._subchannels.clear()  # an unload or reset ends them; relids are given anew
                self._gpadl_maps.clear()
            case core.ChannelFreed(relid=relid, name=name):
                self.log.info("rescinded channel released", relid=relid, device=name)
                for subs in self._subchannels.values():
                    if relid in subs:
                        subs.remove(relid)
                self._gpadl_maps.pop(relid, None)
            case _:
                assert_never(act)

    def _refused(self, what: str, log_line: str = "") -> None:
        """A request refused for a limit (``log_line``, if the refusal was not logged yet): one strike; the
        ``[limits] strikes``-th within ``strike_window`` ends the connection as abuse."""
        self.limit_refusals += 1
        if log_line:
            self.log.warning(log_line, limit=what)
        if self._strikes.strike(time.monotonic()) and not self.closing:
            lim = self.daemon.config.limits
            # Info: once per connection, so the per-peer log limiter (warnings) cannot hide it after a flood.
            self.log.info("connection ended for abuse", limit=what, strikes=lim.strikes, window=lim.strike_window)
            self.close(f"abuse: {what} ({lim.strikes} limit refusals within {lim.strike_window:g}s)", ABUSE)

    # ---- output the partition has not read ---------------------------------------------------------------

    def flush(self) -> None:
        super().flush()
        self._sample_output()

    def _sample_output(self) -> None:
        """Charge the output waiting for the partition to read it (the transport's write buffer). Past
        ``write_high`` (control replies always fit) it may not take the partition past its byte budget or
        the parent past its memory budget: a partition that does not read is dropped then, not after
        ``stall_timeout``. While output waits it is sampled again, as the peer reads it."""
        self._output_sample = None
        t = self.transport
        if t is None or self.closing:
            return
        n = t.get_write_buffer_size()
        account = self.account
        if n != account.by_kind[OUTPUT]:
            account.set(OUTPUT, n)
            if n > self._write_high and account.over:
                self._drop_unread(n)
                return
        if n and self._output_sample is None:
            self._output_sample = self._loop.call_later(OUTPUT_SAMPLE, self._sample_output)

    def _drop_unread(self, waiting: int) -> None:
        """Output the partition does not read took it past a budget. A CLOSE frame would wait behind that
        output, so the connection is reset; the reason is in our log."""
        assert self.transport is not None
        account, budget = self.account, self.daemon.budget
        self.limit_refusals += 1
        self.log.info("connection ended for abuse", limit="bytes held for the partition",
                      error=f"{waiting} bytes of output not read: {account.refusal(0)}",
                      partition_bytes=account.used, cap=account.cap, budget_used=budget.used,
                      budget=budget.capacity)
        self.closing = True
        self.transport.abort()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A device open, close or teardown that raised is our bug: it costs this partition's connection."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("internal error in a device operation; closing the connection", exc_info=exc)
            self._close_with(f"internal error: {type(exc).__name__}")

    async def _device_open(self, act: core.DeviceOpen) -> None:
        p = act.params
        vsp = self.vsps[act.offer.name]
        log = self.log.bind(relid=p.relid, device=vsp.name)
        started = time.perf_counter()
        ch = self._channel(p, vsp.name, log)
        self.add_channel(ch)
        primary = next((pr for pr, subs in self._subchannels.items() if p.relid in subs), 0)
        control: SubchannelControl = NoSubchannels() if primary else Subchannels(self, p.relid, act.offer)
        res = ChannelResources(self.partition or "?", act.offer, p, log, self.gpadl_map(p.relid), self.memory,
                               control, self.fail, trace=self.daemon.config.trace, primary=primary,
                               connection_lost=lambda: self.closing)
        ok = True
        try:
            await vsp.open(ch, res)
        except Exception as exc:
            ok = False
            # An OS error (a disk that cannot be opened) is expected; anything else is logged with its traceback.
            log.error("device failed to open", error=str(exc), exc_info=None if isinstance(exc, OSError) else exc)
            self.remove_channel(p.relid)
            ch.close()
        if self.closing or self.core is None:
            if ok:
                await vsp.close(ch)
            return
        if ok:
            self.opened_channels += 1
            self.daemon.totals.channels_opened[vsp.name] += 1
            self.daemon.totals.open_latency[vsp.name].observe(time.perf_counter() - started)
            log.info("channel open", ring_out=p.host_to_guest_data, ring_in=p.guest_to_host_data)
            self.daemon.partitions_changed()
        self.core.open_complete(p.relid, act.seq, ok)
        self._run_actions()

    def _channel(self, p: core.OpenParams, name: str, log: Any) -> Channel:
        """The channel's rings: accounted over a stream, or the ring GPADL's own pages in shared memory (its
        first ``downstream_offset`` pages the guest-to-host ring, the rest host-to-guest)."""
        if self.shared is None:
            rings = ChannelRings(p.relid, host=True, guest_to_host_data=p.guest_to_host_data,
                                 host_to_guest_data=p.host_to_guest_data, window_in=self.data_window,
                                 window_out=self.peer_data_window)
            return Channel(self, p.relid, rings, name=name, log=log)
        pages, pfns = self.shared.pages, list(p.gpadl.pfns)
        try:
            g2h, h2g = pages.ring(pfns[:p.downstream_offset]), pages.ring(pfns[p.downstream_offset:])
        except (PacketError, ValueError) as exc:
            raise DeviceProtocolError(f"ring GPADL {p.gpadl.gpadl:#x}: {exc}") from None
        return SharedChannel(self, p.relid, RingOut(h2g), RingIn(g2h, self.max_payload, self.pfn_bound), pages,
                             host=True, name=name, log=log, trace=self.daemon.config.trace)

    async def _device_close(self, act: core.DeviceClose) -> None:
        ch = self.remove_channel(act.relid)
        vsp = self.vsps[act.offer.name]
        if ch is not None:
            await vsp.close(ch)
            self.log.info("channel closed", relid=act.relid, device=vsp.name)
        gpadls = self._gpadl_maps.get(act.relid)
        if gpadls is not None:
            gpadls.release_all()  # the device's serve task is over: nothing can use them now
        if self.core is not None and not self.closing:
            self.core.close_complete(act.relid, act.seq)
            self._run_actions()

    def gpadl_map(self, relid: int) -> GpadlMap:
        """The GPADLs of channel ``relid`` as its device sees them."""
        gpadls = self._gpadl_maps.get(relid)
        if gpadls is None:
            gpadls = self._gpadl_maps[relid] = GpadlMap(lambda gid: self.core.gpadl(relid, gid) if self.core else None,
                                                        self.memory, lambda: self.core.channel_gpadls(relid)
                                                        if self.core else ())
        return gpadls

    def gpadl_held(self, relid: int, gpadl_id: int) -> bool:
        """Whether channel ``relid``'s device holds GPADL ``gpadl_id`` (a teardown of it waits for the device)."""
        gpadls = self._gpadl_maps.get(relid)
        return gpadls is not None and gpadls.held(gpadl_id)

    async def _teardown_gpadl(self, act: core.TeardownGpadl) -> None:
        """OpenVMM ``Action::TeardownGpadl``: the device lets go of the GPADL, then GPADL_TORNDOWN goes out."""
        gpadls = self._gpadl_maps.get(act.relid)
        if gpadls is not None:
            if gpadls.held(act.gpadl):
                self.log.info("GPADL teardown waits for the device", relid=act.relid, gpadl=act.gpadl,
                              device=act.offer.name)
            await gpadls.teardown(act.gpadl)
        if self.core is not None and not self.closing:
            self.core.gpadl_released(act.relid, act.gpadl)
            self._run_actions()

    # ---- host-initiated ---------------------------------------------------------------------------------

    def rescind(self, name: str) -> int | None:
        """Hot-remove the named device's channel from this partition."""
        if self.core is None:
            return None
        for relid, ch in self.core.channels.items():
            if ch.offer.name == name and not ch.offer.sub_channel_index and not ch.revoked:
                self.core.rescind(relid)
                self._run_actions()
                return relid
        return None

    def reoffer(self, name: str) -> int | None:
        if self.core is None:
            return None
        vsp = self.vsps[name]
        relid = self.core.add_offer(vsp.offer(self.partition or "?"))
        self._run_actions()
        return relid

    @property
    def ready(self) -> bool:
        return self.core is not None and self.core.state == core.ConnState.CONNECTED


class Subchannels:
    """Sub-channel offer and revoke for one primary channel of one partition (``vsp.SubchannelControl``)."""

    def __init__(self, conn: PartitionConnection, primary: int, offer: core.OfferSpec) -> None:
        self.conn = conn
        self.primary = primary
        self.primary_offer = offer

    @property
    def relids(self) -> list[int]:
        return self.conn._subchannels.setdefault(self.primary, [])

    @property
    def offered(self) -> int:
        return len(self.relids)

    def offer(self, count: int) -> list[int]:
        conn, first = self.conn, self.offered + 1
        if conn.core is None or conn.closing:
            return []
        limit = conn.daemon.config.limits.subchannels
        room = limit - sum(len(subs) for subs in conn._subchannels.values())
        if count > room:
            conn.log.warning("sub-channels limited", asked=count, offered=max(room, 0), limit=limit,
                             device=self.primary_offer.name)
            count = max(room, 0)
        new = [conn.core.add_offer(dataclasses.replace(self.primary_offer, sub_channel_index=i), primary=self.primary)
               for i in range(first, first + count)]
        self.relids.extend(new)
        conn._run_actions()
        return new

    def revoke(self) -> None:
        conn = self.conn
        relids, conn._subchannels[self.primary] = self.relids, []
        if conn.core is None or conn.closing:
            return
        for relid in relids:
            if relid in conn.core.channels:
                conn.core.rescind(relid)
        conn._run_actions()
