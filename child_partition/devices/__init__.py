"""The child's half of every registered device (``vmbus_proto.devices.registry``), loaded by name."""

from __future__ import annotations

import functools
import uuid

from vmbus_proto.devices.plugins import PluginError, check_plugin_spec, load_plugin
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


def load_vsc_plugin(ref: str) -> type[Vsc]:
    """A device plug-in's VSC class (``child-partition run --device-plugin``): ``file.py:Class`` or
    ``module:Class``, a ``Vsc`` subclass with a ``spec`` no registered device has. Its guest service, if it
    has one, runs like a built-in device's but cannot add options to the command line (they are parsed
    before plug-ins load). PluginError if not."""
    cls = load_plugin(ref)
    if not (isinstance(cls, type) and issubclass(cls, Vsc)):
        raise PluginError(f"device plug-in {ref!r} is not a VSC class (a subclass of child_partition.vsc.Vsc)")
    check_plugin_spec(ref, cls)
    if cls.Service is not None and _own_options(cls.Service):
        raise PluginError(f"device plug-in {ref!r}: its guest service {cls.Service.__name__} adds command-line "
                          "options, which a plug-in cannot")
    return cls


def _own_options(service: type[GuestService]) -> bool:
    """The service overrides ``GuestService.add_arguments``."""
    return any("add_arguments" in vars(k) for k in service.__mro__ if k is not GuestService)
