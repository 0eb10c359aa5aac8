"""Rings in shared memory: the real ``struct hv_ring_buffer`` header and packet format, read and written in
place (sans-IO: the caller hands in the mapped pages and sends the signals this module says are due).

Linux include/linux/hyperv.h (``struct hv_ring_buffer``, ``struct vmpacket_descriptor``,
``vmtransfer_page_packet_header``, ``vmdata_gpa_direct``), drivers/hv/ring_buffer.c (``hv_ringbuffer_write``
and its 8-byte trailer, ``hv_signal_on_write``, ``hv_pkt_iter_first``/``close``, ``hv_begin_read`` /
``hv_end_read``); OpenVMM vm/devices/vmbus/vmbus_ring (``InnerRing::validate``, ``parse_packet``,
``commit_write``, ``commit_read``).

The header page: write_index u32 @0 (writer), read_index u32 @4 (reader), interrupt_mask u32 @8 (reader),
pending_send_sz u32 @12 (writer), feature_bits u32 @64 (bit 0: the reader signals a blocked writer); the
data area starts at 4096. A packet is its 16-byte descriptor, any transfer-page or GPA-direct header, the
payload padded to 8 and an 8-byte trailer holding the offset it started at. Rules: a writer needs strictly
more free bytes than its packet, and signals only when the ring was empty before its write and the reader has
not masked interrupts; a reader signals a blocked writer only when free space crosses its pending_send_sz.

The peer can change any of these bytes at any time, so every field is read once, then checked (indices in
range and 8-aligned, lengths within what the writer published, GPA ranges within the partition's memory),
and a packet is copied out of the ring before it is parsed, as Linux does since its confidential-VM
hardening: a peer that scribbles on its rings gets a ``RingCorruptError`` (the connection's end), never a
wrong read of the host's own state.
"""

from __future__ import annotations

import struct
import threading

from .errors import PacketError, RingOverrunError
from .packets import (
    ACCEPTED_TYPES,
    DESCRIPTOR_SIZE,
    FLAG_COMPLETION_REQUESTED,
    PAGE_SHIFT,
    PAGE_SIZE,
    TRAILER_SIZE,
    GpaRange,
    Packet,
    PacketType,
)
from .ring import RingStats

# u32 words of the header page (struct hv_ring_buffer)
W_WRITE, W_READ, W_MASK, W_PENDING, W_FEATURES = 0, 1, 2, 3, 16
FEAT_PENDING_SEND_SZ = 0x1

_DESC = struct.Struct("<HHHHQ")  # type, offset8, len8, flags, trans_id
_U32X2 = struct.Struct("<II")
_XFER = struct.Struct("<HBBI")  # xfer_pageset_id, sender_owns_set, reserved, range_cnt
_TRAILER = struct.Struct("<Q")
_GPA_DIRECT, _XFER_PAGES = int(PacketType.DATA_USING_GPA_DIRECT), int(PacketType.DATA_USING_XFER_PAGES)
_INBAND, _COMP = int(PacketType.DATA_INBAND), int(PacketType.COMP)
_PAD = bytes(8)
_FAST_TYPES = frozenset({_INBAND, _COMP})
MAX_RANGES = 4096  # GPA ranges in one packet: far above what a storvsc or netvsc packet names


_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier (Linux ``virt_mb``): a locked instruction, which orders our store before our next
    load as another CPU sees them. Taken where a side stores one header field and then reads one the other
    side stores (the two checks that decide whether a signal is due), so neither side misses the other's."""
    _FENCE.acquire()
    _FENCE.release()


class RingCorruptError(RingOverrunError):
    """The peer left a ring's shared fields in a state no correct peer can produce."""


