"""Every guest service a child partition runs: the devices' (what their drivers give the rest of the guest) and
the guest's own programs built on them (the console), in the order they start."""

from __future__ import annotations

from .console.service import ConsoleService
from .devices import service_classes
from .devices.storage.writes import DiskWriteService
from .vsc import GuestService


def guest_services() -> list[type[GuestService]]:
    """The devices' services in registry order, then the guest's programs that use them: the periodic disk
    writer (``--disk-writes``) and the console."""
    return [*service_classes(), DiskWriteService, ConsoleService]
