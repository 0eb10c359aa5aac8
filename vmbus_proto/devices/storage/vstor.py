"""VSTOR: the storage protocol between StorVSC (guest) and StorVSP (host) on a synthetic SCSI controller.

Mirrors Linux drivers/scsi/storvsc_drv.c (``struct vstor_packet``, ``struct vmscsi_request``,
``struct vmstorage_channel_properties``, ``struct vmstorage_protocol_version``, ``storvsc_channel_init``) and
OpenVMM vm/devices/storage/storvsp/src/protocol.rs and lib.rs (``process_primary``, ``parse_packet``,
``send_vmbus_packet``, ``convert_srb_status_to_nt_status``); SRB status codes from OpenVMM
vm/devices/storage/scsi_defs/src/srb.rs. The channel is raw (no pipe header). Every guest request is an
in-band packet with COMPLETION_REQUESTED; the host answers each with a VM_PKT_COMP that echoes its
transaction id and carries operation COMPLETE_IO. The SCSI carried inside EXECUTE_SRB is in ``scsi.py``.
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ... import guids
from ...errors import DeviceProtocolError, LocalProtocolError
from ...packets import FLAG_COMPLETION_REQUESTED, Packet, PacketType
from ...ring import vmbus_ring_size
from ..base import DeviceSpec, Handshake, Incoming, Outgoing, name_text

__all__ = [
    "CHANNEL_PROPERTIES_SIZE",
    "DEFAULT_MAX_TRANSFER_BYTES",
    "DEFAULT_SUPPORTED",
    "LINUX_VERSIONS",
    "MAX_CDB_LENGTH",
    "RECOGNIZED",
    "REQUEST_COMPLETION_FLAG",
    "SENSE_BUFFER_SIZE",
    "SPEC",
    "SRB_PACKET",
    "SRB_STATUS_AUTOSENSE_VALID",
    "SRB_STATUS_QUEUE_FROZEN",
    "VMBUS_RQST_INIT",
    "VMBUS_RQST_RESET",
    "VMSCSI_REQUEST_SIZE",
    "VMSCSI_REQUEST_SIZE_V1",
    "VSTOR_HEADER_SIZE",
    "VSTOR_PACKET_SIZE",
    "VSTOR_PACKET_SIZE_V1",
    "ChannelFlags",
    "ChannelProperties",
    "DataDirection",
    "ExecuteSrb",
    "NtStatus",
    "Operation",
    "ProtocolVersion",
    "SrbFlags",
    "SrbStatus",
    "Version",
    "VmscsiRequest",
    "VscHandshake",
    "VspHandshake",
    "VstorPacket",
    "completion_size",
    "describe",
    "pack_complete_io",
    "pack_completion",
    "pack_create_sub_channels",
    "pack_host_notification",
    "pack_request",
    "parse_create_sub_channels",
    "parse_request",
    "request_size",
    "srb_status_to_nt_status",
    "unpack_execute_srb",
    "version_text",
]


class Operation(enum.IntEnum):
    """``enum vstor_packet_operation`` (Linux); EVENT_NOTIFICATION is OpenVMM-only."""

    COMPLETE_IO = 1
    REMOVE_DEVICE = 2
    EXECUTE_SRB = 3
    RESET_LUN = 4
    RESET_ADAPTER = 5
    RESET_BUS = 6
    BEGIN_INITIALIZATION = 7
    END_INITIALIZATION = 8
    QUERY_PROTOCOL_VERSION = 9
    QUERY_PROPERTIES = 10
    ENUMERATE_BUS = 11
    FCHBA_DATA = 12
    CREATE_SUB_CHANNELS = 13
    EVENT_NOTIFICATION = 14


class Version(enum.IntEnum):
    """``VMSTOR_PROTO_VERSION(major, minor)`` = ``(major << 8) | minor`` in a u16."""

    WIN6 = 0x0200
    WIN7 = 0x0402
    WIN8 = 0x0501
    WIN8_1 = 0x0600  # "Blue"
    WIN10 = 0x0602  # "Threshold"


class NtStatus(enum.IntEnum):
    """The NTSTATUS values StorVSP puts in ``vstor_packet.status`` (OpenVMM protocol.rs ``NtStatus``)."""

    SUCCESS = 0x00000000
    BUFFER_OVERFLOW = 0x80000005
    DEVICE_BUSY = 0x80000011
    UNSUCCESSFUL = 0xC0000001
    INVALID_PARAMETER = 0xC000000D
    INVALID_DEVICE_REQUEST = 0xC0000010
    REVISION_MISMATCH = 0xC0000059
    DEVICE_NOT_CONNECTED = 0xC000009D
    IO_TIMEOUT = 0xC00000B5
    DEVICE_DOES_NOT_EXIST = 0xC00000C0
    CANCELLED = 0xC0000120
    INVALID_DEVICE_STATE = 0xC0000184
    IO_DEVICE_ERROR = 0xC0000185


class SrbStatus(enum.IntEnum):
    """``vmscsi_request.srb_status`` low six bits (OpenVMM srb.rs; INTERNAL_ERROR from Linux)."""

    PENDING = 0x00
    SUCCESS = 0x01
    ABORTED = 0x02
    ABORT_FAILED = 0x03
    ERROR = 0x04
    BUSY = 0x05
    INVALID_REQUEST = 0x06
    INVALID_PATH_ID = 0x07
    NO_DEVICE = 0x08
    TIMEOUT = 0x09
    SELECTION_TIMEOUT = 0x0A
    COMMAND_TIMEOUT = 0x0B
    MESSAGE_REJECTED = 0x0D
    BUS_RESET = 0x0E
    PARITY_ERROR = 0x0F
    REQUEST_SENSE_FAILED = 0x10
    NO_HBA = 0x11
    DATA_OVERRUN = 0x12
    UNEXPECTED_BUS_FREE = 0x13
    PHASE_SEQUENCE_FAILURE = 0x14
    BAD_SRB_BLOCK_LENGTH = 0x15
    REQUEST_FLUSHED = 0x16
    INVALID_LUN = 0x20
    INVALID_TARGET_ID = 0x21
    BAD_FUNCTION = 0x22
    ERROR_RECOVERY = 0x23
    NOT_POWERED = 0x24
    LINK_DOWN = 0x25
    INTERNAL_ERROR = 0x30


SRB_STATUS_QUEUE_FROZEN = 0x40
SRB_STATUS_AUTOSENSE_VALID = 0x80


class SrbFlags(enum.IntFlag):
    """``vmscsi_request.srb_flags`` bits a Linux guest sets (storvsc_drv.c ``SRB_FLAGS_*``)."""

    QUEUE_ACTION_ENABLE = 0x00000002
    DISABLE_DISCONNECT = 0x00000004
    DISABLE_SYNCH_TRANSFER = 0x00000008
    BYPASS_FROZEN_QUEUE = 0x00000010
    DISABLE_AUTOSENSE = 0x00000020
    DATA_IN = 0x00000040
    DATA_OUT = 0x00000080
    NO_QUEUE_FREEZE = 0x00000100


class DataDirection(enum.IntEnum):
    """``vmscsi_request.data_in`` (Linux ``enum storvsc_request_type``)."""

    WRITE = 0
    READ = 1
    UNKNOWN = 2


class ChannelFlags(enum.IntFlag):
    """``vmstorage_channel_properties.flags``."""

    SUPPORTS_MULTI_CHANNEL = 0x1


REQUEST_COMPLETION_FLAG = 0x1  # vstor_packet.flags; the guest always sets it
VMBUS_RQST_INIT = (1 << 64) - 3  # Linux hyperv.h U64_MAX - 2: the trans_id of storvsc's init requests
VMBUS_RQST_RESET = (1 << 64) - 4  # U64_MAX - 3: its RESET_BUS
VSTOR_HEADER_SIZE = 12  # operation, flags, status
VSTOR_PACKET_SIZE = 64  # sizeof(struct vstor_packet) for >= WIN8
VSTOR_PACKET_SIZE_V1 = 48  # before WIN8
VMSCSI_REQUEST_SIZE = 52  # SCSI_REQUEST_LEN_V2, also the union size
VMSCSI_REQUEST_SIZE_V1 = 36  # SCSI_REQUEST_LEN_V1
CHANNEL_PROPERTIES_SIZE = 24
SENSE_BUFFER_SIZE = 0x14
MAX_CDB_LENGTH = 0x10

LINUX_VERSIONS: tuple[int, ...] = (Version.WIN10, Version.WIN8_1, Version.WIN8)  # storvsc protocol_version[]
# OpenVMM accepts WIN6..WIN8_1 only; we also accept WIN10 so a Linux guest settles on 0x0602.
DEFAULT_SUPPORTED: frozenset[int] = frozenset(Version)
DEFAULT_MAX_TRANSFER_BYTES = 0x40000  # 256 KiB, as OpenVMM advertises

_HEADER = struct.Struct("<III")
_VERSION = struct.Struct("<HH")
_PROPERTIES = struct.Struct("<IHHIIQ")
_SRB = struct.Struct("<HBBBBBBBBBBI20sHBBIII")
_SRB_V1 = struct.Struct("<HBBBBBBBBBBI20s")
_SUB_CHANNELS = struct.Struct("<H")


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise DeviceProtocolError(f"{what}: {len(data)} bytes, need {size}")


@dataclass(frozen=True, slots=True)
class VstorPacket:
    """``struct vstor_packet``: the 12-byte header and the (up to 52-byte) union after it."""

    operation: int
    flags: int = 0
    status: int = 0
    body: bytes = b""

    def pack(self, size: int = VSTOR_PACKET_SIZE) -> bytes:
        """Exactly ``size`` bytes: the body zero-padded or truncated, as OpenVMM ``send_vmbus_packet`` does."""
        if size < VSTOR_HEADER_SIZE:
            raise LocalProtocolError(f"vstor packet size {size} is below the 12-byte header")
        body = self.body[:size - VSTOR_HEADER_SIZE]
        return (_HEADER.pack(self.operation, self.flags, self.status) + body
                + bytes(size - VSTOR_HEADER_SIZE - len(body)))

    @classmethod
    def unpack(cls, data: bytes) -> VstorPacket:
        _need(data, VSTOR_HEADER_SIZE, "vstor_packet")
        operation, flags, status = _HEADER.unpack_from(data)
        return cls(operation, flags, status, bytes(data[VSTOR_HEADER_SIZE:VSTOR_HEADER_SIZE + VMSCSI_REQUEST_SIZE]))


@dataclass(frozen=True, slots=True)
class ProtocolVersion:
    """``struct vmstorage_protocol_version`` (QUERY_PROTOCOL_VERSION request and completion)."""

    major_minor: int
    revision: int = 0  # Linux sets 0; OpenVMM echoes 0

    def pack(self) -> bytes:
        return _VERSION.pack(self.major_minor, self.revision)

    @classmethod
    def unpack(cls, body: bytes) -> ProtocolVersion:
        _need(body, _VERSION.size, "vmstorage_protocol_version")
        return cls(*_VERSION.unpack_from(body))


@dataclass(frozen=True, slots=True)
class ChannelProperties:
    """``struct vmstorage_channel_properties`` (24 bytes, QUERY_PROPERTIES completion)."""

    max_channel_cnt: int = 0  # maximum number of sub-channels
    flags: int = 0
    max_transfer_bytes: int = 0

    def pack(self) -> bytes:
        return _PROPERTIES.pack(0, self.max_channel_cnt, 0, self.flags, self.max_transfer_bytes, 0)

    @classmethod
    def unpack(cls, body: bytes) -> ChannelProperties:
        _need(body, CHANNEL_PROPERTIES_SIZE, "vmstorage_channel_properties")
        _, max_channel_cnt, _, flags, max_transfer_bytes, _ = _PROPERTIES.unpack_from(body)
        return cls(max_channel_cnt, flags, max_transfer_bytes)


@dataclass(frozen=True, slots=True)
class VmscsiRequest:
    """``struct vmscsi_request`` (52 bytes; the WIN8 extension starts at offset 36).

    ``data`` is the 20-byte union at offset 16: the CDB in a request, the sense data in a completion.
    """

    length: int = VMSCSI_REQUEST_SIZE
    srb_status: int = 0
    scsi_status: int = 0
    port_number: int = 0
    path_id: int = 0
    target_id: int = 0
    lun: int = 0
    cdb_length: int = 0
    sense_info_length: int = SENSE_BUFFER_SIZE
    data_in: int = DataDirection.UNKNOWN
    reserved: int = 0
    data_transfer_length: int = 0
    data: bytes = b""
    reserve: int = 0
    queue_tag: int = 0
    queue_action: int = 0
    srb_flags: int = 0
    time_out_value: int = 0
    queue_sort_key: int = 0

    @property
    def cdb(self) -> bytes:
        return self.data[:min(self.cdb_length, MAX_CDB_LENGTH)]

    @property
    def sense_data(self) -> bytes:
        return self.data[:min(self.sense_info_length, SENSE_BUFFER_SIZE)]

    def pack(self) -> bytes:
        if len(self.data) > SENSE_BUFFER_SIZE:
            raise LocalProtocolError(f"vmscsi_request data of {len(self.data)} bytes exceeds 20")
        return _SRB.pack(self.length, self.srb_status, self.scsi_status, self.port_number, self.path_id,
                         self.target_id, self.lun, self.cdb_length, self.sense_info_length, self.data_in,
                         self.reserved, self.data_transfer_length, self.data, self.reserve, self.queue_tag,
                         self.queue_action, self.srb_flags, self.time_out_value, self.queue_sort_key)

    @classmethod
    def unpack(cls, body: bytes) -> VmscsiRequest:
        """At least the 36-byte pre-WIN8 request; a missing WIN8 extension reads as zeros (as OpenVMM)."""
        _need(body, VMSCSI_REQUEST_SIZE_V1, "vmscsi_request")
        if len(body) < VMSCSI_REQUEST_SIZE:
            body = bytes(body[:VMSCSI_REQUEST_SIZE_V1]) + bytes(VMSCSI_REQUEST_SIZE - VMSCSI_REQUEST_SIZE_V1)
        return cls(*_SRB.unpack_from(body))


def srb_status_to_nt_status(srb_status: int) -> NtStatus:
    """OpenVMM ``convert_srb_status_to_nt_status`` (flag bits 0x80/0x40 ignored)."""
    code = srb_status & ~(SRB_STATUS_AUTOSENSE_VALID | SRB_STATUS_QUEUE_FROZEN)
    return _SRB_TO_NT.get(code, NtStatus.IO_DEVICE_ERROR)


_SRB_TO_NT: dict[int, NtStatus] = {
    SrbStatus.BUSY: NtStatus.DEVICE_BUSY,
    SrbStatus.SUCCESS: NtStatus.SUCCESS,
    SrbStatus.INVALID_LUN: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.INVALID_TARGET_ID: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.NO_DEVICE: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.NO_HBA: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.COMMAND_TIMEOUT: NtStatus.IO_TIMEOUT,
    SrbStatus.TIMEOUT: NtStatus.IO_TIMEOUT,
    SrbStatus.SELECTION_TIMEOUT: NtStatus.DEVICE_NOT_CONNECTED,
    SrbStatus.BAD_FUNCTION: NtStatus.INVALID_DEVICE_REQUEST,
    SrbStatus.BAD_SRB_BLOCK_LENGTH: NtStatus.INVALID_DEVICE_REQUEST,
    SrbStatus.DATA_OVERRUN: NtStatus.BUFFER_OVERFLOW,
    SrbStatus.REQUEST_FLUSHED: NtStatus.UNSUCCESSFUL,
    SrbStatus.ABORTED: NtStatus.CANCELLED,
}


def pack_request(operation: int, body: bytes = b"", size: int = VSTOR_PACKET_SIZE) -> bytes:
    """A guest request: ``flags = REQUEST_COMPLETION_FLAG``, status 0, padded to ``size``."""
    return VstorPacket(operation, REQUEST_COMPLETION_FLAG, 0, body).pack(size)


def completion_size(request_payload_len: int) -> int:
    """OpenVMM's completion size: 12 + min(request bytes after the header, 52), i.e. 64 for a 64-byte request."""
    return VSTOR_HEADER_SIZE + max(0, min(request_payload_len - VSTOR_HEADER_SIZE, VMSCSI_REQUEST_SIZE))


