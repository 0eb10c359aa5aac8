"""VMBus protocol versions: ``(major << 16) | minor``, as negotiated by INITIATE_CONTACT.

Linux include/linux/hyperv.h (VERSION_WS2008 … VERSION_WIN10_V5_3) and drivers/hv/connection.c
``vmbus_versions[]``; OpenVMM vmbus_core/src/protocol.rs ``Version`` (adds Copper = 6.0).
"""

from __future__ import annotations

import enum


class Version(enum.IntEnum):
    WS2008 = 0x0000000D  # 0.13
    WIN7 = 0x00010001  # 1.1
    WIN8 = 0x00020004  # 2.4
    WIN8_1 = 0x00030000  # 3.0
    WIN10 = 0x00040000  # 4.0
    WIN10_V4_1 = 0x00040001  # 4.1 (RS3): MODIFYCHANNEL
    WIN10_V5 = 0x00050000  # 5.0: INITIATE_CONTACT to connection id 4, msg_conn_id in the response
    WIN10_V5_1 = 0x00050001  # 5.1
    WIN10_V5_2 = 0x00050002  # 5.2 (WS2019)
    WIN10_V5_3 = 0x00050003  # 5.3 (WS2022, "Iron"): MODIFYCHANNEL_RESPONSE
    WIN10_V6_0 = 0x00060000  # 6.0 ("Copper"): feature flags

    @property
    def text(self) -> str:
        return version_text(self.value)


# Newest first, as a guest tries them (the 2025 Linux series puts 6.0 ahead of 5.3).
GUEST_ORDER: tuple[Version, ...] = tuple(sorted(Version, reverse=True))
# What the host accepts by default: every version OpenVMM's server accepts.
HOST_SUPPORTED: frozenset[Version] = frozenset(Version)

# VMBus message connection ids (Linux drivers/hv/hyperv_vmbus.h).
VMBUS_MESSAGE_CONNECTION_ID = 1
VMBUS_MESSAGE_CONNECTION_ID_4 = 4
VMBUS_MESSAGE_SINT = 2


def version_text(v: int) -> str:
    return f"{v >> 16}.{v & 0xFFFF}"


def parse_version(text: str) -> Version:
    """'5.3' or 'WIN10_V5_3' or '0x50003' -> Version."""
    t = text.strip()
    if t.upper() in Version.__members__:
        return Version[t.upper()]
    if "." in t:
        major, minor = t.split(".", 1)
        return Version((int(major) << 16) | int(minor))
    return Version(int(t, 0))