class RingMemory:
    """One ring's pages as mapped: the header page and the data area, which may be several runs of pages
    (a GPADL's page list need not be contiguous); offsets into the data area wrap around its size."""

    __slots__ = ("data", "header", "runs", "size", "words")

    def __init__(self, header: memoryview, runs: list[memoryview]) -> None:
        if header.nbytes != PAGE_SIZE or not runs or any(r.nbytes % PAGE_SIZE for r in runs):
            raise ValueError("a ring is a header page and whole data pages")
        self.header = header
        self.words = header.cast("B").cast("I")
        self.runs = runs
        self.data = runs[0] if len(runs) == 1 else None  # the common case: one contiguous run
        self.size = sum(r.nbytes for r in runs)

    def copy_out(self, offset: int, n: int) -> bytes:
        """``n`` bytes from data offset ``offset`` (wrapping)."""
        data, size = self.data, self.size
        if data is not None:
            end = offset + n
            if end <= size:
                return bytes(data[offset:end])
            return bytes(data[offset:]) + bytes(data[:end - size])
        return b"".join(self._pieces(offset, n))

    def copy_in(self, offset: int, buf: bytes | bytearray | memoryview) -> None:
        """Write ``buf`` at data offset ``offset`` (wrapping)."""
        data, size, n = self.data, self.size, len(buf)
        if data is not None:
            end = offset + n
            if end <= size:
                data[offset:end] = buf
            else:
                first = size - offset
                data[offset:] = buf[:first]
                data[:n - first] = buf[first:]
            return
        view, pos = memoryview(buf), 0
        for run, start, length in self._spans(offset, n):
            run[start:start + length] = view[pos:pos + length]
            pos += length

    def _spans(self, offset: int, n: int) -> list[tuple[memoryview, int, int]]:
        out: list[tuple[memoryview, int, int]] = []
        offset %= self.size
        while n > 0:
            base = 0
            for run in self.runs:
                if offset < base + run.nbytes:
                    start = offset - base
                    length = min(run.nbytes - start, n)
                    out.append((run, start, length))
                    n -= length
                    offset = (offset + length) % self.size
                    break
                base += run.nbytes
        return out

    def _pieces(self, offset: int, n: int) -> list[bytes]:
        return [bytes(run[start:start + length]) for run, start, length in self._spans(offset, n)]

    def init(self) -> None:
        """A fresh ring (the guest, before OPENCHANNEL; Linux ``hv_ringbuffer_init``): indices 0, unmasked, and
        feature_bits saying this side signals a blocked writer."""
        self.header[:] = bytes(PAGE_SIZE)
        self.words[W_FEATURES] = FEAT_PENDING_SEND_SZ


def encode(pkt: Packet) -> bytes:
    """``pkt`` as the bytes it occupies in a ring up to its trailer (which ``RingOut.write`` adds)."""
    payload, ranges, xfer = pkt.payload, pkt.ranges, pkt.xfer_ranges
    if ranges:
        parts = [_U32X2.pack(0, len(ranges))]
        for r in ranges:
            parts.append(_U32X2.pack(r.byte_count, r.byte_offset))
            parts.append(struct.pack(f"<{len(r.pfns)}Q", *r.pfns))
        ext = b"".join(parts)
    elif xfer:
        ext = _XFER.pack(pkt.xfer_pageset_id, 0, 0, len(xfer)) + struct.pack(
            f"<{2 * len(xfer)}I", *(v for pair in xfer for v in pair))
    else:
        ext = b""
    head = DESCRIPTOR_SIZE + len(ext)
    pad = -len(payload) & 7
    len8 = (head + len(payload) + pad) >> 3
    return b"".join((_DESC.pack(pkt.type, head >> 3, len8, pkt.flags, pkt.trans_id), ext, payload, _PAD[:pad]))


