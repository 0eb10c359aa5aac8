"""Receive-side scaling, sans-IO: the Toeplitz hash, the hash input a frame gives for the guest's hash types,
and the queue the indirection table maps it to.

Mirrors Microsoft's "RSS Hashing Functions" (NdisHashFunctionToeplitz over a 40-byte secret key; the input is
source address, destination address, then source and destination port for TCP) and "RSS Hashing Types"
(NDIS_HASH_IPV4, TCP_IPV4, IPV6, TCP_IPV6 in ``NDIS_RECEIVE_SCALE_PARAMETERS.HashInformation``); the queue
is ``table[hash % len(table)]`` (the low bits, the table being a power of two). A frame with nothing to
hash (not IP, or a hash type the guest did not ask for) goes to queue 0, as OpenVMM's default queue. The
same hash picks the transmit queue through NVSP's 16-entry send indirection table (Linux
``netvsc_pick_tx``: ``tx_table[hash & (VRSS_SEND_TAB_SIZE - 1)]``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

NDIS_HASH_FUNC_TOEPLITZ = 0x1
NDIS_HASH_IPV4 = 0x100
NDIS_HASH_TCP_IPV4 = 0x200
NDIS_HASH_IPV6 = 0x400
NDIS_HASH_IPV6_EX = 0x800
NDIS_HASH_TCP_IPV6 = 0x1000
NDIS_HASH_TCP_IPV6_EX = 0x2000
LINUX_HASH_INFO = (NDIS_HASH_FUNC_TOEPLITZ | NDIS_HASH_IPV4 | NDIS_HASH_TCP_IPV4 | NDIS_HASH_IPV6
                   | NDIS_HASH_TCP_IPV6)  # what rndis_filter_set_rss_param asks for
KEY_SIZE = 40

_ETH_IPV4, _ETH_IPV6, _ETH_VLAN = b"\x08\x00", b"\x86\xdd", (b"\x81\x00", b"\x88\xa8")
_TCP = 6


class Toeplitz:
    """The Toeplitz hash under one key. Per input byte position a 256-entry table of the 32-bit windows its
    set bits select is built on first use, so a hash costs one lookup and one XOR per input byte."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 4:
            raise ValueError(f"a Toeplitz key has at least 4 bytes, not {len(key)}")
        self.key = bytes(key)
        self._bits = len(self.key) * 8
        self._k = int.from_bytes(self.key, "big")
        self._tables: list[list[int]] = []

    def _table(self, pos: int) -> list[int]:
        # Input bit i (0 = the leftmost) selects key bits i..i+31; past the key's end the key reads as zeros.
        windows = []
        for bit in range(8):
            shift = self._bits - 32 - (pos * 8 + bit)
            windows.append(((self._k >> shift) if shift >= 0 else (self._k << -shift)) & 0xFFFFFFFF)
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            table[value] = table[value ^ low] ^ windows[7 - (low.bit_length() - 1)]
        return table

    def hash(self, data: bytes) -> int:
        tables = self._tables
        while len(tables) < len(data):
            tables.append(self._table(len(tables)))
        result = 0
        for pos, byte in enumerate(data):
            result ^= tables[pos][byte]
        return result


def hash_input(frame: bytes, hash_info: int = LINUX_HASH_INFO) -> bytes | None:
    """The bytes RSS hashes for an Ethernet frame, for the hash types in ``hash_info``: IPv4 or IPv6
    addresses, with the TCP ports for an unfragmented TCP segment when TCP hashing is on; None when the frame
    has nothing to hash (not IP, a type not asked for, truncated)."""
    pos = 12
    ethertype = frame[pos:pos + 2]
    while ethertype in _ETH_VLAN:  # 802.1Q / 802.1ad tags
        pos += 4
        ethertype = frame[pos:pos + 2]
    ip = pos + 2
    if ethertype == _ETH_IPV4:
        if len(frame) < ip + 20 or frame[ip] >> 4 != 4:
            return None
        addresses = frame[ip + 12:ip + 20]
        header = (frame[ip] & 0xF) * 4
        fragment = struct.unpack_from(">H", frame, ip + 6)[0] & 0x3FFF  # MF or an offset: no ports to read
        tcp_on, ip_on = hash_info & NDIS_HASH_TCP_IPV4, hash_info & NDIS_HASH_IPV4
        proto = frame[ip + 9]
    elif ethertype == _ETH_IPV6:
        if len(frame) < ip + 40 or frame[ip] >> 4 != 6:
            return None
        addresses = frame[ip + 8:ip + 40]
        header, fragment = 40, 0
        tcp_on, ip_on = hash_info & NDIS_HASH_TCP_IPV6, hash_info & NDIS_HASH_IPV6
        proto = frame[ip + 6]  # the next header; extension headers are hashed as the plain IPv6 type
    else:
        return None
    l4 = ip + header
    if tcp_on and proto == _TCP and not fragment and len(frame) >= l4 + 4:
        return addresses + frame[l4:l4 + 4]
    return addresses if ip_on else None


@dataclass(slots=True)
class RssConfig:
    """What OID_GEN_RECEIVE_SCALE_PARAMETERS set: the hash types, the key, the indirection table."""

    hash_info: int
    key: bytes
    table: tuple[int, ...]
    toeplitz: Toeplitz = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.table:
            raise ValueError("an RSS indirection table has at least one entry")
        self.toeplitz = Toeplitz(self.key)

    def hash(self, frame: bytes) -> int | None:
        """The frame's RSS hash, or None when it has nothing to hash."""
        data = hash_input(frame, self.hash_info)
        return None if data is None else self.toeplitz.hash(data)

    def queue(self, frame: bytes) -> int:
        """The queue the indirection table sends ``frame`` to (0 when it has nothing to hash)."""
        value = self.hash(frame)
        return 0 if value is None else self.table[value % len(self.table)]


_TYPE_NAMES = ((NDIS_HASH_IPV4, "ipv4"), (NDIS_HASH_TCP_IPV4, "tcp4"), (NDIS_HASH_IPV6, "ipv6"),
               (NDIS_HASH_IPV6_EX, "ipv6ex"), (NDIS_HASH_TCP_IPV6, "tcp6"), (NDIS_HASH_TCP_IPV6_EX, "tcp6ex"))


def hash_types_text(hash_info: int) -> str:
    """The hash types in ``hash_info``, as "ipv4,tcp4,ipv6,tcp6"."""
    return ",".join(name for bit, name in _TYPE_NAMES if hash_info & bit) or "none"


def send_queue(table: tuple[int, ...], flow_hash: int | None) -> int:
    """netvsc_pick_tx: the send indirection table's entry for the flow's hash (queue 0 without one)."""
    if not table or flow_hash is None:
        return 0
    return table[flow_hash % len(table)]


__all__ = ["KEY_SIZE", "LINUX_HASH_INFO", "NDIS_HASH_FUNC_TOEPLITZ", "NDIS_HASH_IPV4", "NDIS_HASH_IPV6",
           "NDIS_HASH_IPV6_EX", "NDIS_HASH_TCP_IPV4", "NDIS_HASH_TCP_IPV6", "NDIS_HASH_TCP_IPV6_EX", "RssConfig",
           "Toeplitz", "hash_input", "hash_types_text", "send_queue"]