def pack_completion(status: int, body: bytes = b"", request_payload_len: int = VSTOR_PACKET_SIZE) -> bytes:
    """A COMPLETE_IO payload (flags 0) sized for the request it answers."""
    return VstorPacket(Operation.COMPLETE_IO, 0, status, body).pack(completion_size(request_payload_len))


# ---- the I/O path: EXECUTE_SRB and its COMPLETE_IO, one struct each ---------------------------------------

# A whole vstor_packet carrying a vmscsi_request: operation, flags, status, then length, srb_status,
# scsi_status, port_number, path_id, target_id, lun, cdb_length, sense_info_length, data_in, reserved,
# data_transfer_length, the 20-byte cdb/sense union, and the WIN8 extension (reserve, queue_tag,
# queue_action, srb_flags, time_out_value, queue_sort_key). 64 bytes: both directions of every I/O.
SRB_PACKET = struct.Struct("<III" "HBBBBBBBBBBI20sHBBIII")


class ExecuteSrb(NamedTuple):
    """One EXECUTE_SRB as the host reads it: the ``vstor_packet`` header and its ``vmscsi_request``."""

    operation: int
    flags: int
    status: int
    length: int
    srb_status: int
    scsi_status: int
    port_number: int
    path_id: int
    target_id: int
    lun: int
    cdb_length: int
    sense_info_length: int
    data_in: int
    reserved: int
    data_transfer_length: int
    data: bytes  # the CDB, zero-padded to 20 bytes
    reserve: int
    queue_tag: int
    queue_action: int
    srb_flags: int
    time_out_value: int
    queue_sort_key: int

    @property
    def cdb(self) -> bytes:
        return self.data[:min(self.cdb_length, MAX_CDB_LENGTH)]


