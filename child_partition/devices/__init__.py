"""The child's half of every registered device (``vmbus_proto.devices.registry``), loaded by name."""

from __future__ import annotations

import functools
import uuid

from vmbus_proto.devices.registry import REGISTRY, load

from ..vsc import GuestService, Vsc


@functools.cache
def vsc_classes() -> dict[uuid.UUID, type[Vsc]]:
    """The guest's drivers, by the class GUID they bind to (Linux's ``hv_vmbus_device_id`` tables)."""
    out: dict[uuid.UUID, type[Vsc]] = {}
    for entry in REGISTRY:
        cls = load(entry.vsc)
        if not (isinstance(cls, type) and issubclass(cls, Vsc)) or cls.spec is not entry.spec:
            raise TypeError(f"registry: {entry.vsc} is not a VSC for the {entry.name} device")
        out[entry.spec.class_id] = cls
    return out


def service_classes() -> list[type[GuestService]]:
    """Every guest service a driver names, once each, in registry order."""
    seen: dict[type[GuestService], None] = {}
    for cls in vsc_classes().values():
        if cls.Service is not None:
            seen[cls.Service] = None
    return list(seen)
