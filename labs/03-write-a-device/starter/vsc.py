"""Lab 3 (what you write): the timesync VSC, the guest half (Linux hv_util.c for ``HV_TS_GUID``).

The handshake is the IC NEGOTIATE (``timesync.VscHandshake``); then every TIMESYNC is answered in place and
what it says is reported: the host's time, and ``offset``, how far the host's clock is ahead of this guest's
(negative: behind). Linux keeps the same sample for its PTP clock (/dev/ptp*, which chrony reads) and steps
the clock on a SYNC; this guest logs it and keeps it in ``offset``. A message too short for its layout is
logged and dropped, and the channel goes on.
"""

# ruff: noqa: F401  (the imports are what your code will need)
from __future__ import annotations

from child_partition.vsc import HandshakeVsc
from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.base import Incoming

from . import timesync


class TimesyncVsc(HandshakeVsc):
    module = timesync
    offset: float | None = None  # host clock minus guest clock, seconds, from the last message

    async def run(self, channel: Channel) -> None:
        """After the handshake: answer every packet with ``self.hs.guest`` (send the answer back, if any),
        log each reason it dropped one as a warning ("timesync packet dropped"), and for each new sample
        set ``offset`` and log "time sync" or "time sample" with ``offset=`` in seconds."""
        raise NotImplementedError("TimesyncVsc.run")
