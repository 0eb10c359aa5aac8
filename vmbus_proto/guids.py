"""Device class and instance GUIDs as carried in OFFERCHANNEL's if_type / if_instance.

Linux include/linux/hyperv.h (HV_*_GUID), OpenVMM vm/devices/*/src (offer()). GUIDs go on the real wire in
Microsoft mixed-endian layout (``uuid.UUID.bytes_le``); our msgpack envelope carries them as those 16 bytes.
"""

from __future__ import annotations

import uuid

# Device classes (if_type).
SCSI = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")
IDE = uuid.UUID("32412632-86cb-44a2-9b5c-50d1417354f5")
NETWORK = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
SYNTHVID = uuid.UUID("da0a7802-e377-4aac-8e77-0558eb1073f8")
SYNTHHID_MOUSE = uuid.UUID("cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a")
SYNTH_KEYBOARD = uuid.UUID("f912ad6d-2b17-48ea-bd65-f927a61c7684")
HEARTBEAT = uuid.UUID("57164f39-9115-4e78-ab55-382f3bd5422d")  # HV_HEART_BEAT_GUID (hv_util)

CLASS_NAMES: dict[uuid.UUID, str] = {
    SCSI: "storage",
    IDE: "ide",
    NETWORK: "network",
    SYNTHVID: "video",
    SYNTHHID_MOUSE: "mouse",
    SYNTH_KEYBOARD: "keyboard",
    HEARTBEAT: "heartbeat",
}


def to_wire(guid: uuid.UUID) -> bytes:
    """The 16 mixed-endian bytes Hyper-V puts on the wire."""
    return guid.bytes_le


def from_wire(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=raw)
