"""The diagnostic echo device's guest half (benchmarks only)."""

from __future__ import annotations

from vmbus_proto.devices.echo import protocol as echo

from ...vsc import Vsc


class EchoVsc(Vsc):
    """The diagnostic echo device's guest half (benchmarks only)."""

    spec = echo.SPEC
