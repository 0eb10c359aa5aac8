"""The device catalogue: every synthetic device class this emulator offers, keyed by its VMBus class GUID.

The order is the one a Hyper-V host offers a Linux guest's synthetic devices in our emulation: storage,
network, video, keyboard, mouse. Class GUIDs are Linux include/linux/hyperv.h ``HV_*_GUID`` (see
``vmbus_proto.guids``).
"""

from __future__ import annotations

import uuid

from .base import DeviceSpec
from .input import keyboard, mouse
from .network import nvsp as network
from .storage import vstor as storage
from .video import synthvid as video

__all__ = ["ALL", "BY_CLASS"]

ALL: tuple[DeviceSpec, ...] = (storage.SPEC, network.SPEC, video.SPEC, keyboard.SPEC, mouse.SPEC)

BY_CLASS: dict[uuid.UUID, DeviceSpec] = {spec.class_id: spec for spec in ALL}