def decode(raw: bytes, max_payload: int, pfn_bound: int) -> Packet:
    """A packet copied out of a ring (its trailer excluded), checked as OpenVMM's ``parse_packet`` checks it."""
    ptype, off8, len8, flags, trans_id = _DESC.unpack_from(raw)
    head, end = off8 << 3, len8 << 3
    if off8 < 2 or end < head or end != len(raw):
        raise PacketError(f"packet descriptor offset8 {off8} / len8 {len8} is not a valid layout")
    if ptype not in ACCEPTED_TYPES:
        raise PacketError(f"packet type {ptype:#x} is not accepted on a ring")
    if flags & ~FLAG_COMPLETION_REQUESTED:
        raise PacketError(f"packet flags {flags:#x} has bits other than COMPLETION_REQUESTED")
    payload = raw[head:end]
    if len(payload) > max_payload:
        raise PacketError(f"in-band payload of {len(payload)} bytes exceeds {max_payload}")
    if ptype in (_INBAND, _COMP):
        return Packet(ptype, flags, trans_id, payload, size=end + TRAILER_SIZE)
    pkt = Packet(ptype, flags, trans_id, payload, size=end + TRAILER_SIZE)
    if ptype == _GPA_DIRECT:
        if head < DESCRIPTOR_SIZE + 8:
            raise PacketError("GPA-direct header does not fit before the payload")
        count = _U32X2.unpack_from(raw, DESCRIPTOR_SIZE)[1]
        if not 0 < count <= MAX_RANGES:
            raise PacketError(f"GPA-direct packet with range_count {count}")
        pos, ranges = DESCRIPTOR_SIZE + 8, []
        for _ in range(count):
            if pos + 8 > head:
                raise PacketError("GPA ranges run past the packet's offset8")
            byte_count, byte_offset = _U32X2.unpack_from(raw, pos)
            npfn = (byte_offset + byte_count + PAGE_SIZE - 1) >> PAGE_SHIFT
            if byte_count == 0 or byte_offset >= PAGE_SIZE or pos + 8 + 8 * npfn > head:
                raise PacketError(f"GPA range of {byte_count} bytes at offset {byte_offset} does not fit")
            pfns = struct.unpack_from(f"<{npfn}Q", raw, pos + 8)
            if max(pfns) >= pfn_bound:
                raise PacketError(f"GPA range names page {max(pfns):#x}, outside the partition's guest memory "
                                  f"(pages below {pfn_bound:#x})")
            ranges.append(GpaRange(byte_count, byte_offset, pfns))
            pos += 8 + 8 * npfn
        pkt.ranges = tuple(ranges)
    elif ptype == _XFER_PAGES:
        if head < DESCRIPTOR_SIZE + 8:
            raise PacketError("transfer-page header does not fit before the payload")
        pageset, _owns, _res, count = _XFER.unpack_from(raw, DESCRIPTOR_SIZE)
        if not 0 < count <= MAX_RANGES or DESCRIPTOR_SIZE + 8 + 8 * count > head:
            raise PacketError(f"transfer-page packet with {count} ranges does not fit")
        flat = struct.unpack_from(f"<{2 * count}I", raw, DESCRIPTOR_SIZE + 8)
        pkt.xfer_pageset_id = pageset
        pkt.xfer_ranges = tuple(zip(flat[::2], flat[1::2], strict=True))
    return pkt


