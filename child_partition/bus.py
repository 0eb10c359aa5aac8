"""The guest's VMBus driver as an asyncio client: the shell around ``vmbus_proto.client``.

What Linux's vmbus driver does for its devices (drivers/hv/connection.c ``vmbus_connect``,
channel_mgmt.c ``vmbus_request_offers``, channel.c ``vmbus_open`` / ``vmbus_close`` /
``vmbus_establish_gpadl`` / ``vmbus_teardown_gpadl``), each as an awaitable that waits for the host's
answer; the host's answers and unsolicited messages (RESCIND) arrive as events. Like ``vmbus_connect`` it
takes the interrupt page and the two monitor pages from guest memory, and returns them when the connection ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any, assert_never

from vmbus_proto import client as core
from vmbus_proto import messages as m
from vmbus_proto.aio.channel import Channel
from vmbus_proto.aio.shared import SharedChannel
from vmbus_proto.aio.transport import KEEPALIVE, FramedConnection
from vmbus_proto.auth import AuthError, GuestAuth
from vmbus_proto.channel import ChannelRings
from vmbus_proto.client import Request
from vmbus_proto.envelope import NO_PFN_BOUND, REFUSAL_CODES, REPLACED, SHARED, Hello
from vmbus_proto.errors import FrameError, MessageError
from vmbus_proto.framing import ENVELOPE_VERSION, Frame, FrameKind
from vmbus_proto.packets import PAGE_SIZE
from vmbus_proto.ring import ring_data_size
from vmbus_proto.shm_ring import RingIn, RingOut
from vmbus_proto.versions import GUEST_ORDER

from .guest_memory import GuestMemory


class BusError(Exception):
    """The host refused or never answered a request."""


class ParentRefused(BusError):
    """The parent refused this guest for a reason a retry cannot fix (docs/protocol.md §3, §5).

    ``kind``: ``name-taken`` (another connection holds the partition name), ``hello`` (the parent rejected
    the HELLO, as a name it does not accept), ``envelope`` (no envelope version in common), ``auth`` (no
    authentication method in common: a secret is needed, or the parent offers none), ``auth-failed`` (the
    parent refused this child's proof), ``auth-parent`` (the parent's proof is wrong), ``replaced`` (another
    connection authenticated under this name took over), ``versions`` (no VMBus version in common),
    ``not-a-parent`` (what answered does not speak the envelope), ``auth-cert`` (a TLS listener wants a client
    certificate naming this partition)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# The CLOSE reasons a parent gives a HELLO it will not accept however often it is sent, for a parent that
# sends no ``code`` (docs/protocol.md §3, §8). Anything else (shutting down, partition limit, handshake
# timeout) may pass, so it is retried.
_REFUSALS = (("name-taken", "partition name "), ("envelope", "envelope version "),
             ("auth", "authentication method "), ("auth", "authentication required"),
             ("auth-failed", "authentication failed "), ("hello", "FrameError: HELLO "))


def refusal_kind(reason: str) -> str | None:
    """The kind of a permanent refusal in a CLOSE reason received before the parent's HELLO, else None."""
    return next((kind for kind, prefix in _REFUSALS if reason.startswith(prefix)), None)


