"""Lab 3 (what you write): the timesync VSP, the host half, offered to every child partition.

On each open channel it runs ``timesync.TimesyncHost``: the IC NEGOTIATE, a SYNC, then a SAMPLE every
``[timesync] interval`` seconds, each carrying the host's clock (``[timesync] offset`` seconds off the real
one, to play a host whose clock is wrong). This module only moves packets and reads the clock, as
``parent_partition.devices.heartbeat.vsp`` does for the heartbeat.
"""

# ruff: noqa: F401  (the imports are what your code will need)
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from parent_partition.settings import seconds, setting
from parent_partition.vsp import ChannelResources, HostContext, Vsp, incoming, send_all
from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.base import HandshakeTrace

from . import timesync


def _offset(v: object) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ValueError(f"must be a number of seconds, not {v!r}")
    return float(v)


@dataclass(slots=True)
class TimesyncSettings:
    """``[timesync]``: how often the host sends a sample, and how far its clock is from the real one."""

    interval: float = setting(5.0, check=seconds)  # OpenVMM: a sample every 5 seconds
    offset: float = setting(0.0, check=_offset)  # seconds added to the host's clock


class TimesyncVsp(Vsp):
    spec = timesync.SPEC
    Settings = TimesyncSettings

    def __init__(self, interval: float = 5.0, offset: float = 0.0) -> None:
        super().__init__()
        self.interval, self.offset = interval, offset

    @classmethod
    def create(cls, settings: TimesyncSettings, host: HostContext) -> TimesyncVsp:
        return cls(settings.interval, settings.offset)

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        """One open channel: run a TimesyncHost (its clock ``host_clock(self.offset)``) until the channel
        closes. Send what it returns; wait for a packet until its timer (``asyncio.timeout_at``); a timeout
        goes to ``handle_timer``, a packet to ``receive``. Log "device protocol negotiated" once it runs,
        and a line per answer ("time sync answered" / "time sample answered")."""
        raise NotImplementedError("TimesyncVsp.serve")
