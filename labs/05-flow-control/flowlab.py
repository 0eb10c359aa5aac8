"""Lab 5's fixed parts: a guest that opens the echo device's channel with a ring size of your choosing, and
``RingPort``, the writer's side of that channel's outbound ring as a driver sees it.

``RingPort`` is the ring header a Linux driver touches (include/linux/hyperv.h ``struct hv_ring_buffer``,
drivers/hv/ring_buffer.c ``hv_ringbuffer_write``): how many bytes are free, write a packet, set
``pending_send_sz``, and sleep until the reader's interrupt. On this emulator the ring's header fields travel
in SIGNAL frames (vmbus_proto/aio/channel.py does the same for every device); the port counts what your
sender does with them, so the grader can tell a sender that waits from one that spins or drops.

The parent's echo VSP (parent_partition/devices/echo/vsp.py) reads every packet and completes it with its own
payload; ``run`` numbers the packets and checks the completions: none lost, none twice, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from child_partition.bus import GuestBus
from child_partition.guest_memory import GuestMemory
from child_partition.runner import open_bus
from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.echo import protocol as echo
from vmbus_proto.envelope import Signal
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, PAGE_SIZE, Packet, PacketType
from vmbus_proto.ring import ring_data_size

IN_RING_PAGES = echo.SPEC.ring_bytes // PAGE_SIZE  # the completions' ring: the echo device's default
WAIT_LIMIT = 60.0  # a wait with no signal for this long is a deadlock, not backpressure
SEQ = struct.Struct("<Q")
Sender = Callable[["RingPort", Iterable[Packet]], Awaitable[None]]


class RingFull(Exception):
    """A packet was written into a ring without room for it: it would overwrite data the reader has not read."""


@dataclass
class PortStats:
    writes: int = 0  # packets put on the ring
    full: int = 0  # can_write() said no
    pending_sets: int = 0  # set_pending_send_sz() with a size (the writer blocked)
    waits: int = 0  # wait_for_reader() calls
    wakeups: int = 0  # waits the reader's signal ended
    spins: int = 0  # can_write() said no three times without a wait in between
    unannounced_waits: int = 0  # waits without pending_send_sz set: the reader has no reason to signal
    overruns: int = 0  # write() with no room (RingFull)
    pending_sizes: list[int] = field(default_factory=list)  # every pending_send_sz announced


class RingPort:
    """The writer's side of one channel's outbound (guest-to-host) ring."""

    def __init__(self, channel: Channel) -> None:
        self._ch = channel
        self._writer = channel.rings.writer
        self._misses = 0  # can_write() refusals since the last wait or write
        self._announced = False
        self.waiting = False  # inside wait_for_reader() now
        self.stats = PortStats()

    @property
    def data_size(self) -> int:
        """The ring's data bytes (its pages minus the header page)."""
        return self._writer.data_size

    @property
    def free(self) -> int:
        """Free bytes as the writer last heard from the reader (Linux ``hv_get_bytes_to_write``)."""
        return self._writer.free

    @staticmethod
    def size_of(pkt: Packet) -> int:
        """The bytes ``pkt`` takes in the ring: descriptor, payload padded to 8, trailer (lab 2)."""
        return pkt.ring_size

    def can_write(self, size: int) -> bool:
        """Whether a packet of ring size ``size`` fits now (strictly less than the free bytes)."""
        if self._writer.can_write(size):
            return True
        self.stats.full += 1
        self._misses += 1
        if self._misses == 3:
            self.stats.spins += 1  # asked again and again without waiting: a busy loop
        return False

    def write(self, pkt: Packet) -> None:
        """Put ``pkt`` on the ring (and interrupt the reader if it was empty); RingFull if it does not fit."""
        size = pkt.ring_size
        if not self._writer.try_write(size):
            self.stats.overruns += 1
            raise RingFull(f"a {size}-byte packet with {self.free} bytes free would overwrite unread data")
        self._ch.conn.send_packet(self._ch.relid, pkt)
        self.stats.writes += 1
        self._misses = 0

    def set_pending_send_sz(self, size: int) -> None:
        """Write the ring header's ``pending_send_sz``: the reader signals once more than ``size`` bytes are
        free. 0 says the writer no longer waits. Like OpenVMM, refuses what no ring could ever satisfy."""
        if size < 0 or size >= self.data_size:
            raise ValueError(f"pending_send_sz {size} for a ring of {self.data_size} data bytes: it must be "
                             "the size of the packet that does not fit, below the ring's size")
        self._ch.conn.send_signal(self._ch.relid, self._ch.rings.block(size) if size else
                                  _clear(self._ch))
        self._announced = size > 0
        if size:
            self.stats.pending_sets += 1
            self.stats.pending_sizes.append(size)

    async def wait_for_reader(self) -> None:
        """Sleep until the reader's next signal (its new read_index); the free space may still be short."""
        if self._ch.closed:
            raise ChannelClosed("the channel is closed")
        self.stats.waits += 1
        if not self._announced:
            self.stats.unannounced_waits += 1
        self._misses = 0
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ch._space_waiter = fut  # what Channel._on_signal wakes (the channel's own senders use it too)
        self.waiting = True
        try:
            await asyncio.wait_for(fut, WAIT_LIMIT)
        except TimeoutError:
            raise TimeoutError(f"no signal from the reader in {WAIT_LIMIT:g} s with {self.free} bytes free: was "
                               "pending_send_sz set to what you wait for?") from None
        finally:
            self.waiting = False
            self._ch._space_waiter = None
        if self._ch.closed:
            raise ChannelClosed("the channel closed while the writer waited")
        self.stats.wakeups += 1
        if self._writer.pending_send_sz == 0:
            self._announced = False  # the reader's signal satisfied it (the core clears it, as QEMU does)