_V1_PAYLOAD = VSTOR_HEADER_SIZE + VMSCSI_REQUEST_SIZE_V1


def unpack_execute_srb(payload: bytes) -> ExecuteSrb:
    """A request payload as ``ExecuteSrb``; a pre-WIN8 request (no extension) reads it as zeros."""
    if len(payload) < VSTOR_PACKET_SIZE:
        _need(payload, _V1_PAYLOAD, "vmscsi_request")
        payload = bytes(payload[:_V1_PAYLOAD]) + bytes(VSTOR_PACKET_SIZE - _V1_PAYLOAD)
    return ExecuteSrb._make(SRB_PACKET.unpack_from(payload))


_COMPLETE_IO = int(Operation.COMPLETE_IO)
_PACK_SRB = SRB_PACKET.pack


def pack_complete_io(srb_status: int, scsi_status: int, transferred: int, sense: bytes = b"",
                     request_payload_len: int = VSTOR_PACKET_SIZE) -> bytes:
    """The COMPLETE_IO of one EXECUTE_SRB as OpenVMM ``handle_completion`` builds it: a fresh vmscsi_request
    (``length`` 52, ``cdb_length`` 16, ``sense_info_ex_length`` 0x14, everything else zero) with the SRB and
    SCSI status, the bytes moved and the sense in the 20-byte union (AUTOSENSE_VALID is the caller's, set
    with the sense); the NTSTATUS in the header; sized like the request (``send_vmbus_packet``)."""
    out = _PACK_SRB(_COMPLETE_IO, 0, _SRB_TO_NT_GET(srb_status & _STATUS_MASK, _IO_DEVICE_ERROR),
                    VMSCSI_REQUEST_SIZE, srb_status, scsi_status, 0, 0, 0, 0, MAX_CDB_LENGTH, SENSE_BUFFER_SIZE,
                    0, 0, transferred, sense[:SENSE_BUFFER_SIZE], 0, 0, 0, 0, 0, 0)
    return out if request_payload_len >= VSTOR_PACKET_SIZE else out[:completion_size(request_payload_len)]