class RingOut:
    """The writer's side of a ring in shared memory (Linux ``hv_ringbuffer_write``)."""

    __slots__ = ("data_size", "mem", "size", "stats")

    def __init__(self, mem: RingMemory) -> None:
        self.mem = mem
        self.size = self.data_size = mem.size
        self.stats = RingStats()  # interrupts: signals we were due to send; blocked: pending_send_sz set

    def _read_index(self) -> int:
        r = self.mem.words[W_READ]
        if r >= self.size or r & 7:
            raise RingCorruptError(f"read_index {r} is not an 8-aligned offset below {self.size}")
        return r

    @property
    def free(self) -> int:
        """Free bytes as Linux's ``hv_get_bytes_to_write`` counts them (a packet needs strictly more)."""
        words = self.mem.words
        return self.size - (words[W_WRITE] - self._read_index()) % self.size

    def write_inband(self, ptype: int, flags: int, trans_id: int, payload: bytes) -> bool | None:
        """An in-band packet or completion (no GPA ranges) packed straight into the ring when it fits before the
        ring's end: the per-packet hot path, Linux's ``vmbus_sendpacket`` (buffer, request id, type, flags;
        no packet object, no intermediate bytes). Returns as ``write``."""
        data = self.mem.data
        if data is None:
            return self.write(encode(Packet(ptype, flags, trans_id, payload)))
        plen = len(payload)
        body = 16 + ((plen + 7) & ~7)
        n = body + TRAILER_SIZE
        words, size = self.mem.words, self.size
        w, r = words[W_WRITE], words[W_READ]
        if r >= size or r & 7 or w >= size or w & 7:
            self._read_index()
            raise RingCorruptError(f"our write_index {w} was changed to an invalid offset")
        if n >= size - (w - r) % size:
            return None
        if w + n > size:
            return self.write(encode(Packet(ptype, flags, trans_id, payload)))
        _DESC.pack_into(data, w, ptype, 2, body >> 3, flags, trans_id)
        end = w + 16 + plen
        data[w + 16:end] = payload
        if end & 7:
            data[end:w + body] = _PAD[:w + body - end]
        _TRAILER.pack_into(data, w + body, w << 32)
        words[W_WRITE] = (w + n) % size  # published after the data (x86 stores are not reordered)
        return self._signal_due(w, n)

    def write(self, raw: bytes) -> bool | None:
        """Put the encoded packet ``raw`` (``encode``) and its trailer in the ring: None if it does not fit now,
        else whether the reader must be signalled (the ring was empty and the reader did not mask interrupts)."""
        mem = self.mem
        words, size, n = mem.words, self.size, len(raw) + TRAILER_SIZE
        w, r = words[W_WRITE], self._read_index()
        if w >= size or w & 7:
            raise RingCorruptError(f"our write_index {w} was changed to an invalid offset")
        used = (w - r) % size
        if n >= size - used:
            return None
        # The trailer: where this packet started, in the high half (Linux: (u64)write_index << 32).
        mem.copy_in(w, raw)
        mem.copy_in((w + n - TRAILER_SIZE) % size, _TRAILER.pack(w << 32))
        words[W_WRITE] = (w + n) % size  # published after the data (x86 stores are not reordered)
        return self._signal_due(w, n)

    def _signal_due(self, w: int, n: int) -> bool:
        """``hv_signal_on_write``: after the barrier, whether the ring was empty before this packet (read_index,
        read again now, is where it started) and the reader has not masked interrupts."""
        stats = self.stats
        stats.packets += 1
        stats.bytes += n
        fence()
        words = self.mem.words
        if words[W_MASK] or words[W_READ] != w:
            return False
        stats.interrupts += 1
        return True

    def fits_ever(self, n: int) -> bool:
        return n < self.size

    def block(self, n: int) -> bool:
        """We cannot fit ``n`` bytes: publish pending_send_sz, then re-read read_index (the reader may have
        freed space meanwhile); returns whether it fits now (pending_send_sz is cleared again)."""
        words = self.mem.words
        words[W_PENDING] = (n + 7) & ~7
        fence()
        if n < self.free:
            words[W_PENDING] = 0
            return True
        self.stats.blocked += 1
        return False

    def unblock(self) -> None:
        self.mem.words[W_PENDING] = 0


