"""Bodies of the envelope's frames (docs/protocol.md): HELLO, AUTH, PACKET, SIGNAL and CLOSE.

A PACKET body is the ring packet's descriptor fields (Linux ``struct vmpacket_descriptor``: type, flags,
trans_id), its in-band payload and, for GPA-direct packets, its ranges (``struct gpa_range``) or, for
transfer-page packets, its ``vmtransfer_page_packet_header`` ranges. A SIGNAL body carries the ring header
fields (Linux ``struct hv_ring_buffer``) that a stream peer cannot read from shared memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import msgpack

from .errors import FrameError, PacketError
from .packets import PAGE_SHIFT, PAGE_SIZE, Buffer, GpaRange, Packet, PacketType

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_unpackb = msgpack.unpackb  # its defaults are ours: raw=False, strict_map_key=True, use_list=True


def _unpack(body: bytes | memoryview, what: str) -> Any:
    try:
        return _unpackb(body)
    except Exception as exc:
        raise FrameError(f"{what} body is not msgpack: {exc}") from None


# ---- HELLO ----------------------------------------------------------------------------------------------

DEFAULT_DATA_WINDOW = 8 * 1024 * 1024  # inline data in flight per channel and direction (docs §7.6)
MIN_DATA_WINDOW = 1024 * 1024
MAX_DATA_WINDOW = 1 << 30


AUTH_NONE = "none"
AUTH_HMAC = "hmac-sha256"  # the challenge-response of vmbus_proto.auth (docs §3.1)
NONCE_SIZE = 32  # bytes of a HELLO nonce
MAX_GUEST_MEMORY = 1 << 52  # a HELLO ``memory``: x64's widest guest physical address space (52 bits)
PROOF_SIZE = 32  # bytes of an AUTH proof (an HMAC-SHA256)
SHARED, STREAM = "shared", "stream"  # a HELLO's memory_mode (docs §14)
MEMORY_MODES = (SHARED, STREAM)


@dataclass(frozen=True, slots=True)
class Hello:
    envelope: int
    partition: str  # the child's name (child to parent) or the host's (parent to child)
    auth: str = AUTH_NONE  # the authentication method: "none" or "hmac-sha256"
    data_window: int = DEFAULT_DATA_WINDOW  # inline data bytes the sender accepts in flight per channel
    nonce: bytes | None = None  # the sender's fresh random challenge, with auth "hmac-sha256" only
    # The guest's memory map: the GPA where its RAM ends (every page frame it names is below memory / 4096);
    # None (not sent): not declared, no bound beyond the parent's own (docs §3, "Guest memory").
    memory: int | None = None
    # "shared": the child's guest memory came with this HELLO as a memfd (SCM_RIGHTS, Unix sockets only) and
    # its rings and data live there (docs §14); in the parent's HELLO, that it took the memory. None: a stream.
    memory_mode: str | None = None
    memory_base: int | None = None  # the GPA of the memfd's first byte (with memory_mode "shared")

    def encode(self) -> bytes:
        body: dict[str, Any] = {"envelope": self.envelope, "partition": self.partition, "auth": self.auth,
                                "data_window": self.data_window}
        if self.nonce is not None:
            body["nonce"] = self.nonce
        if self.memory is not None:
            body["memory"] = self.memory
        if self.memory_mode is not None:
            body["memory_mode"] = self.memory_mode
        if self.memory_base is not None:
            body["memory_base"] = self.memory_base
        return _packb(body)

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Hello:
        obj = _unpack(body, "HELLO")
        if not isinstance(obj, Mapping):
            raise FrameError("HELLO body is not a map")
        env, name, auth = obj.get("envelope"), obj.get("partition"), obj.get("auth", AUTH_NONE)
        if not isinstance(env, int) or not isinstance(name, str) or not isinstance(auth, str):
            raise FrameError("HELLO needs envelope (int), partition (str) and auth (str)")
        if not 0 < len(name) <= 64 or not name.isprintable():
            raise FrameError("HELLO partition name must be 1-64 printable characters")
        window = obj.get("data_window", DEFAULT_DATA_WINDOW)
        if type(window) is not int or not MIN_DATA_WINDOW <= window <= MAX_DATA_WINDOW or window % 8:
            raise FrameError(f"HELLO data_window must be a multiple of 8 from {MIN_DATA_WINDOW} to {MAX_DATA_WINDOW}")
        nonce = obj.get("nonce")
        if auth == AUTH_HMAC and (type(nonce) is not bytes or len(nonce) != NONCE_SIZE):
            raise FrameError(f"HELLO with auth {AUTH_HMAC!r} needs a nonce of {NONCE_SIZE} bytes (bin)")
        memory = obj.get("memory")
        if memory is not None and (type(memory) is not int or not PAGE_SIZE <= memory <= MAX_GUEST_MEMORY
                                   or memory % PAGE_SIZE):
            raise FrameError(f"HELLO memory must be whole pages of {PAGE_SIZE} bytes, at most {MAX_GUEST_MEMORY}")
        mode, base = obj.get("memory_mode"), obj.get("memory_base")
        if mode is not None and mode not in MEMORY_MODES:
            raise FrameError(f"HELLO memory_mode must be one of {', '.join(MEMORY_MODES)}")
        if base is not None and (type(base) is not int or base < 0 or base % PAGE_SIZE or memory is None
                                 or base >= memory):
            raise FrameError("HELLO memory_base must be a page-aligned GPA below memory")
        return cls(env, name, auth, window, nonce if auth == AUTH_HMAC else None, memory, mode, base)


# ---- AUTH -----------------------------------------------------------------------------------------------

def encode_auth(proof: bytes) -> bytes:
    return _packb({"proof": proof})


def decode_auth(body: bytes | memoryview) -> bytes:
    """An AUTH body's proof: exactly ``PROOF_SIZE`` bytes (bin), else a FrameError."""
    obj = _unpack(body, "AUTH")
    proof = obj.get("proof") if isinstance(obj, Mapping) else None
    if type(proof) is not bytes or len(proof) != PROOF_SIZE:
        raise FrameError(f"AUTH body must be a map with proof: {PROOF_SIZE} bytes (bin)")
    return proof