_SRB_TO_NT_GET = _SRB_TO_NT.get
_STATUS_MASK = ~(SRB_STATUS_AUTOSENSE_VALID | SRB_STATUS_QUEUE_FROZEN) & 0xFF
_IO_DEVICE_ERROR = NtStatus.IO_DEVICE_ERROR


def pack_host_notification(operation: int, request_size: int = VSTOR_PACKET_SIZE) -> bytes:
    """An unsolicited host message (ENUMERATE_BUS, REMOVE_DEVICE): in-band with trans_id 0 and no completion
    wanted, flags 0, status SUCCESS, padded to the negotiated request size (OpenVMM ``send_packet``)."""
    return VstorPacket(operation, 0, NtStatus.SUCCESS).pack(request_size)


def request_size(version: int | None) -> int:
    """The ``vstor_packet`` size of a protocol version: 64 bytes from WIN8 on, 48 before (``max_request_size``)."""
    return VSTOR_PACKET_SIZE if version is None or version >= Version.WIN8 else VSTOR_PACKET_SIZE_V1


def pack_create_sub_channels(count: int) -> bytes:
    """The body of a CREATE_SUB_CHANNELS: ``sub_channel_count u16`` (Linux ``handle_multichannel_storage``)."""
    return _SUB_CHANNELS.pack(count)


