"""The device registry: every synthetic device this emulator offers, one line each.

A line names the device's protocol spec (its offer: class GUID, instance, pipe mode; its ring sizes) and
where its two halves live: the VSP in ``parent_partition.devices.<dev>`` and the VSC in
``child_partition.devices.<dev>``. The halves are named, not imported, so this package stays below both
sides (imports point down only); each side loads its halves by name and checks their type
(``parent_partition.devices.load_vsps``, ``child_partition.devices.load_vscs``), as entry points would.

Adding a device is one subpackage per side (plus its protocol here) and one line below. The order is the
order of the configuration's ``[devices]`` table; the order offers go out in is OpenVMM's (by interface
GUID), not this one.
"""

from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass

from .base import DeviceSpec
from .echo import protocol as echo
from .heartbeat import protocol as heartbeat
from .input import keyboard, mouse
from .network import nvsp
from .storage import vstor
from .video import synthvid

__all__ = ["ALL", "BY_CLASS", "BY_NAME", "EMULATED", "REGISTRY", "DeviceEntry", "EmulatedEntry"]


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One device: its protocol spec, and its VSP and VSC as ``module:Class``."""

    spec: DeviceSpec
    vsp: str
    vsc: str
    enabled: bool = True  # offered unless the configuration's [devices] table says otherwise

    @property
    def name(self) -> str:
        return self.spec.name


_P, _C = "parent_partition.devices", "child_partition.devices"

REGISTRY: tuple[DeviceEntry, ...] = (
    DeviceEntry(vstor.SPEC, f"{_P}.storage.vsp:StorageVsp", f"{_C}.storage.vsc:StorageVsc"),
    DeviceEntry(nvsp.SPEC, f"{_P}.network.vsp:NetworkVsp", f"{_C}.network.vsc:NetworkVsc"),
    DeviceEntry(synthvid.SPEC, f"{_P}.video.vsp:VideoVsp", f"{_C}.video.vsc:VideoVsc"),
    DeviceEntry(keyboard.SPEC, f"{_P}.input.vsp:KeyboardVsp", f"{_C}.input.vsc:KeyboardVsc"),
    DeviceEntry(mouse.SPEC, f"{_P}.input.vsp:MouseVsp", f"{_C}.input.vsc:MouseVsc"),
    DeviceEntry(heartbeat.SPEC, f"{_P}.heartbeat.vsp:HeartbeatVsp", f"{_C}.heartbeat.vsc:HeartbeatVsc"),
    DeviceEntry(echo.SPEC, f"{_P}.echo.vsp:EchoVsp", f"{_C}.echo.vsc:EchoVsc", enabled=False),  # benchmarks
)

BY_NAME: dict[str, DeviceEntry] = {e.name: e for e in REGISTRY}
BY_CLASS: dict[uuid.UUID, DeviceEntry] = {e.spec.class_id: e for e in REGISTRY}
ALL: tuple[DeviceSpec, ...] = tuple(e.spec for e in REGISTRY if e.enabled)  # what a default parent offers


@dataclass(frozen=True, slots=True)
class EmulatedEntry:
    """A device that is not on VMBus: a register-level model the guest drives by trapped port I/O (the IOPORT
    frame, docs/protocol.md §13). ``device`` is the parent's model, ``driver`` the child's, as ``module:Class``."""

    name: str
    device: str
    driver: str
    enabled: bool = True


EMULATED: tuple[EmulatedEntry, ...] = (
    EmulatedEntry("ata", f"{_P}.ata.device:AtaDevice", f"{_C}.ata.driver:AtaDisk"),  # IDE on 0x1F0, lab 6
)


def load(path: str) -> object:
    """Import ``module:attribute`` (a registry line's VSP or VSC)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