# ---- CLOSE ----------------------------------------------------------------------------------------------

# Why a parent refused a HELLO, for a child to act on without parsing the reason's words (docs §8):
# ``auth`` no method in common (authentication needed, or not offered), ``auth-failed`` a wrong proof or a
# name the parent has no secret for.
#: A TLS client certificate that names another partition (docs §3.3).
CERT_REFUSED = "auth-cert"
REFUSAL_CODES = frozenset({"name-taken", "envelope", "auth", "auth-failed", "hello", CERT_REFUSED})
# The code of a CLOSE that ends an accepted connection because another one, authenticated under the same
# name, replaced it (``[auth] replace = true``, docs §3.2): the child must not reconnect and take it back.
REPLACED = "replaced"


def encode_close(reason: str, code: str | None = None) -> bytes:
    return _packb({"reason": reason, "code": code} if code else {"reason": reason})


def decode_close(body: bytes | memoryview) -> str:
    return decode_close_code(body)[0]


def decode_close_code(body: bytes | memoryview) -> tuple[str, str | None]:
    """A CLOSE body's reason and its optional ``code``; never raises (a CLOSE is the peer's last word)."""
    try:
        obj = _unpack(body, "CLOSE")
    except FrameError:
        return "(undecodable CLOSE)", None
    if not isinstance(obj, Mapping):
        return "(no reason)", None
    reason = obj.get("reason")
    code = obj.get("code")
    return (reason if isinstance(reason, str) else "(no reason)"), (code if isinstance(code, str) else None)


# ---- PACKET ---------------------------------------------------------------------------------------------

