"""Trapped port I/O over the stream: the IOPORT frame (docs/protocol.md §13) and the I/O-port bus.

What a guest's IN and OUT instructions become under a hypervisor. On KVM an IN/OUT to a port no in-kernel
device claims is a VM exit to the VMM (``KVM_EXIT_IO`` in Linux include/uapi/linux/kvm.h: ``direction``
0 in / 1 out, ``size`` 1, 2 or 4, ``port``, ``count``, and the data in the vCPU's PIO data page at
``data_offset``); the VMM (QEMU softmmu/ioport.c, ``cpu_inw``/``cpu_outw``) dispatches it to the device
that registered the port and resumes the vCPU with the value read. Here one exit is one IOPORT frame from
the child and one IOPORT frame back: a round trip each, never posted (a PC's I/O writes are not posted).

String I/O follows KVM's instruction emulator (arch/x86/kvm/emulate.c): ``rep ins`` is read ahead in
chunks, one exit each for ``min(count, page bytes left in the destination, 1024 / size)`` units (1024
bytes: ``struct read_cache``, ``pio_in_emulated``); ``rep outs`` exits once per unit (``em_out`` passes
count 1). :func:`string_exits` says how many exits a transfer costs; the child's vCPU model applies it.

The bus (:class:`PortBus`) answers as a PC's does: a port nobody decodes reads as all ones (the ISA bus
floats high) and swallows writes; an access wider than a device's register is split into byte accesses
(QEMU ``portio_read``), so a word read of two byte registers reads both.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from .errors import FrameError

SIZES = (1, 2, 4)  # in/out of a byte, a word, a doubleword
MAX_PORT = 0xFFFF
PIO_PAGE = 4096  # KVM's PIO data page (KVM_PIO_PAGE_OFFSET): the most one exit carries
READ_AHEAD = 1024  # KVM ``struct read_cache``: the most one ``rep ins`` exit reads ahead
_ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


class Direction(enum.IntEnum):
    IN = 0  # KVM_EXIT_IO_IN
    OUT = 1  # KVM_EXIT_IO_OUT


@dataclass(frozen=True, slots=True)
class IoRequest:
    """One exit, child to parent: ``count`` units of ``size`` bytes at ``port``; OUT data little-endian."""

    seq: int
    direction: int
    size: int
    port: int
    count: int = 1
    data: bytes = b""  # OUT: size * count bytes; IN: empty

    def encode(self) -> tuple[bytes, bytes]:
        """(body, data) of the IOPORT frame."""
        return _packb([self.seq, self.direction, self.size, self.port, self.count]), self.data

    @property
    def length(self) -> int:
        return self.size * self.count


def decode_request(body: bytes | memoryview, data: bytes | memoryview) -> IoRequest:
    """An IOPORT request; anything an x86 IN/OUT could not have produced is a FrameError."""
    obj = _unpack(body)
    if type(obj) is not list or len(obj) != 5 or not all(type(v) is int for v in obj):
        raise FrameError("IOPORT request body must be [seq, direction, size, port, count] (integers)")
    seq, direction, size, port, count = obj
    if not 0 <= seq <= 0xFFFFFFFF:
        raise FrameError(f"IOPORT seq {seq} is not a u32")
    if direction not in (Direction.IN, Direction.OUT):
        raise FrameError(f"IOPORT direction {direction} is neither 0 (in) nor 1 (out)")
    if size not in SIZES:
        raise FrameError(f"IOPORT size {size} is not 1, 2 or 4")
    if not 0 <= port <= MAX_PORT:
        raise FrameError(f"IOPORT port {port:#x} is outside 0-0xffff")
    if count < 1 or size * count > PIO_PAGE:
        raise FrameError(f"IOPORT count {count} of size {size} is outside 1 unit to one {PIO_PAGE}-byte page")
    want = size * count if direction == Direction.OUT else 0
    if len(data) != want:
        raise FrameError(f"IOPORT {'out' if want else 'in'} carries {len(data)} data bytes, not {want}")
    return IoRequest(seq, direction, size, port, count, bytes(data))


def encode_reply(seq: int) -> bytes:
    """The body of the answer to exit ``seq`` (its IN data travels as the frame's data)."""
    return _packb([seq])


def decode_reply(body: bytes | memoryview) -> int:
    """The ``seq`` an IOPORT reply answers."""
    obj = _unpack(body)
    if type(obj) is not list or len(obj) != 1 or type(obj[0]) is not int:
        raise FrameError("IOPORT reply body must be [seq]")
    return int(obj[0])


def _unpack(body: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(body)
    except Exception as exc:
        raise FrameError(f"IOPORT body is not msgpack: {exc}") from None


def string_exits(direction: int, size: int, count: int, page_offset: int = 0) -> list[int]:
    """The units each exit of a ``rep ins``/``rep outs`` of ``count`` units carries (KVM's emulator):
    outs one unit an exit; ins read ahead up to ``READ_AHEAD`` bytes, not past the destination's page end
    (``page_offset``: where in its page the buffer starts)."""
    if direction == Direction.OUT:
        return [1] * count
    chunks = []
    offset = page_offset % PIO_PAGE
    while count:
        n = max(1, min(count, (PIO_PAGE - offset) // size, READ_AHEAD // size))
        chunks.append(n)
        count -= n
        offset = (offset + n * size) % PIO_PAGE
    return chunks


class PortDevice(Protocol):
    """A device on the I/O-port bus (QEMU ``MemoryRegionPortio``): it takes every byte access to its ports;
    ``width(port, size)`` says whether it takes a wider one as one access, else it is split into bytes."""

    def width(self, port: int, size: int) -> bool: ...

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


@dataclass(frozen=True, slots=True)
class _Range:
    first: int
    count: int
    device: PortDevice


class PortBus:
    """The I/O-port address space of one partition: port ranges mapped to devices, with a PC's defaults."""

    def __init__(self) -> None:
        self._ranges: list[_Range] = []
        self.unclaimed = 0  # accesses no device decoded
        self.exits: collections.Counter[tuple[int, int]] = collections.Counter()  # (port, direction) -> exits
        self.data_bytes: collections.Counter[tuple[int, int]] = collections.Counter()  # and the bytes they moved

    def register(self, first: int, count: int, device: PortDevice) -> None:
        if first < 0 or count < 1 or first + count - 1 > MAX_PORT:
            raise ValueError(f"ports {first:#x}+{count} are outside the I/O space")
        if any(first < r.first + r.count and r.first < first + count for r in self._ranges):
            raise ValueError(f"ports {first:#x}+{count} overlap a registered range")
        self._ranges.append(_Range(first, count, device))

    def _device(self, port: int) -> PortDevice | None:
        for r in self._ranges:
            if r.first <= port < r.first + r.count:
                return r.device
        return None

    def read(self, port: int, size: int) -> int:
        dev = self._device(port)
        if dev is not None and (size == 1 or dev.width(port, size)):
            return dev.io_read(port, size) & _ALL_ONES[size]
        if dev is None and size == 1:
            self.unclaimed += 1
            return 0xFF
        return sum(self.read((port + i) & MAX_PORT, 1) << (8 * i) for i in range(size))

    def write(self, port: int, size: int, value: int) -> None:
        dev = self._device(port)
        if dev is not None and (size == 1 or dev.width(port, size)):
            dev.io_write(port, size, value & _ALL_ONES[size])
        elif dev is None and size == 1:
            self.unclaimed += 1
        else:
            for i in range(size):
                self.write((port + i) & MAX_PORT, 1, (value >> (8 * i)) & 0xFF)

    def access(self, req: IoRequest) -> bytes:
        """Carry out one exit; the IN data (empty for OUT)."""
        size = req.size
        self.exits[(req.port, req.direction)] += 1
        self.data_bytes[(req.port, req.direction)] += req.length
        if req.direction == Direction.OUT:
            data = req.data
            for i in range(0, len(data), size):
                self.write(req.port, size, int.from_bytes(data[i:i + size], "little"))
            return b""
        return b"".join(self.read(req.port, size).to_bytes(size, "little") for _ in range(req.count))