class RingIn:
    """The reader's side of a ring in shared memory (Linux ``hv_pkt_iter_*``, OpenVMM ``commit_read``)."""

    __slots__ = ("data_size", "held", "max_payload", "mem", "pfn_bound", "size", "stats")

    def __init__(self, mem: RingMemory, max_payload: int, pfn_bound: int) -> None:
        self.mem = mem
        self.size = self.data_size = mem.size
        self.max_payload = max_payload
        self.pfn_bound = pfn_bound
        self.stats = RingStats()  # interrupts: signals that found packets; credit_updates: writers woken
        self.held = False  # the last batch stopped at its budget: packets wait in the ring, unsignalled

    @property
    def used(self) -> int:
        """Bytes published and not yet read, as the header says now."""
        words = self.mem.words
        return (words[W_WRITE] - words[W_READ]) % self.size

    def read_batch(self, budget: int, linger: bool = False) -> tuple[list[Packet], bool]:
        """Take the packets the writer has published, up to ``budget`` ring bytes, copying each out of the ring
        and advancing read_index once for the batch. Returns them and whether the writer must be signalled
        (its pending_send_sz was crossed). Interrupts stay masked while draining (``hv_begin_read``); the
        unmask is followed by a re-check, so a packet written meanwhile is not left without a signal.
        ``linger``: when packets came, leave interrupts masked (the caller polls once more soon, as NAPI does,
        and a writer meanwhile need not signal); a batch that finds nothing always unmasks."""
        mem = self.mem
        words, size, data = mem.words, self.size, mem.data
        r = words[W_READ]
        if r >= size or r & 7:
            raise RingCorruptError(f"our read_index {r} was changed to an invalid offset")
        out: list[Packet] = []
        start = r
        words[W_MASK] = 1
        taken = 0
        while True:
            w = words[W_WRITE]
            if w >= size or w & 7:
                raise RingCorruptError(f"write_index {w} is not an 8-aligned offset below {size}")
            avail = (w - r) % size
            while avail:
                if avail < DESCRIPTOR_SIZE + TRAILER_SIZE:
                    raise RingCorruptError(f"{avail} bytes published: less than a packet")
                if data is not None and r + DESCRIPTOR_SIZE <= size:  # the descriptor, read once
                    ptype, off8, len8, flags, tid = _DESC.unpack_from(data, r)
                else:
                    ptype, off8, len8, flags, tid = _DESC.unpack(mem.copy_out(r, DESCRIPTOR_SIZE))
                n = (len8 << 3) + TRAILER_SIZE
                if n > avail or len8 < 2:
                    raise RingCorruptError(f"packet of {n} bytes with {avail} published")
                if taken + n > budget and out:
                    break
                if (off8 == 2 and ptype in _FAST_TYPES and not flags & ~1 and data is not None
                        and r + n <= size):  # the hot path: an in-band packet or completion, not wrapped
                    if (len8 - 2) << 3 > self.max_payload:
                        raise PacketError(f"in-band payload of {(len8 - 2) << 3} bytes exceeds {self.max_payload}")
                    out.append(Packet(ptype, flags, tid, data[r + 16:r + (len8 << 3)].tobytes(), (), b"", 0, (), n))
                else:
                    out.append(decode(mem.copy_out(r, n - TRAILER_SIZE), self.max_payload, self.pfn_bound))
                r = (r + n) % size
                avail -= n
                taken += n
            if avail:
                break  # the budget is spent; the rest stays in the ring (masked: the reader comes back)
            words[W_READ] = r  # hv_pkt_iter_close: the space is the writer's before we unmask
            if linger and out:
                break  # still masked: the caller comes back
            words[W_MASK] = 0
            fence()
            if words[W_WRITE] == w:  # hv_end_read: nothing came while we were masked
                break
            words[W_MASK] = 1
        self.held = bool(avail)
        if not out:
            words[W_MASK] = 0
            return out, False
        stats = self.stats
        stats.packets += len(out)
        stats.bytes += taken
        return out, self._commit(start, r)

    def _commit(self, old: int, new: int) -> bool:
        """Publish read_index ``new``; whether a blocked writer must be woken (Linux ``hv_pkt_iter_close``:
        free space went from at most its pending_send_sz to above it; pss rounded down to 8, as OpenVMM)."""
        words, size = self.mem.words, self.size
        words[W_READ] = new
        fence()
        pss = words[W_PENDING] & ~7
        if not pss:
            return False
        w = words[W_WRITE] % size
        old_free = size - (w - old) % size
        new_free = size - (w - new) % size
        if old_free <= pss < new_free:
            self.stats.credit_updates += 1
            return True
        return False