def parse_create_sub_channels(body: bytes) -> int:
    """The ``sub_channel_count u16`` of a CREATE_SUB_CHANNELS (operation 13)."""
    _need(body, _SUB_CHANNELS.size, "CREATE_SUB_CHANNELS")
    count: int = _SUB_CHANNELS.unpack_from(body)[0]
    return count


# Operations OpenVMM's parse_packet understands; anything else is fatal to the channel (the worker stops on
# PacketError::UnrecognizedOperation, whatever the state; here the connection is closed).
RECOGNIZED: frozenset[int] = frozenset({
    Operation.BEGIN_INITIALIZATION, Operation.END_INITIALIZATION, Operation.QUERY_PROTOCOL_VERSION,
    Operation.QUERY_PROPERTIES, Operation.EXECUTE_SRB, Operation.RESET_LUN, Operation.RESET_ADAPTER,
    Operation.RESET_BUS, Operation.CREATE_SUB_CHANNELS,
})

_COMP = int(PacketType.COMP)
_EXECUTE_SRB = int(Operation.EXECUTE_SRB)
_WRITE = int(DataDirection.WRITE)
_SRB_SIZE, _SRB_UNPACK = SRB_PACKET.size, SRB_PACKET.unpack_from


def parse_request(pkt: Packet, in_memory: bool = False) -> tuple[int, ExecuteSrb | None]:
    """Validate one guest packet after initialization the way OpenVMM ``parse_packet`` and ``Range::new`` do;
    raise ``DeviceProtocolError`` on a protocol violation (the channel's connection is then closed).
    Returns the operation and, for EXECUTE_SRB, the request. The host's per-I/O hot path: one call.
    ``in_memory``: the request's data is in guest memory the host maps, not in the packet (shared memory)."""
    if pkt.type == _COMP:
        raise DeviceProtocolError("unsolicited completion on the storage channel")
    if not pkt.flags & FLAG_COMPLETION_REQUESTED:
        raise DeviceProtocolError("storage request without COMPLETION_REQUESTED")
    payload = pkt.payload
    srb: ExecuteSrb | None
    if len(payload) >= _SRB_SIZE:  # the usual whole vstor_packet: read it all in one go
        srb = ExecuteSrb._make(_SRB_UNPACK(payload))
        op = srb.operation
    else:
        op, srb = VstorPacket.unpack(payload).operation, None
    if op != _EXECUTE_SRB:
        if op not in RECOGNIZED:
            raise DeviceProtocolError(f"unrecognized VSTOR operation {op}")
        if pkt.ranges or pkt.data:
            raise DeviceProtocolError(f"vstor operation {op} carries a data buffer")
        return op, None
    if srb is None:
        srb = unpack_execute_srb(payload)
    if srb.cdb_length > MAX_CDB_LENGTH or srb.cdb_length == 0:
        raise DeviceProtocolError(f"EXECUTE_SRB with cdb_length {srb.cdb_length}")
    want = srb.data_transfer_length
    ranges = pkt.ranges
    if len(ranges) > 1:
        raise DeviceProtocolError(f"EXECUTE_SRB with {len(ranges)} GPA ranges (at most 1)")
    have = ranges[0].byte_count if ranges else 0
    if want and have < want:
        raise DeviceProtocolError(f"EXECUTE_SRB for {want} bytes with a {have}-byte buffer")
    if in_memory:
        pass  # the data is in the guest's pages (shared memory), not in the packet
    elif srb.data_in == _WRITE:
        if want and len(pkt.data) != want:
            raise DeviceProtocolError(f"WRITE of {want} bytes carried {len(pkt.data)} bytes of data")
    elif pkt.data:
        raise DeviceProtocolError("data sent to the host with a request that does not write")
    return op, srb


