"""Named-pipe message mode: the 8-byte pipe header that video and mouse channels put before each payload.

OpenVMM vm/devices/vmbus/vmbus_ring/src/lib.rs ``pipe_protocol`` (PipeHeader {packet_type u32, len u32},
DATA = 1, PARTIAL = 2, max payload 16384); Linux drivers/video/fbdev/hyperv_fb.c and drivers/hid/hid-hyperv.c
fill ``pipe_hdr`` themselves. Keyboard, storage and network channels are raw: no pipe header.
"""

from __future__ import annotations

import struct

from .errors import DeviceProtocolError

PIPE_HEADER = struct.Struct("<II")
PIPE_DATA = 1
PIPE_PARTIAL = 2
PIPE_SETUP_GPA_DIRECT = 3
PIPE_TEARDOWN_GPA_DIRECT = 4
MAX_PIPE_PAYLOAD = 16384
PIPE_TYPE_BYTE = 0
PIPE_TYPE_MESSAGE = 4


def pipe_wrap(payload: bytes) -> bytes:
    if len(payload) > MAX_PIPE_PAYLOAD:
        raise DeviceProtocolError(f"pipe payload of {len(payload)} bytes exceeds {MAX_PIPE_PAYLOAD}")
    return PIPE_HEADER.pack(PIPE_DATA, len(payload)) + payload


def pipe_unwrap(packet: bytes) -> bytes:
    """The payload of a DATA pipe packet; anything else is a device protocol error."""
    if len(packet) < PIPE_HEADER.size:
        raise DeviceProtocolError(f"pipe packet of {len(packet)} bytes is shorter than its header")
    kind, size = PIPE_HEADER.unpack_from(packet)
    if kind != PIPE_DATA:
        raise DeviceProtocolError(f"pipe packet type {kind} is not DATA")
    if size > len(packet) - PIPE_HEADER.size or size > MAX_PIPE_PAYLOAD:
        raise DeviceProtocolError(f"pipe header says {size} bytes, packet has {len(packet) - PIPE_HEADER.size}")
    return packet[PIPE_HEADER.size:PIPE_HEADER.size + size]