def ring_memory(view: memoryview, page_offsets: list[int]) -> RingMemory:
    """The ring made of the pages at ``page_offsets`` of ``view`` (the first is its header), consecutive pages
    joined into runs."""
    if len(page_offsets) < 2:
        raise ValueError("a ring needs a header page and at least one data page")
    runs: list[memoryview] = []
    start = prev = page_offsets[1]
    for off in page_offsets[2:]:
        if off != prev + PAGE_SIZE:
            runs.append(view[start:prev + PAGE_SIZE])
            start = off
        prev = off
    runs.append(view[start:prev + PAGE_SIZE])
    first = page_offsets[0]
    return RingMemory(view[first:first + PAGE_SIZE], runs)


class GuestPages:
    """A partition's guest memory as one mapping (its memfd): page frame ``pfn`` is at byte
    ``(pfn - base_pfn) * 4096``. Every page a GPA range or a ring names is checked to be inside it."""

    __slots__ = ("base_pfn", "pages", "view")

    def __init__(self, view: memoryview, base_pfn: int) -> None:
        self.view = view
        self.base_pfn = base_pfn
        self.pages = view.nbytes // PAGE_SIZE

    def offset(self, pfn: int) -> int:
        idx = pfn - self.base_pfn
        if not 0 <= idx < self.pages:
            raise PacketError(f"page {pfn:#x} is outside the partition's guest memory (pages {self.base_pfn:#x} to "
                              f"{self.base_pfn + self.pages - 1:#x})")
        return idx << PAGE_SHIFT

    def slice(self, rng: GpaRange) -> memoryview | None:
        """The bytes ``rng`` names as one view of the mapping when its pages are consecutive, else None."""
        pfns = rng.pfns
        first = pfns[0]
        if len(pfns) > 1 and (pfns[-1] - first != len(pfns) - 1 or (len(pfns) > 2 and pfns != tuple(
                range(first, first + len(pfns))))):
            return None
        start = self.offset(first)
        self.offset(pfns[-1])
        start += rng.byte_offset
        return self.view[start:start + rng.byte_count]

    def _pieces(self, rng: GpaRange) -> list[memoryview]:
        out, offset, left = [], rng.byte_offset, rng.byte_count
        for pfn in rng.pfns:
            n = min(PAGE_SIZE - offset, left)
            if n <= 0:
                break
            base = self.offset(pfn) + offset
            out.append(self.view[base:base + n])
            offset, left = 0, left - n
        return out

    def read(self, ranges: tuple[GpaRange, ...]) -> bytes | memoryview:
        """The bytes ``ranges`` name: a view of the mapping itself for one range of consecutive pages (no copy;
        the guest can change it while it is read, as DMA from guest memory allows), else a copy."""
        if len(ranges) == 1:
            view = self.slice(ranges[0])
            if view is not None:
                return view
        return b"".join(b"".join(self._pieces(r)) for r in ranges)

    def write(self, ranges: tuple[GpaRange, ...], data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` into the pages ``ranges`` name, in order, as far as both go; returns bytes written."""
        src, pos, total = memoryview(data).cast("B"), 0, len(data)
        for r in ranges:
            if pos >= total:
                break
            view = self.slice(r)
            for piece in ([view] if view is not None else self._pieces(r)):
                n = min(piece.nbytes, total - pos)
                piece[:n] = src[pos:pos + n]
                pos += n
                if pos >= total:
                    break
        return pos

    def ring(self, pfns: list[int] | tuple[int, ...]) -> RingMemory:
        """The ring on these pages (the first its header): a half of an OPENCHANNEL's ring GPADL."""
        return ring_memory(self.view, [self.offset(p) for p in pfns])