def version_text(version: int) -> str:
    """``VMSTOR_PROTO_VERSION(major, minor)`` as people write it: 0x0602 -> "6.2"."""
    return f"{version >> 8 & 0xFF}.{version & 0xFF}"


def _status_text(status: int) -> str:
    try:
        return f"STATUS_{NtStatus(status).name}({status:#010x})"
    except ValueError:
        return f"{status:#010x}"


_OP = "VSTOR_OPERATION_"


def describe(payload: bytes, packet_type: int = PacketType.DATA_INBAND, request: bytes | None = None) -> str:
    """One ``--trace`` line for a VSTOR packet (a completion is read next to the ``request`` it answers)."""
    msg = VstorPacket.unpack(payload)
    text = name_text(_OP, Operation, msg.operation)
    if msg.operation == Operation.QUERY_PROTOCOL_VERSION:
        return f"{text} version={version_text(ProtocolVersion.unpack(msg.body).major_minor)}"
    if msg.operation == Operation.EXECUTE_SRB:
        srb = VmscsiRequest.unpack(msg.body)
        return f"{text} lun={srb.lun} cdb={srb.cdb.hex()} data_transfer_length={srb.data_transfer_length}"
    if msg.operation == Operation.CREATE_SUB_CHANNELS:
        return f"{text} count={parse_create_sub_channels(msg.body)}"
    if msg.operation != Operation.COMPLETE_IO:
        return text
    text += f" status={_status_text(msg.status)}"
    if request is None or len(request) < VSTOR_HEADER_SIZE:
        return text
    asked = VstorPacket.unpack(request).operation
    text += " for " + name_text("", Operation, asked)
    if asked == Operation.QUERY_PROTOCOL_VERSION:
        text += f" version={version_text(ProtocolVersion.unpack(msg.body).major_minor)}"
    elif asked == Operation.QUERY_PROPERTIES and msg.status == NtStatus.SUCCESS:
        props = ChannelProperties.unpack(msg.body)
        text += (f" max_channel_cnt={props.max_channel_cnt} flags={props.flags:#x}"
                 f" max_transfer_bytes={props.max_transfer_bytes}")
    return text


# Our fixed instance id (OpenVMM derives a SCSI controller's instance id from its configuration).
_INSTANCE = uuid.UUID("5250ce2e-32b7-4d3b-8d3f-06ff771a11de")

SPEC = DeviceSpec(
    name="storage",
    class_id=guids.SCSI,
    default_instance=_INSTANCE,
    pipe_mode=False,
    mmio_megabytes=0,
    ring_bytes=vmbus_ring_size(128 * 1024),  # VMBUS_RING_SIZE(storvsc_ringbuffer_size = 128 KiB): 32 pages
    max_packet=16 + VSTOR_PACKET_SIZE,  # STORVSC_MAX_PKT_SIZE = descriptor + sizeof(vstor_packet)
    protocol="VSTOR",
    version_text=version_text,
    title="storage: the VSTOR handshake",
    explain=(
        "StorVSC and StorVSP agree on VSTOR: BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION newest first (a "
        "refusal is REVISION_MISMATCH and the guest tries older), QUERY_PROPERTIES (sub-channels, the largest "
        "transfer), END_INITIALIZATION. Each request asks for a completion and gets a COMPLETE_IO. Then the "
        "guest scans the SCSI target (REPORT LUNS, INQUIRY, READ CAPACITY) and has a disk."),
)


class _VscStep(enum.Enum):
    IDLE = "idle"
    BEGIN = "begin_initialization"
    QUERY_VERSION = "query_protocol_version"
    QUERY_PROPERTIES = "query_properties"
    END = "end_initialization"
    DONE = "done"


