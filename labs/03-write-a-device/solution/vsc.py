"""Lab 3 (reference solution): the timesync VSC, the guest half (Linux hv_util.c for ``HV_TS_GUID``).

The handshake is the IC NEGOTIATE (``timesync.VscHandshake``); then every TIMESYNC is answered in place and
what it says is reported: the host's time, and ``offset``, how far the host's clock is ahead of this guest's
(negative: behind). Linux keeps the same sample for its PTP clock (/dev/ptp*, which chrony reads) and steps
the clock on a SYNC; this guest logs it and keeps it in ``offset``. A message too short for its layout is
logged and dropped, and the channel goes on.
"""

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
        assert isinstance(self.hs, timesync.VscHandshake)
        guest = self.hs.guest
        while True:
            pkt = await channel.recv()
            answer = guest.answer(Incoming(pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload))
            for reason in guest.dropped:
                self.log.warning("timesync packet dropped", reason=reason)
            guest.dropped.clear()
            if answer is not None:
                await channel.send(answer.to_packet())
            for sample in guest.samples:
                self.offset = sample.offset
                what = "time sync" if sample.flags & timesync.TimesyncFlag.SYNC else "time sample"
                self.log.info(what, offset=round(sample.offset, 3))
            guest.samples.clear()
