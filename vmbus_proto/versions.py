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


def version_text(v: int) -> str:
    return f"{v >> 16}.{v & 0xFFFF}"


# Linux drivers/hv/connection.c ``vmbus_versions[]``, newest first: WIN7 and WS2008 "are no longer supported
# in Linux guests and are not listed". The 2025 series ("Set default VMBus version to 6.0") puts 6.0 at its
# head and raises the ``max_version`` module parameter to it; before that ``max_version`` is 5.3.
LINUX_VERSIONS: tuple[Version, ...] = (
    Version.WIN10_V6_0, Version.WIN10_V5_3, Version.WIN10_V5_2, Version.WIN10_V5_1, Version.WIN10_V5,
    Version.WIN10_V4_1, Version.WIN10, Version.WIN8_1, Version.WIN8)
LINUX_MAX_VERSION = Version.WIN10_V5_3  # hv_vmbus.max_version on a current kernel without the 6.0 series


def guest_order(max_version: int = LINUX_MAX_VERSION) -> tuple[Version, ...]:
    """What ``vmbus_connect`` tries, in its order: every listed version not above ``max_version``."""
    order = tuple(v for v in LINUX_VERSIONS if v <= max_version)
    if not order:
        raise ValueError(f"no VMBus version a Linux guest lists is at most {version_text(max_version)}")
    return order


# What our guest tries by default: a current Linux guest's order, 5.3 down to 2.4.
GUEST_ORDER: tuple[Version, ...] = guest_order()
# What the host accepts by default: every version OpenVMM's server accepts.
HOST_SUPPORTED: frozenset[Version] = frozenset(Version)

# VMBus message connection ids (Linux drivers/hv/hyperv_vmbus.h).
VMBUS_MESSAGE_CONNECTION_ID = 1
VMBUS_MESSAGE_CONNECTION_ID_4 = 4
VMBUS_MESSAGE_SINT = 2


def parse_version(text: str) -> Version:
    """'5.3' or 'WIN10_V5_3' or '0x50003' -> Version."""
    t = text.strip()
    if t.upper() in Version.__members__:
        return Version[t.upper()]
    if "." in t:
        major, minor = t.split(".", 1)
        return Version((int(major) << 16) | int(minor))
    return Version(int(t, 0))
