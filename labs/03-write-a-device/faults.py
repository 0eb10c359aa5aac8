"""Lab 3's fault injection (used by grader.py): a timesync host that sends one malformed message.

A plug-in VSP for the timesync class GUID, built on the project's IC framework only (not on your code): it
negotiates, sends a TIMESYNC whose body is 5 bytes (too short for any layout), then a good SYNC with its clock
7200 seconds ahead, then answers nothing more. A guest must drop the first (log it) and take the second.
"""

from __future__ import annotations

import struct
import time
import uuid

from parent_partition.vsp import ChannelResources, Vsp, incoming, send_all
from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.base import DeviceSpec, Outgoing
from vmbus_proto.devices.heartbeat.ic import IcFlags, IcHeader, IcHostNegotiation, IcMessageType, pack_ic, version
from vmbus_proto.ring import vmbus_ring_size

FAULT_OFFSET = 7200.0
SPEC = DeviceSpec("timesync", uuid.UUID("9527e630-d0ae-497b-adce-e80ab0175caf"),
                  uuid.UUID("2dd1ce17-079e-403c-b352-a1921ee207ee"), pipe_mode=True, mmio_megabytes=0,
                  ring_bytes=vmbus_ring_size(3 * 4096), max_packet=4096, protocol="IC")


class FaultyTimesyncVsp(Vsp):
    spec = SPEC

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        hs = IcHostNegotiation("timesync", (version(1, 0), version(3, 0), version(4, 0)))
        await send_all(channel, hs.start())
        while not hs.done:
            hs.receive(incoming(await channel.recv()))
        fw, ver = hs.framework_version or 0, hs.negotiated_version or 0
        ticks = round((time.time() + FAULT_OFFSET) * 10_000_000) + 116444736000000000
        good = (struct.pack("<QQBBB5x", ticks, time.monotonic_ns() // 100, 1, 0, 0) if ver > version(3, 0)
                else struct.pack("<QQQB3x", ticks, 0, 0, 1))
        for body in (b"\x01" * 5, good):
            header = IcHeader(fw, IcMessageType.TIMESYNC, ver, len(body), flags=IcFlags.TRANSACTION | IcFlags.REQUEST)
            await send_all(channel, [Outgoing(pack_ic(header, body))])
        res.log.info("fault injected: a 5-byte TIMESYNC, then a SYNC", version=f"{ver >> 16}.{ver & 0xFFFF}")
        while True:
            await channel.recv()  # the answers: not checked here
