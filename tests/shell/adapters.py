"""The one place the shell tier knows today's device plug-in contract: how a VSP is opened on a channel and
how a VSC attaches to one. When that contract changes, this module changes; the tests do not.

Today a VSP is opened as the daemon opens it (parent_partition/connection.py ``_device_open``):
``await vsp.open(channel, ChannelResources(...))`` (a partition's GPADL map, memory view and sub-channel
control; here the standalone ones, failing through the host end of the link), and closed with
``await vsp.close(channel)``. A VSC runs its real ``attach()`` (ring pages from guest memory, GPADL,
OPENCHANNEL with the send ring first and the receive ring at the downstream offset, handshake under
``HANDSHAKE_TIMEOUT``, then its ``run`` task) and its real ``detach()``, on :class:`HarnessBus`: what a VSC
uses of ``GuestBus``, answered in memory, so the rings it asks for are the rings the pair gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from child_partition.bus import BusError
from child_partition.guest_memory import GuestMemory
from child_partition.vsc import Vsc
from parent_partition.memory import GpadlMap, MappedMemory
from parent_partition.vsp import ChannelResources, Vsp
from vmbus_proto.aio import logs
from vmbus_proto.aio.channel import Channel
from vmbus_proto.aio.pair import ChannelPair, MemoryLink
from vmbus_proto.gpadl import Gpadl
from vmbus_proto.packets import PAGE_SIZE
from vmbus_proto.versions import Version

GUEST_MEMORY = 64 * 1024 * 1024
MEMORY_MODE = "stream"  # or "shared": the link's channels on rings in the guest's memory (conftest.memory_mode)


async def open_vsp(vsp: Vsp, pair: ChannelPair, *, partition: str | None = None, trace: bool = False,
                   log: Any = None, gpadls: dict[int, list[int]] | None = None) -> None:
    """Open ``vsp`` on the pair's host end; when the channel closes, the host closes it through the VSP.
    ``gpadls`` are the other GPADLs the guest made on this channel (id -> pages), for the device to look up."""
    log = log if log is not None else logs.get(partition=partition or pair.link.partition, relid=pair.relid)
    name = partition or pair.link.partition
    res = ChannelResources.standalone(name, vsp.offer(name), pair.params, log, fail=pair.link.host.fail)
    res.trace = trace
    if pair.link.pages is not None:
        res.memory = MappedMemory(pair.link.pages)
    if gpadls is not None:
        def lookup(gid: int) -> Gpadl | None:
            pfns = gpadls.get(gid)
            return None if pfns is None else Gpadl(pair.relid, gid, ((len(pfns) * PAGE_SIZE, 0),), tuple(pfns))
        def listing() -> list[Gpadl]:
            return [g for g in map(lookup, list(gpadls)) if g is not None]
        res.gpadls = GpadlMap(lookup, res.memory, listing)
    await vsp.open(pair.host, res)
    pair.on_host_close = vsp.close


class HarnessBus:
    """What a VSC uses of ``child_partition.bus.GuestBus`` (``trace``, ``core.version``, ``create_gpadl``,
    ``open_channel``, ``close_channel``, ``teardown_gpadl``), over a :class:`MemoryLink` whose host end runs
    ``vsp``; the VMBus version is ``version`` (video picks its SYNTHVID versions by it)."""

    def __init__(self, link: MemoryLink, vsp: Vsp, *, trace: bool = False, log: Any = None,
                 version: int = Version.WIN10_V5_3) -> None:
        self.core = SimpleNamespace(version=int(version))
        self.link = link
        self.vsp = vsp
        self.trace = trace
        self.log = log
        self.gpadls: dict[int, list[int]] = {}
        self.torn_down: list[int] = []
        self.pairs: dict[int, ChannelPair] = {}
        self._next_gpadl = 0x1000

    async def create_gpadl(self, relid: int, pfns: list[int]) -> int:
        gid, self._next_gpadl = self._next_gpadl, self._next_gpadl + 1
        self.gpadls[gid] = list(pfns)
        return gid

    async def open_channel(self, relid: int, gpadl: int, pages: int, downstream_offset: int,
                           userdata: bytes = b"", name: str = "") -> Channel:
        pair = self.link.open(relid, pages=pages, downstream_offset=downstream_offset, pfns=self.gpadls[gpadl],
                              gpadl=gpadl, userdata=userdata, name=name)
        try:
            await open_vsp(self.vsp, pair, trace=self.trace, log=self.log, gpadls=self.gpadls)
        except Exception as exc:  # the daemon answers OPENCHANNEL_RESULT with an error; the guest's open fails
            pair.refuse()
            raise BusError(f"the host refused to open channel {relid}: {exc}") from exc
        self.pairs[relid] = pair
        return pair.guest

    def close_channel(self, relid: int) -> None:
        pair = self.pairs.get(relid)
        if pair is not None:
            pair.close_guest()

    async def teardown_gpadl(self, relid: int, gpadl: int) -> None:
        del self.gpadls[gpadl]
        self.torn_down.append(gpadl)


@dataclass
class DevicePair:
    """A VSP and a VSC attached to each other over one channel of ``link``."""

    link: MemoryLink
    bus: HarnessBus
    vsp: Vsp
    vsc: Vsc
    memory: GuestMemory
    closed: bool = field(default=False)

    @property
    def pair(self) -> ChannelPair:
        return self.bus.pairs[self.vsc.relid]

    async def close(self) -> None:
        """The guest detaches (CLOSECHANNEL, GPADL teardown); the host's VSP closes the channel; the link goes."""
        if self.closed:
            return
        self.closed = True
        pair = self.bus.pairs.get(self.vsc.relid)
        await self.vsc.detach()
        if pair is not None:
            await pair.closed()
        self.link.close()
        await self.link.closed()
        self.memory.close()


def new_vsc(cls: type[Vsc], bus: HarnessBus, memory: GuestMemory, relid: int = 1) -> Vsc:
    """A VSC bound to the VSP's offer, as the runner binds a driver by class GUID."""
    offer = bus.vsp.offer(bus.link.partition).message(relid)
    return cls(bus, memory, offer, logs.get(partition=bus.link.partition))  # type: ignore[arg-type]


async def attach(vsp: Vsp, vsc_cls: type[Vsc], *, link: MemoryLink | None = None, relid: int = 1,
                 trace: bool = False) -> DevicePair:
    """Offer ``vsp``'s device on a fresh link (or ``link``), and attach a ``vsc_cls`` driver to it."""
    memory = GuestMemory(GUEST_MEMORY)
    if link is None:
        link = MemoryLink(pages=memory.pages_view() if MEMORY_MODE == "shared" else None)
    bus = HarnessBus(link, vsp, trace=trace)
    vsc = new_vsc(vsc_cls, bus, memory, relid)
    devices = DevicePair(link, bus, vsp, vsc, memory)
    try:
        await vsc.attach()
    except BaseException:
        await devices.close()  # as the runner drops a driver whose probe failed
        raise
    return devices
