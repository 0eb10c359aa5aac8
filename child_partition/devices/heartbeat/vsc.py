"""The heartbeat integration service's guest half: Linux drivers/hv/hv_util.c for ``HV_HEART_BEAT_GUID``.

``util_probe`` opens the channel with ``HV_UTIL_RING_SEND_SIZE`` rings (``SPEC.ring_bytes``); then
``heartbeat_onchannelcallback`` answers every packet in place: the NEGOTIATE with the framework and heartbeat
versions it chose (``vmbus_prep_negotiate_resp``), each HEARTBEAT with ``seq_num + 1``
(``vmbus_proto.devices.heartbeat.protocol.HeartbeatGuest``). The guest offers no service to the rest of
itself: answering is the whole job.
"""

from __future__ import annotations

from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.base import Incoming
from vmbus_proto.devices.heartbeat import protocol as heartbeat

from ...vsc import HandshakeVsc


class HeartbeatVsc(HandshakeVsc):
    module = heartbeat

    async def run(self, channel: Channel) -> None:
        assert isinstance(self.hs, heartbeat.VscHandshake)
        guest = self.hs.guest
        while True:
            pkt = await channel.recv()
            answer = guest.answer(Incoming(pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload))
            for reason in guest.dropped:
                self.log.warning("heartbeat packet dropped", reason=reason)
            guest.dropped.clear()
            if answer is not None:
                await channel.send(answer.to_packet())
                self.log.debug("heartbeat answered", seq=guest.last_seq)
