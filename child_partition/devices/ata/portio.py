"""The guest vCPU's IN/OUT instructions: each one a VM exit, carried to the parent as an IOPORT frame.

What the CPU and KVM do when a guest touches an I/O port no in-kernel device claims (``KVM_EXIT_IO``,
docs/protocol.md §13): the vCPU stops, the VMM carries out the access, the vCPU resumes with the value.
So one exit is one round trip, and a vCPU has at most one exit outstanding. String I/O (``rep insw``,
``rep outsw``) costs the exits KVM's instruction emulator takes (``vmbus_proto.ioport.string_exits``:
``rep ins`` reads ahead up to 1 KiB an exit, ``rep outs`` exits once per unit). Every exit and every byte
it put on the wire is counted (:class:`ExitCounters`), which is the point of the emulated path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from vmbus_proto.aio.transport import FramedConnection
from vmbus_proto.errors import FrameError
from vmbus_proto.framing import HEADER_SIZE, Frame, FrameKind
from vmbus_proto.ioport import Direction, IoRequest, decode_reply, string_exits

EXIT_TIMEOUT = 30.0  # a parent that does not answer an exit within this is gone


@dataclass(slots=True)
class ExitCounters:
    exits: int = 0  # round trips (VM exits)
    ins: int = 0
    outs: int = 0
    bytes_sent: int = 0  # IOPORT frame bytes, headers included
    bytes_received: int = 0

    def snapshot(self) -> ExitCounters:
        return ExitCounters(self.exits, self.ins, self.outs, self.bytes_sent, self.bytes_received)


class PortIo:
    """One vCPU's port I/O over ``bus`` (a connected guest bus: its HELLO answered)."""

    def __init__(self, bus: FramedConnection, timeout: float = EXIT_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout
        self.counters = ExitCounters()
        self._seq = 0
        self._waiting: tuple[int, int, asyncio.Future[bytes]] | None = None  # (seq, IN bytes, answer)
        bus.ioport = self._on_reply
        bus.closed_future.add_done_callback(self._lost)

    async def _exit(self, direction: Direction, size: int, port: int, count: int = 1, data: bytes = b"") -> bytes:
        if self._waiting is not None:
            raise RuntimeError("a vCPU has one exit at a time: this port access overlaps another")
        if self.bus.closing:
            raise ConnectionError("the connection to the parent is closed")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body, out = IoRequest(self._seq, direction, size, port, count, data).encode()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting = (self._seq, size * count if direction == Direction.IN else 0, fut)
        c = self.counters
        c.exits += 1
        if direction == Direction.IN:
            c.ins += 1
        else:
            c.outs += 1
        c.bytes_sent += HEADER_SIZE + len(body) + len(out)
        self.bus.send_frame(FrameKind.IOPORT, 0, body, out)
        try:
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            self._waiting = None

    def _on_reply(self, frame: Frame) -> None:
        seq = decode_reply(frame.body)
        waiting = self._waiting
        if waiting is None or waiting[0] != seq or len(frame.data) != waiting[1]:
            raise FrameError(f"IOPORT reply {seq} with {len(frame.data)} bytes answers no exit of ours")
        self.counters.bytes_received += HEADER_SIZE + len(frame.body) + len(frame.data)
        if not waiting[2].done():
            waiting[2].set_result(bytes(frame.data))

    def _lost(self, _: object) -> None:
        if self._waiting is not None and not self._waiting[2].done():
            self._waiting[2].set_exception(ConnectionError("the connection to the parent closed during an exit"))

    # ---- the instructions -------------------------------------------------------------------------------

    async def inb(self, port: int) -> int:
        return (await self._exit(Direction.IN, 1, port))[0]

    async def inw(self, port: int) -> int:
        return int.from_bytes(await self._exit(Direction.IN, 2, port), "little")

    async def outb(self, port: int, value: int) -> None:
        await self._exit(Direction.OUT, 1, port, 1, bytes((value & 0xFF,)))

    async def outw(self, port: int, value: int) -> None:
        await self._exit(Direction.OUT, 2, port, 1, (value & 0xFFFF).to_bytes(2, "little"))

    async def rep_ins(self, port: int, size: int, count: int, page_offset: int = 0) -> bytes:
        """``rep ins``: ``count`` units into a buffer starting ``page_offset`` bytes into its page."""
        parts = [await self._exit(Direction.IN, size, port, n)
                 for n in string_exits(Direction.IN, size, count, page_offset)]
        return b"".join(parts)

    async def rep_outs(self, port: int, size: int, data: bytes) -> None:
        """``rep outs`` of ``data`` (a whole number of units)."""
        pos = 0
        for n in string_exits(Direction.OUT, size, len(data) // size):
            await self._exit(Direction.OUT, size, port, n, data[pos:pos + n * size])
            pos += n * size
