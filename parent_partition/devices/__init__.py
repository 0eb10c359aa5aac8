"""The parent's half of every registered device (``vmbus_proto.devices.registry``), loaded by name."""

from __future__ import annotations

import functools

from vmbus_proto.devices.plugins import PluginError, check_plugin_spec, load_plugin
from vmbus_proto.devices.registry import REGISTRY, load

from ..vsp import Vsp


@functools.cache
def vsp_classes() -> dict[str, type[Vsp]]:
    """Each registered device's VSP class, by device name, in registry order."""
    out: dict[str, type[Vsp]] = {}
    for entry in REGISTRY:
        cls = load(entry.vsp)
        if not (isinstance(cls, type) and issubclass(cls, Vsp)) or cls.spec is not entry.spec:
            raise TypeError(f"registry: {entry.vsp} is not a VSP for the {entry.name} device")
        out[entry.name] = cls
    return out


def load_vsp_plugin(ref: str) -> type[Vsp]:
    """A device plug-in's VSP class (``[parent] device_plugins``): ``file.py:Class`` or ``module:Class``, a
    ``Vsp`` subclass with a ``spec`` whose name and class GUID no registered device has. PluginError if not."""
    cls = load_plugin(ref)
    if not (isinstance(cls, type) and issubclass(cls, Vsp)):
        raise PluginError(f"device plug-in {ref!r} is not a VSP class (a subclass of parent_partition.vsp.Vsp)")
    check_plugin_spec(ref, cls)
    return cls