class VscHandshake(Handshake):
    """StorVSC ``storvsc_channel_init``: BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION per candidate,
    QUERY_PROPERTIES, END_INITIALIZATION; each waits for its COMPLETE_IO completion.

    Every one goes with trans_id ``VMBUS_RQST_INIT`` (Linux ``storvsc_execute_vstor_op``: the requests are
    one at a time, and the completion is matched to the channel's single init request by that id).
    """

    def __init__(self, versions: Sequence[int] = LINUX_VERSIONS) -> None:
        if not versions:
            raise LocalProtocolError("a VSC needs at least one VSTOR version to offer")
        self.versions: tuple[int, ...] = tuple(int(v) for v in versions)
        self.negotiated_version = None
        self.max_channel_cnt = 0
        self.flags = 0
        self.max_transfer_bytes = 0
        self._step = _VscStep.IDLE
        self._index = 0
        self._pending: int | None = None
        self._failed: str | None = None

    @property
    def done(self) -> bool:
        return self._step is _VscStep.DONE

    @property
    def failed(self) -> str | None:
        return self._failed

    @property
    def supports_multi_channel(self) -> bool:
        return bool(self.flags & ChannelFlags.SUPPORTS_MULTI_CHANNEL)

    def start(self) -> list[Outgoing]:
        if self._step is not _VscStep.IDLE:
            raise LocalProtocolError("VSTOR handshake already started")
        self._step = _VscStep.BEGIN
        return [self._request(Operation.BEGIN_INITIALIZATION)]

    def _request(self, operation: Operation, body: bytes = b"") -> Outgoing:
        self._pending = VMBUS_RQST_INIT
        return Outgoing(pack_request(operation, body), PacketType.DATA_INBAND, VMBUS_RQST_INIT, True)

    def _fail(self, why: str) -> list[Outgoing]:
        self._failed = why
        self._pending = None
        return []

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if self._failed is not None:
            return []
        if self._step is _VscStep.DONE:
            raise DeviceProtocolError("VSTOR handshake is over: this packet belongs to the I/O path")
        if self._step is _VscStep.IDLE:
            raise DeviceProtocolError("VSTOR packet before BEGIN_INITIALIZATION was sent")
        if packet.type != PacketType.COMP:
            msg = VstorPacket.unpack(packet.payload)
            if (packet.type == PacketType.DATA_INBAND and packet.trans_id == 0
                    and msg.operation in (Operation.ENUMERATE_BUS, Operation.REMOVE_DEVICE)):
                return []  # unsolicited rescan request: nothing to scan yet
            raise DeviceProtocolError(
                f"unexpected VSTOR packet type {packet.type:#x} operation {msg.operation} during initialization")
        if packet.trans_id != self._pending:
            raise DeviceProtocolError(f"VSTOR completion for unknown transaction id {packet.trans_id}")
        if len(packet.payload) < VSTOR_PACKET_SIZE:
            raise DeviceProtocolError(
                f"VSTOR completion of {len(packet.payload)} bytes is shorter than vstor_packet (64)")
        msg = VstorPacket.unpack(packet.payload)
        if msg.operation != Operation.COMPLETE_IO:
            raise DeviceProtocolError(f"VSTOR completion with operation {msg.operation}, not COMPLETE_IO")
        self._pending = None
        return self._advance(msg)

    def _advance(self, msg: VstorPacket) -> list[Outgoing]:
        step = self._step
        if step is _VscStep.QUERY_VERSION:
            if msg.status == NtStatus.SUCCESS:
                self.negotiated_version = self.versions[self._index]
                self._step = _VscStep.QUERY_PROPERTIES
                return [self._request(Operation.QUERY_PROPERTIES)]
            self._index += 1
            if self._index < len(self.versions):
                return [self._query_version()]
            offered = ", ".join(version_text(v) for v in self.versions)
            return self._fail(f"host refused every VSTOR protocol version ({offered}); "
                              f"last status {msg.status:#010x}")
        if msg.status != NtStatus.SUCCESS:
            return self._fail(f"VSTOR {step.value} failed with status {msg.status:#010x}")
        if step is _VscStep.BEGIN:
            self._step = _VscStep.QUERY_VERSION
            return [self._query_version()]
        if step is _VscStep.QUERY_PROPERTIES:
            props = ChannelProperties.unpack(msg.body)
            self.max_channel_cnt = props.max_channel_cnt
            self.flags = props.flags
            self.max_transfer_bytes = props.max_transfer_bytes
            self._step = _VscStep.END
            return [self._request(Operation.END_INITIALIZATION)]
        self._step = _VscStep.DONE
        return []

    def _query_version(self) -> Outgoing:
        version = ProtocolVersion(self.versions[self._index])
        return self._request(Operation.QUERY_PROTOCOL_VERSION, version.pack())


class _VspState(enum.Enum):
    BEGIN = "begin"
    QUERY_VERSION = "query_version"
    QUERY_PROPERTIES = "query_properties"
    END_INITIALIZATION = "end_initialization"
    READY = "ready"


