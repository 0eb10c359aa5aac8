"""The diagnostic echo device's host half (ours, not Hyper-V's; benchmarks only)."""

from __future__ import annotations

from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.echo import protocol as echo
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, Packet, PacketType

from ...vsp import ChannelResources, Vsp


class EchoVsp(Vsp):
    """Diagnostic device for the benchmark: completes every request with its own payload, and sends
    GPA-direct data back into the request's ranges (as a storage READ would)."""

    spec = echo.SPEC

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        recv, recv_nowait, try_send, send = channel.recv, channel.recv_nowait, channel.try_send, channel.send
        comp = PacketType.COMP
        while True:
            pkt: Packet | None = await recv()
            while pkt is not None:  # answer everything already queued without a coroutine switch each
                if pkt.type == comp:
                    raise DeviceProtocolError("unsolicited completion")
                if pkt.flags & FLAG_COMPLETION_REQUESTED:
                    out = Packet(comp, 0, pkt.trans_id, pkt.payload, data=pkt.data)
                    if not try_send(out):
                        await send(out)
                pkt = recv_nowait()


