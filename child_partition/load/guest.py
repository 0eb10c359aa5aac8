"""A load-generating guest that binds only the drivers its workload asks for, and the HTTP calls workloads make
to the parent's API.

What a Linux guest with only some Hyper-V drivers loaded does (drivers/hv/vmbus_drv.c: an offer whose class
has no driver stays unbound and unopened): ``connect`` is ``vmbus_connect`` and ``vmbus_request_offers``,
``bind`` one driver's probe (ring GPADL, OPENCHANNEL, device handshake), ``leave`` what ``hv_kexec_handler``
does (every bound channel closed and its GPADLs torn down, then UNLOAD and its answer, then the connection
closed). Every step is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout

from vmbus_proto import messages as m
from vmbus_proto.aio import logs
from vmbus_proto.devices.base import DeviceSpec
from vmbus_proto.envelope import SHARED

from ..bus import GuestBus
from ..devices import vsc_classes
from ..guest_memory import GuestMemory
from ..runner import memory_mode_for, open_bus
from ..vsc import Vsc

STEP_TIMEOUT = 30.0  # seconds any one control-plane step may take
GUEST_MEMORY = 64 * 1024 * 1024  # rings, the 8 MiB VRAM, netvsc's 16 MiB receive buffer fit with room
HTTP_TIMEOUT = ClientTimeout(total=30.0)


class LoadGuest:
    """One guest on its own VMBus connection, with only the drivers bound that ``bind`` was asked for."""

    def __init__(self, url: str, name: str, log: Any, memory: int = GUEST_MEMORY, secret: bytes | None = None,
                 memory_mode: str | None = None) -> None:
        """``memory_mode``: "shared", "stream" or "auto" (default: ``--memory-mode``, through the environment)."""
        self.url, self.name, self.secret = url, name, secret
        self.log = (log if log is not None else logs.get()).bind(partition=name)
        self.memory = GuestMemory(memory, shared=memory_mode_for(url, memory_mode) == SHARED)
        self.bus: GuestBus | None = None
        self.offers: dict[int, m.OfferChannel] = {}
        self.vscs: dict[int, Vsc] = {}  # by relid, bound

    async def open(self) -> GuestBus:
        """The transport and the envelope's HELLO (the partition name is taken here)."""
        self.bus = await asyncio.wait_for(open_bus(self.url, self.name, log=self.log, memory=self.memory,
                                                   secret=self.secret),
                                          STEP_TIMEOUT)
        return self.bus

    async def negotiate(self) -> dict[int, m.OfferChannel]:
        """INITIATE_CONTACT (newest version first), REQUESTOFFERS until ALLOFFERS_DELIVERED."""
        assert self.bus is not None
        self.offers = await asyncio.wait_for(self.bus.negotiate(), STEP_TIMEOUT)
        return self.offers

    async def connect(self) -> dict[int, m.OfferChannel]:
        await self.open()
        return await self.negotiate()

    def offer_of(self, spec: DeviceSpec) -> m.OfferChannel:
        """The primary channel offered for ``spec``'s device, or a clear error."""
        offer = next((o for o in self.offers.values() if o.if_type == spec.class_id and o.sub_channel_index == 0),
                     None)
        if offer is None:
            raise RuntimeError(f"the parent offers {self.name} no {spec.name} device")
        return offer

    async def bind(self, offer: m.OfferChannel) -> Vsc:
        """Probe the offer's driver: ring GPADL, OPENCHANNEL, its handshake."""
        assert self.bus is not None
        vsc = vsc_classes()[offer.if_type](self.bus, self.memory, offer, self.log)
        self.vscs[offer.child_relid] = vsc
        try:
            await asyncio.wait_for(vsc.attach(), STEP_TIMEOUT)
        except BaseException:
            self.vscs.pop(offer.child_relid, None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(vsc.detach(), STEP_TIMEOUT)
            raise
        return vsc

    async def unbind(self, vsc: Vsc) -> None:
        """The driver's remove: CLOSECHANNEL, then its GPADLs torn down."""
        self.vscs.pop(vsc.relid, None)
        await asyncio.wait_for(vsc.detach(), STEP_TIMEOUT)

    async def close_all(self) -> None:
        await asyncio.gather(*(self.unbind(v) for v in list(self.vscs.values())))

    async def unload(self) -> None:
        bus = self.bus
        if bus is not None and not bus.closing:
            await asyncio.wait_for(bus.unload(), STEP_TIMEOUT)

    async def disconnect(self) -> None:
        bus = self.bus
        if bus is not None:
            bus.close()
            await asyncio.wait_for(asyncio.shield(bus.closed_future), STEP_TIMEOUT)

    async def leave(self) -> None:
        """Close every bound channel, UNLOAD, disconnect; the guest's pages go back. If the connection is
        already gone, only the local state is dropped."""
        try:
            if self.bus is not None and not self.bus.closing:
                await self.close_all()
                await self.unload()
            await self.disconnect()
        finally:
            for vsc in self.vscs.values():
                vsc.forget()
            self.vscs.clear()
            with contextlib.suppress(BufferError):  # a view still open: the mapping goes with it
                self.memory.close()


async def api(session: ClientSession, method: str, url: str, body: dict[str, Any] | None = None,
              ok: tuple[int, ...] = (200, 202)) -> dict[str, Any]:
    """One call to the parent's JSON API; anything but ``ok`` raises with the API's own one-line error."""
    try:
        async with session.request(method, url, json=body) as resp:
            try:
                answer: Any = await resp.json(content_type=None)
            except ValueError:
                answer = {"error": (await resp.text())[:200]}
            if resp.status not in ok:
                error = answer.get("error") if isinstance(answer, dict) else answer
                raise RuntimeError(f"{method} {url}: HTTP {resp.status}: {error}")
    except (ClientError, TimeoutError) as exc:
        raise RuntimeError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
    return answer if isinstance(answer, dict) else {"result": answer}


def http_session(token: str | None = None) -> ClientSession:
    """One session per load process (a connection pool to the parent's API); with ``token`` (``[http]
    token_file``) every request carries it as ``Authorization: Bearer``."""
    return ClientSession(timeout=HTTP_TIMEOUT, headers={"Authorization": f"Bearer {token}"} if token else None)


def need_http(workload: str, http: str | None) -> str:
    if not http:
        raise ValueError(f"{workload} needs the parent's web API: pass --http http://HOST:PORT")
    return http.rstrip("/")


CONNECT_TIMEOUT = STEP_TIMEOUT


class Guest(LoadGuest):
    """A guest with one VSC (``self.vsc``, set and attached by the subclass): what storage and network load."""

    def __init__(self, url: str, name: str, memory: int, log: Any, secret: bytes | None = None) -> None:
        super().__init__(url, name, log, memory, secret)
        self.vsc: Vsc | None = None

    async def offer(self, wanted: Callable[[m.OfferChannel], bool], what: str) -> m.OfferChannel:
        """Connect, negotiate and return the offer ``wanted`` picks (an error naming ``what`` if none)."""
        offers = await self.connect()
        found = next((o for o in offers.values() if wanted(o)), None)
        if found is None:
            raise RuntimeError(f"the parent offers no {what}")
        return found

    async def leave(self) -> None:
        if self.vsc is not None:
            self.vscs.setdefault(self.vsc.relid, self.vsc)
        await super().leave()


async def started(guest: Guest, start: Callable[[], Coroutine[Any, Any, None]],
                  stop: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``start``; if it fails, ``stop`` what was half started (its own error is dropped: the start error
    is the one that counts) and raise."""
    try:
        await start()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(stop())
        raise