def _clear(ch: Channel) -> Signal:
    ch.rings.writer.pending_send_sz = 0
    return Signal(ch.rings.out_ring, write_index=ch.rings.writer.write_index, pending_send_sz=0)


def packets(count: int, payload: int) -> Iterator[Packet]:
    """``count`` in-band echo requests of ``payload`` bytes, each numbered (trans_id and first 8 bytes)."""
    if payload < SEQ.size:
        raise ValueError(f"a payload holds the packet's number: at least {SEQ.size} bytes")
    fill = bytes(payload - SEQ.size)
    for seq in range(count):
        yield Packet(PacketType.DATA_INBAND, FLAG_COMPLETION_REQUESTED, seq + 1, SEQ.pack(seq) + fill)


class Completions:
    """The echo's completions, as they arrive: which numbers came back, how often, in which order."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.changed = asyncio.Event()

    def __call__(self, pkt: Packet) -> None:
        self.seen.append(SEQ.unpack_from(pkt.payload)[0] if len(pkt.payload) >= SEQ.size else -1)
        self.changed.set()

    def problems(self, count: int) -> list[str]:
        counts: dict[int, int] = {}
        for s in self.seen:
            counts[s] = counts.get(s, 0) + 1
        lost = [s for s in range(count) if s not in counts]
        twice = sorted(s for s, n in counts.items() if n > 1)
        out = []
        if lost:
            out.append(f"{len(lost)} packets never came back (first: {lost[:5]})")
        if twice:
            out.append(f"{len(twice)} packets came back twice (first: {twice[:5]})")
        if not lost and not twice and self.seen != list(range(count)):
            out.append("the packets came back out of order: a ring is FIFO")
        return out

    async def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


@dataclass
class EchoGuest:
    bus: GuestBus
    channel: Channel
    port: RingPort
    completions: Completions


async def _connect(url: str, name: str, memory: GuestMemory, wait: float) -> GuestBus:
    """``open_bus``, retried while the parent is not listening yet (up to ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await asyncio.wait_for(open_bus(url, name, memory=memory), 30.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def echo_guest(url: str, ring_pages: int, name: str = "lab5", wait: float = 30.0) -> AsyncIterator[EchoGuest]:
    """A guest with the echo channel open: an outbound ring of ``ring_pages`` pages (its header page
    included, so ``ring_pages - 1`` pages of data), the echo's default inbound ring. Torn down as Linux does
    on the way out: CLOSECHANNEL, GPADL_TEARDOWN, UNLOAD."""
    if ring_pages < 2:
        raise ValueError("a ring needs its header page and at least one data page: ring_pages >= 2")
    total = ring_pages + IN_RING_PAGES
    memory = GuestMemory((total + 16) * PAGE_SIZE)
    bus = await _connect(url, name, memory, wait)
    try:
        offers = await asyncio.wait_for(bus.negotiate(), 30.0)
        offer = next((o for o in offers.values() if o.if_type == echo.SPEC.class_id), None)
        if offer is None:
            raise RuntimeError("the parent offers no echo device: start it with labs/05-flow-control/parent.toml")
        pfns = memory.alloc(total)
        gpadl = await asyncio.wait_for(bus.create_gpadl(offer.child_relid, pfns), 30.0)
        ch = await asyncio.wait_for(bus.open_channel(offer.child_relid, gpadl, total, ring_pages, name="echo"), 30.0)
        done = Completions()
        ch.on_packet = done  # take completions off the inbound ring as they come (credit goes back at once)
        yield EchoGuest(bus, ch, RingPort(ch), done)
        bus.close_channel(ch.relid)
        await asyncio.wait_for(bus.teardown_gpadl(ch.relid, gpadl), 30.0)
        await asyncio.wait_for(bus.unload(), 30.0)
    finally:
        bus.close()


@dataclass
class Run:
    """One measured run (a row of the table)."""

    ring_pages: int
    data_bytes: int
    packets: int
    payload: int
    seconds: float  # from the first write to the last completion
    blocked: int  # times the sender found the ring full and set pending_send_sz
    wakeups: int  # times the reader's signal woke it
    lost: int
    duplicated: int


async def run(url: str, ring_pages: int, count: int, payload: int, send_all: Sender, wait: float = 30.0) -> Run:
    """Push ``count`` echo requests through an outbound ring of ``ring_pages`` pages with ``send_all`` and
    wait for every completion. RuntimeError names what went wrong (lost, duplicated, a spinning sender)."""
    async with echo_guest(url, ring_pages, wait=wait) as g:
        start = time.perf_counter()
        await send_all(g.port, packets(count, payload))
        await g.completions.wait_for(min(count, g.port.stats.writes))  # a packet never written never comes back
        seconds = time.perf_counter() - start
        problems = g.completions.problems(count)
    seen, stats = g.completions.seen, g.port.stats
    if stats.spins or stats.overruns:
        problems.append(f"the sender polled a full ring {stats.spins} times without waiting and wrote into it "
                        f"{stats.overruns} times")
    lost, duplicated = len(set(range(count)) - set(seen)), len(seen) - len(set(seen))
    if problems and not (lost or duplicated):  # out of order, or spinning: no row can describe that
        raise RuntimeError("; ".join(problems))
    return Run(ring_pages, ring_data_size(ring_pages), count, payload, seconds, stats.pending_sets, stats.wakeups,
               lost, duplicated)
