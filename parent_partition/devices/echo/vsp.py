"""The diagnostic echo device's host half (ours, not Hyper-V's; benchmarks only)."""

from __future__ import annotations

import asyncio
import collections

from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.echo import protocol as echo
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, Packet, PacketType

from ...vsp import ChannelResources, Vsp

_COMP = int(PacketType.COMP)


class EchoVsp(Vsp):
    """Diagnostic device for the benchmark: completes every request with its own payload, and sends
    GPA-direct data back into the request's ranges (as a storage READ would).

    Driver-style, as a VSP's channel callback is: each request is answered inside the channel's delivery
    (``Channel.on_packet``), while the ring has room; a completion that does not fit waits in order in a
    backlog this device's task writes as space frees."""

    spec = echo.SPEC

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        try_sendpacket = channel.try_sendpacket
        backlog: collections.deque[Packet] = collections.deque()
        wake = asyncio.Event()

        def on_packet(pkt: Packet) -> None:
            if pkt.type == _COMP:
                raise DeviceProtocolError("unsolicited completion")
            if not pkt.flags & FLAG_COMPLETION_REQUESTED:
                return
            if not backlog:
                if not pkt.data:
                    if try_sendpacket(pkt.payload, pkt.trans_id, _COMP):
                        return
                elif channel.try_send(Packet(_COMP, 0, pkt.trans_id, pkt.payload, data=pkt.data)):
                    return
            backlog.append(Packet(_COMP, 0, pkt.trans_id, pkt.payload, data=pkt.data))
            wake.set()

        channel.on_packet = on_packet
        try:
            while True:
                await wake.wait()
                wake.clear()
                while backlog:
                    await channel.send(backlog[0])
                    backlog.popleft()
        finally:
            channel.on_packet = None