def encode_packet(pkt: Packet) -> bytes:
    ext: Any = None
    if pkt.ranges:
        ext = pkt.ranges  # msgpack writes the named tuples as [byte_count, byte_offset, [pfn, ...]]
    elif pkt.xfer_ranges:
        ext = [pkt.xfer_pageset_id, pkt.xfer_ranges]  # the (byte_count, byte_offset) tuples as arrays
    return _packb([pkt.type, pkt.flags, pkt.trans_id, pkt.payload, ext])


_INBAND_OR_COMP = (PacketType.DATA_INBAND, PacketType.COMP)
_GPA_DIRECT = int(PacketType.DATA_USING_GPA_DIRECT)
_INT_ONLY = frozenset({int})
_XFER_PAGES = int(PacketType.DATA_USING_XFER_PAGES)
_LIST_ONLY = frozenset({list})
_PAIR = frozenset({2})
_tuple_new = tuple.__new__


NO_PFN_BOUND = 1 << 64  # a PFN is a u64: no partition memory map declared


def decode_packet(body: bytes | memoryview, data: Buffer, max_payload: int, pfn_bound: int = NO_PFN_BOUND) -> Packet:
    """A PACKET body. ``pfn_bound``: the partition's memory map ends at this page frame; a GPA range naming a
    page at or beyond it is refused like any bad range (a PacketError: Hyper-V's rule, docs §7.4)."""
    try:
        obj = _unpackb(body)
    except Exception:
        obj = _unpack(body, "PACKET")  # raises the FrameError that names the fault
    if type(obj) is not list or len(obj) != 5:
        raise PacketError("PACKET body is not [type, flags, trans_id, payload, ext]")
    ptype, flags, trans_id, payload, ext = obj
    # Fast paths, checked exactly as Packet.validate would: in-band packets and completions, and GPA-direct
    # packets with one range (every storage I/O). Anything else, valid or not, takes the general path.
    if (type(ptype) is int and type(flags) is int and not flags & ~1 and type(trans_id) is int
            and 0 <= trans_id < 1 << 64 and type(payload) is bytes and len(payload) <= max_payload):
        if ext is None and ptype in _INBAND_OR_COMP:  # its ring size known at once (Packet.ring_size)
            return Packet(ptype, flags, trans_id, payload, (), data, 0, (), 24 + ((len(payload) + 7) & ~7))
        if ptype == _GPA_DIRECT and type(ext) is list and len(ext) == 1:
            r = ext[0]
            if type(r) is list and len(r) == 3:
                count, offset, pfns = r
                if (type(count) is int and type(offset) is int and type(pfns) is list and count > 0
                        and 0 <= offset < PAGE_SIZE and len(pfns) == (offset + count + PAGE_SIZE - 1) >> PAGE_SHIFT
                        and set(map(type, pfns)) <= _INT_ONLY and min(pfns) >= 0 and max(pfns) < pfn_bound):
                    # The range built without its named tuple's __new__; the ring size (Packet.ring_size:
                    # descriptor, GPA-direct header, one range, padded payload, trailer) known at once.
                    rng = _tuple_new(GpaRange, (count, offset, tuple(pfns)))
                    return Packet(ptype, flags, trans_id, payload, (rng,), data, 0, (),
                                  40 + 8 * len(pfns) + ((len(payload) + 7) & ~7))
        if ptype == _XFER_PAGES and type(ext) is list and len(ext) == 2 and type(ext[0]) is int:
            xr = ext[1]  # NetVSP's receive path: [pageset_id, [[byte_count, byte_offset], ...]]
            if type(xr) is list and xr and set(map(type, xr)) == _LIST_ONLY and set(map(len, xr)) == _PAIR \
                    and set(map(type, chain.from_iterable(xr))) == _INT_ONLY:
                # Ring size: descriptor, transfer-page header, 8 bytes a range, padded payload, trailer.
                return Packet(ptype, flags, trans_id, payload, (), data, ext[0], tuple(map(tuple, xr)),
                              32 + 8 * len(xr) + ((len(payload) + 7) & ~7))
    if not (type(ptype) is int and type(flags) is int and type(trans_id) is int):
        raise PacketError("PACKET type, flags and trans_id must be integers")
    if not isinstance(payload, bytes):
        raise PacketError("PACKET payload must be bytes")
    if len(payload) > max_payload:
        raise PacketError(f"in-band payload of {len(payload)} bytes exceeds {max_payload}")
    pkt = Packet(ptype, flags, trans_id, payload, data=data)
    if ptype == PacketType.DATA_USING_GPA_DIRECT:
        if not isinstance(ext, list):
            raise PacketError("GPA-direct PACKET without ranges")
        ranges = []
        for r in ext:
            if (type(r) is not list or len(r) != 3 or type(r[0]) is not int or type(r[1]) is not int
                    or type(r[2]) is not list or not all(type(p) is int and p >= 0 for p in r[2])):
                raise PacketError("GPA range must be [byte_count, byte_offset, [pfn, ...]]")
            if r[2] and max(r[2]) >= pfn_bound:
                raise PacketError(f"GPA range names page {max(r[2]):#x}, outside the partition's guest memory "
                                  f"(pages below {pfn_bound:#x})")
            ranges.append(GpaRange(r[0], r[1], tuple(r[2])))
        pkt.ranges = tuple(ranges)
    elif ptype == PacketType.DATA_USING_XFER_PAGES:
        if (not isinstance(ext, list) or len(ext) != 2 or not isinstance(ext[0], int)
                or not isinstance(ext[1], list)):
            raise PacketError("transfer-page PACKET needs [pageset_id, [[byte_count, byte_offset], ...]]")
        xr = []
        for r in ext[1]:
            if not isinstance(r, list) or len(r) != 2 or not all(isinstance(v, int) for v in r):
                raise PacketError("transfer-page range must be [byte_count, byte_offset]")
            xr.append((r[0], r[1]))
        pkt.xfer_pageset_id, pkt.xfer_ranges = ext[0], tuple(xr)
    elif ext is not None:
        raise PacketError(f"packet type {ptype:#x} carries no extension")
    pkt.validate()
    return pkt