class GuestBus(FramedConnection):
    def __init__(self, name: str, *, trace: bool = False, versions: list[int] | None = None,
                 timeout: float = core.DEFAULT_TIMEOUT, memory: GuestMemory | None = None, log: Any = None,
                 secret: bytes | None = None, keepalive: tuple[int, int, int] = KEEPALIVE) -> None:
        """``memory``: the partition's guest memory, where the connection's three pages come from (a bus given
        none keeps a private three-page memory: its page numbers then overlap the VSCs' own). ``secret``: the
        partition's secret, proved to the parent (and the parent's proof checked) before INITIATE_CONTACT.
        ``keepalive``: TCP keepalive's idle, interval and count, how soon a parent gone silent is noticed."""
        super().__init__(log=log, keepalive=keepalive)
        self.name = name
        self.auth = GuestAuth(name, secret, data_window=self.data_window)
        self.trace = trace
        self.memory = memory if memory is not None else GuestMemory(3 * PAGE_SIZE)
        # The memory map the HELLO declares: only a bus given the partition's memory knows it (a private
        # three-page one says nothing of the pages the VSCs name).
        self.declared_memory = memory.end if memory is not None else None
        # Shared-memory mode (docs/protocol.md §14): asked for when the memory is a memfd and the connection a
        # Unix socket (``open_bus`` passes the fd with the HELLO); on once the parent's HELLO says so.
        self.offer_shared = False
        self.shared = False
        self._hello_sent = False
        self._gpadl_pfns: dict[int, list[int]] = {}  # ring GPADLs' pages, for a shared channel's rings
        # vmbus_connect: the interrupt page, then the parent->child and child->parent monitor pages.
        self.connection_pfns = [self.memory.alloc(1)[0] for _ in range(3)]
        self.core = core.GuestConnection(core.ConnectionPages.from_pfns(*self.connection_pfns),
                                         versions=versions or GUEST_ORDER, timeout=timeout)
        self.hello_future: asyncio.Future[Hello] = asyncio.get_event_loop().create_future()
        self._waiters: dict[tuple[Request, int], asyncio.Future[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.offers: dict[int, m.OfferChannel] = {}
        self.on_rescind: Callable[[int], None] | None = None
        self.on_offer: Callable[[m.OfferChannel], None] | None = None
        # Relids this guest closed: the host's packets already on their way are dropped quietly, as Linux's
        # vmbus_close leaves them (a frame for a relid never open is still a warning).
        self._closed_here: set[int] = set()
        self.close_reason: str | None = None
        self.refused: ParentRefused | None = None

    # ---- connection -------------------------------------------------------------------------------------

    @staticmethod
    def _now() -> float:
        return asyncio.get_event_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._hello_sent:
            self.send_frame(FrameKind.HELLO, 0, self.hello().encode())

    def hello(self) -> Hello:
        """Our HELLO (once per connection: it holds a fresh nonce)."""
        self._hello_sent = True
        hello = dataclasses.replace(self.auth.hello(), memory=self.declared_memory)
        if self.offer_shared:
            hello = dataclasses.replace(hello, memory_mode=SHARED, memory_base=self.memory.base)
        return hello

    def on_hello(self, frame: Frame) -> None:
        hello = Hello.decode(frame.body)
        if hello.envelope != ENVELOPE_VERSION:
            reason = f"the parent speaks envelope {hello.envelope}; this child speaks envelope {ENVELOPE_VERSION}"
            self.refused = ParentRefused("envelope", reason)
            raise FrameError(reason)
        try:
            proof = self.auth.receive_hello(hello)
        except AuthError as exc:
            self.refused = ParentRefused(exc.code, exc.reason)
            raise
        self.peer_data_window = hello.data_window
        if hello.memory_mode == SHARED and not self.offer_shared:
            raise FrameError("the parent's HELLO says shared memory, which this child did not offer")
        self.shared = hello.memory_mode == SHARED
        if proof is None:
            self.hello_future.set_result(hello)  # no authentication: the parent's HELLO accepts us
        else:
            self.send_frame(FrameKind.AUTH, 0, proof)  # the parent's AUTH, with its own proof, accepts us

    def on_auth(self, frame: Frame) -> None:
        try:
            self.auth.receive_auth(frame.body)
        except AuthError as exc:
            self.refused = ParentRefused(exc.code, exc.reason)
            raise
        assert self.auth.host is not None
        self.log.info("parent authenticated", parent=self.auth.host.partition)
        self.hello_future.set_result(self.auth.host)

    def on_close_frame(self, reason: str, code: str | None) -> None:
        self.close_reason = reason
        kind = None if self.hello_future.done() else code if code in REFUSAL_CODES else refusal_kind(reason)
        if code == REPLACED:
            kind = REPLACED  # a newer connection under our name took over: taking it back would be a tug of war
        if kind is not None:
            self.refused = ParentRefused(kind, reason)
        self.close()

    def fail(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = f"this child closed the connection: {reason}"
        if self.refused is None and not self.hello_future.done():
            self.refused = ParentRefused("not-a-parent", f"what answers there is no VMBus parent ({reason})")
        super().fail(reason)

    def on_connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for pfn in self.connection_pfns:  # vmbus_disconnect frees the interrupt and monitor pages
            self.memory.free([pfn])
        self.connection_pfns = []
        err = self.refused or ConnectionResetError(self.close_reason or "connection to the parent lost")
        if not self.hello_future.done():
            self.hello_future.set_exception(err)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()

    # ---- control messages -------------------------------------------------------------------------------

    def _flush_core(self) -> None:
        for msg in self.core.messages():
            if self.trace:
                self.log.info("G>H " + msg.describe(self.core.version))
            self.send_frame(FrameKind.CONTROL, 0, msg.encode())
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.core.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None and not self.closing:
            self._timer = asyncio.get_event_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self._now())
        self._handle_events()
        self._arm_timer()

    def on_control(self, frame: Frame) -> None:
        if not self.hello_future.done():
            raise FrameError("CONTROL frame before HELLO")
        try:
            msg = m.decode(frame.body)
        except MessageError as exc:
            self.log.warning("control message from the host dropped", reason=str(exc))
            return
        if self.trace:  # a VERSION_RESPONSE's fields depend on the version it answers
            version = self.core.contacting_version if isinstance(msg, m.VersionResponse) else self.core.version
            self.log.info("H>G " + msg.describe(version))
        self.core.receive(msg, self._now())
        self._handle_events()
        self._flush_core()

    def _resolve(self, key: tuple[Request, int], value: Any = None, error: Exception | None = None) -> None:
        fut = self._waiters.pop(key, None)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    def _handle_events(self) -> None:
        for ev in self.core.events():
            self._handle_event(ev)

    def _handle_event(self, ev: core.Event) -> None:
        match ev:
            case core.VersionNegotiated():
                self._resolve((Request.VERSION, 0), ev.version)
            case core.VersionRefused():
                self._resolve((Request.VERSION, 0), error=ParentRefused("versions", ev.reason))
            case core.OfferReceived():
                self.offers[ev.offer.child_relid] = ev.offer
                if self.on_offer is not None and self.core.state == core.GuestConnState.READY:
                    self.on_offer(ev.offer)
            case core.AllOffersDelivered():
                self._resolve((Request.OFFERS, 0), dict(self.offers))
            case core.GpadlCreated():
                self._resolve((Request.GPADL, ev.gpadl), error=None if ev.ok else BusError(
                    f"GPADL {ev.gpadl:#x} refused (status {ev.status:#x})"), value=ev.gpadl)
            case core.OpenResult():
                self._resolve((Request.OPEN, ev.relid), error=None if ev.ok else BusError(
                    f"OPENCHANNEL for relid {ev.relid} refused (status {ev.status:#x})"))
            case core.GpadlTorndown():
                self._resolve((Request.TEARDOWN, ev.gpadl))
            case core.Rescinded():
                self.offers.pop(ev.relid, None)
                err = BusError(f"relid {ev.relid} rescinded")
                for key in [k for k in self._waiters if k in ((Request.OPEN, ev.relid), (Request.MODIFY, ev.relid))]:
                    self._resolve(key, error=err)
                ch = self.channels.get(ev.relid)
                if ch is not None:
                    ch.close()
                if self.on_rescind is not None:
                    self.on_rescind(ev.relid)
            case core.UnloadComplete():
                self._resolve((Request.UNLOAD, 0))
            case core.ModifyChannelResult():
                self._resolve((Request.MODIFY, ev.relid), ev.status)
            case core.Unexpected():
                self.log.warning("unexpected message from the host dropped", reason=ev.reason)
            case core.TimedOut():
                self.log.error("the host never answered", request=str(ev.what), key=hex(ev.key))
                waiter = (ev.what, 0 if ev.what == Request.VERSION else ev.key)
                self._resolve(waiter, error=BusError(f"no answer to the {ev.what} request {ev.key:#x}"))
            case _:
                assert_never(ev)

    def _wait(self, key: tuple[Request, int]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        return fut

    # ---- the driver API ---------------------------------------------------------------------------------

    async def negotiate(self) -> dict[int, m.OfferChannel]:
        """HELLO, INITIATE_CONTACT newest version first, then REQUESTOFFERS until ALLOFFERS_DELIVERED."""
        await self.hello_future
        version = self._wait((Request.VERSION, 0))
        offers = self._wait((Request.OFFERS, 0))
        self.core.connect(self._now())
        self._flush_core()
        try:
            await version
        except BaseException:
            offers.cancel()
            raise
        result: dict[int, m.OfferChannel] = await offers
        return result

    async def create_gpadl(self, relid: int, pfns: list[int]) -> int:
        gid = self.core.create_gpadl(relid, pfns, self._now())
        fut = self._wait((Request.GPADL, gid))
        self._flush_core()
        await fut
        self._gpadl_pfns[gid] = pfns
        return gid

    async def open_channel(self, relid: int, gpadl: int, pages: int, downstream_offset: int,
                           userdata: bytes = b"", name: str = "") -> Channel:
        """OPENCHANNEL on a ring GPADL of ``pages`` pages; returns the channel once the host accepted."""
        ch = self._channel(relid, gpadl, pages, downstream_offset, name)
        self._closed_here.discard(relid)
        self.add_channel(ch)
        fut = self._wait((Request.OPEN, relid))
        self.core.open_channel(relid, gpadl, downstream_offset, userdata, now=self._now())
        self._flush_core()
        try:
            await fut
        except BaseException:
            self.remove_channel(relid)
            ch.close()
            raise
        return ch

    def _channel(self, relid: int, gpadl: int, pages: int, downstream_offset: int, name: str) -> Channel:
        log = self.log.bind(relid=relid)
        if not self.shared:
            rings = ChannelRings(relid, host=False, guest_to_host_data=ring_data_size(downstream_offset),
                                 host_to_guest_data=ring_data_size(pages - downstream_offset),
                                 window_in=self.data_window, window_out=self.peer_data_window)
            return Channel(self, relid, rings, name=name, log=log)
        pfns = self._gpadl_pfns.get(gpadl)
        if pfns is None or len(pfns) != pages:
            raise BusError(f"ring GPADL {gpadl:#x} is not one of ours of {pages} pages")
        view = self.memory.pages_view()
        out_mem, in_mem = view.ring(pfns[:downstream_offset]), view.ring(pfns[downstream_offset:])
        out_mem.init()  # hv_ringbuffer_init: both rings zeroed, feature_bits set, before OPENCHANNEL
        in_mem.init()
        return SharedChannel(self, relid, RingOut(out_mem), RingIn(in_mem, self.max_payload, NO_PFN_BOUND), view,
                             host=False, name=name, log=log, trace=self.trace)

    def close_channel(self, relid: int) -> None:
        ch = self.remove_channel(relid)
        if ch is not None:
            ch.close()
            self._closed_here.add(relid)
        if relid in self.core.channels:
            self.core.close_channel(relid)
            self._flush_core()

    def on_unknown_channel(self, frame: Frame) -> None:
        if frame.relid in self._closed_here:
            self.log.debug("frame for a channel closed here dropped", relid=frame.relid)
        else:
            super().on_unknown_channel(frame)

    async def teardown_gpadl(self, relid: int, gpadl: int) -> None:
        self._gpadl_pfns.pop(gpadl, None)
        if relid not in self.core.channels:
            return
        if not self.core.teardown_gpadl(relid, gpadl, self._now()):
            return  # rescinded: Linux skips the teardown
        fut = self._wait((Request.TEARDOWN, gpadl))
        self._flush_core()
        await fut

    def release_relid(self, relid: int) -> None:
        if relid in self.core.channels:
            self.core.release_relid(relid)
            self._flush_core()

    async def unload(self) -> None:
        """UNLOAD and its answer; below 3.0 nothing is sent (the child just closes)."""
        fut = self._wait((Request.UNLOAD, 0))
        self.core.unload(self._now())
        self._handle_events()
        self._flush_core()
        await fut