class VspHandshake(Handshake):
    """StorVSP's primary-channel state machine (OpenVMM ``process_primary``):
    Begin -> QueryVersion -> QueryProperties -> EndInitialization -> Ready.

    A packet out of order is completed with INVALID_DEVICE_STATE; an unsupported version with
    REVISION_MISMATCH (staying in QueryVersion); an unrecognized operation is a protocol error. From WIN8 on
    QUERY_PROPERTIES says SUPPORTS_MULTI_CHANNEL with ``max_channel_cnt`` (which may be 0), as OpenVMM does.
    CREATE_SUB_CHANNELS (see :meth:`create_sub_channels`) is taken once before END_INITIALIZATION on a
    multi-channel version, and again on the primary channel once Ready.
    """

    def __init__(self, supported: Iterable[int] = DEFAULT_SUPPORTED, *, max_channel_cnt: int = 0,
                 max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> None:
        self.supported: frozenset[int] = frozenset(int(v) for v in supported)
        self.max_channel_cnt = max_channel_cnt
        self.max_transfer_bytes = max_transfer_bytes
        self.negotiated_version = None
        self.multi_channel = False
        self.sub_channel_count: int | None = None
        self._state = _VspState.BEGIN

    @property
    def done(self) -> bool:
        return self._state is _VspState.READY

    def start(self) -> list[Outgoing]:
        return []

    def create_sub_channels(self, count: int) -> NtStatus:
        """A CREATE_SUB_CHANNELS for ``count`` sub-channels (OpenVMM ``enable_subchannels``): more than the
        ``max_channel_cnt`` announced is refused with INVALID_PARAMETER; otherwise ``sub_channel_count`` is
        set (the caller then offers that many) and the answer is SUCCESS."""
        if count > self.max_channel_cnt:
            return NtStatus.INVALID_PARAMETER
        self.sub_channel_count = count
        return NtStatus.SUCCESS

    def receive(self, packet: Incoming) -> list[Outgoing]:
        if self._state is _VspState.READY:
            raise DeviceProtocolError("VSTOR handshake is over: this packet belongs to the I/O path")
        if packet.type == PacketType.COMP:
            raise DeviceProtocolError("StorVSP got a completion packet")
        if packet.type not in (PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT):
            raise DeviceProtocolError(f"StorVSP got packet type {packet.type:#x}")
        if not packet.completion_requested:
            raise DeviceProtocolError("VSTOR request without COMPLETION_REQUESTED (not transactional)")
        msg = VstorPacket.unpack(packet.payload)
        if msg.operation not in RECOGNIZED:
            raise DeviceProtocolError(f"unrecognized VSTOR operation {msg.operation}")
        status, body = self._step(Operation(msg.operation), msg.body)
        return [Outgoing(pack_completion(status, body, len(packet.payload)), PacketType.COMP, packet.trans_id)]

    def _step(self, op: Operation, body: bytes) -> tuple[int, bytes]:
        # Payloads are parsed whatever the state, as OpenVMM parse_packet does before its state check.
        requested = ProtocolVersion.unpack(body).major_minor if op is Operation.QUERY_PROTOCOL_VERSION else None
        count = parse_create_sub_channels(body) if op is Operation.CREATE_SUB_CHANNELS else None
        state = self._state
        if state is _VspState.BEGIN and op is Operation.BEGIN_INITIALIZATION:
            self._state = _VspState.QUERY_VERSION
            return NtStatus.SUCCESS, b""
        if state is _VspState.QUERY_VERSION and requested is not None:
            echo = ProtocolVersion(requested).pack()
            if requested not in self.supported:
                return NtStatus.REVISION_MISMATCH, echo
            self.negotiated_version = requested
            self.multi_channel = requested >= Version.WIN8
            self._state = _VspState.QUERY_PROPERTIES
            return NtStatus.SUCCESS, echo
        if state is _VspState.QUERY_PROPERTIES and op is Operation.QUERY_PROPERTIES:
            props = ChannelProperties(
                max_channel_cnt=self.max_channel_cnt if self.multi_channel else 0,
                flags=ChannelFlags.SUPPORTS_MULTI_CHANNEL if self.multi_channel else 0,
                max_transfer_bytes=self.max_transfer_bytes)
            self._state = _VspState.END_INITIALIZATION
            if not self.multi_channel:
                self.sub_channel_count = 0  # OpenVMM: Some(0), so CREATE_SUB_CHANNELS is out of order
            return NtStatus.SUCCESS, props.pack()
        if state is _VspState.END_INITIALIZATION:
            if op is Operation.END_INITIALIZATION:
                self._state = _VspState.READY
                return NtStatus.SUCCESS, b""
            if count is not None and self.sub_channel_count is None:
                return self.create_sub_channels(count), b""
        return NtStatus.INVALID_DEVICE_STATE, b""