# ---- SIGNAL ---------------------------------------------------------------------------------------------

_READER_FIELDS = frozenset({"read_index", "interrupt_mask", "data_read_index"})
_WRITER_FIELDS = frozenset({"write_index", "pending_send_sz", "data_pending_sz"})
_SIGNAL_FIELDS = ("read_index", "interrupt_mask", "write_index", "pending_send_sz", "data_read_index",
                  "data_pending_sz")

@dataclass(frozen=True, slots=True)
class Signal:
    """Ring header fields for ring ``ring`` (0 guest-to-host, 1 host-to-guest) of a channel.

    The reader sends read_index and interrupt_mask; the writer sends write_index and pending_send_sz.
    ``data_read_index`` and ``data_pending_sz`` are the same two fields for the channel's data window in
    that direction (the inline GPA data a stream carries; ``vmbus_proto.channel``).
    """

    ring: int
    read_index: int | None = None
    interrupt_mask: int | None = None
    write_index: int | None = None
    pending_send_sz: int | None = None
    data_read_index: int | None = None
    data_pending_sz: int | None = None

    def encode(self) -> bytes:
        out: dict[str, int] = {"ring": self.ring}
        for name in _SIGNAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return _packb(out)

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Signal:
        obj = _unpack(body, "SIGNAL")
        if not isinstance(obj, Mapping) or type(obj.get("ring")) is not int or obj["ring"] not in (0, 1):
            raise FrameError("SIGNAL body must be a map with ring 0 or 1")
        fields: dict[str, int] = {}
        for key, value in obj.items():
            if key == "ring":
                continue
            if key not in _SIGNAL_FIELDS:
                raise FrameError(f"SIGNAL has unknown field {key!r}")
            if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
                raise FrameError(f"SIGNAL {key} must be a u32")
            fields[key] = value
        reader = not _READER_FIELDS.isdisjoint(fields)
        writer = not _WRITER_FIELDS.isdisjoint(fields)
        if reader and writer:
            raise FrameError("SIGNAL mixes the reader's and the writer's fields")
        return cls(ring=int(obj["ring"]), **fields)
