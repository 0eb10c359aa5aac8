"""The heartbeat integration service's host half: is each child partition still alive?

What Hyper-V's heartbeat service does for the parent (and OpenVMM's hyperv_ic devices do for theirs): on
each open heartbeat channel it negotiates the IC versions, then sends a heartbeat every ``[heartbeat]
interval`` seconds and checks each answer (``vmbus_proto.devices.heartbeat.protocol.HeartbeatHost``, sans-IO;
this module only moves its packets and reads the clock). A partition that stops answering is logged
"heartbeat lost", and "heartbeat resumed" once it answers again; one whose connection drops is lost at once.
Each partition's state (``states()``) is kept for the JSON API: last seq_num, last answer, healthy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.base import HandshakeTrace, Outgoing
from vmbus_proto.devices.heartbeat import protocol as heartbeat
from vmbus_proto.devices.heartbeat.protocol import HeartbeatEvent, HeartbeatHost
from vmbus_proto.errors import DeviceProtocolError

from ...settings import count, seconds, setting
from ...vsp import ChannelResources, HostContext, Vsp, incoming, send_all

MAX_REMEMBERED = 1024  # records of partitions whose channel is gone, oldest dropped first


@dataclass(slots=True)
class HeartbeatSettings:
    """``[heartbeat]``: how often the host asks, and how many unanswered requests make a partition lost."""

    interval: float = setting(2.0, check=seconds)  # hv_util.c: "Every two seconds, Hyper-V send us a heartbeat"
    lost_after: int = setting(3, check=count())  # lost after this many intervals without an answer


@dataclass(slots=True)
class PartitionHeartbeat:
    """One partition's heartbeat, as the JSON API will show it."""

    partition: str
    relid: int
    status: str = "negotiating"  # negotiating, ok, lost, refused, failed (bad answer), stopped (channel closed)
    version: str | None = None
    seq: int | None = None  # the last answer's seq_num
    last_answer: float | None = None  # wall-clock time of the last answer (seconds since the epoch)
    answered: int = 0
    missed: int = 0  # intervals the heartbeat in flight has gone unanswered
    channel_open: bool = True

    @property
    def healthy(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"healthy": self.healthy}


class HeartbeatVsp(Vsp):
    spec = heartbeat.SPEC
    Settings = HeartbeatSettings

    def __init__(self, interval: float = 2.0, lost_after: int = 3) -> None:
        super().__init__()
        self.interval = interval
        self.lost_after = lost_after
        self.partitions: dict[str, PartitionHeartbeat] = {}

    @classmethod
    def create(cls, settings: HeartbeatSettings, host: HostContext) -> HeartbeatVsp:
        return cls(settings.interval, settings.lost_after)

    def states(self) -> list[dict[str, Any]]:
        """Every partition's heartbeat state, for the JSON API."""
        return [r.as_dict() for r in self.partitions.values()]

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        loop = asyncio.get_running_loop()
        hb = HeartbeatHost(self.interval, self.lost_after)
        record = self._remember(PartitionHeartbeat(res.partition, channel.relid))
        trace = HandshakeTrace(heartbeat.describe) if res.trace else None  # the NEGOTIATE, as other devices
        try:
            await self._send(channel, res, trace, hb.start(loop.time()))
            while True:
                pkt = None
                timer = hb.get_timer()
                try:
                    async with asyncio.timeout_at(timer):
                        pkt = await channel.recv()
                except TimeoutError:
                    pass
                negotiating = not hb.running
                if pkt is None:
                    outs = hb.handle_timer(loop.time())
                else:
                    got = incoming(pkt)
                    if trace is not None and negotiating:
                        res.log.info(trace.received("G>H", got))
                    outs = hb.receive(got, loop.time())
                self._report(hb, record, res)
                await send_all(channel, outs)
        except DeviceProtocolError:
            record.status = "failed"  # the partition's connection goes: Vsp._run logs why
            raise
        finally:
            self._ended(record, channel, res)

    @staticmethod
    async def _send(channel: Channel, res: ChannelResources, trace: HandshakeTrace | None,
                    outs: list[Outgoing]) -> None:
        if trace is not None:
            for o in outs:
                res.log.info(trace.sent("H>G", o))
        await send_all(channel, outs)

    def _report(self, hb: HeartbeatHost, record: PartitionHeartbeat, res: ChannelResources) -> None:
        """Log what the heartbeat reported and update the partition's record."""
        record.missed = hb.missed
        for event, seq in hb.events():
            if event is HeartbeatEvent.NEGOTIATED:
                version = heartbeat.version_text(hb.version) if hb.version is not None else None
                record.version = version
                res.log.info("device protocol negotiated", device=self.name, version=version)
                continue
            if event is HeartbeatEvent.REFUSED:
                record.status = "refused"
                res.log.warning("heartbeat refused", reason=hb.refused)
                continue
            record.seq, record.answered = seq, hb.answered
            if event is HeartbeatEvent.LOST:
                record.status = "lost"
                silent = time.time() - record.last_answer if record.last_answer is not None else None
                res.log.warning("heartbeat lost", seq=seq, missed=hb.missed, silent_for=_round(silent))
                continue
            lost_for = time.time() - record.last_answer if record.last_answer is not None else None
            record.status, record.last_answer = "ok", time.time()
            if event is HeartbeatEvent.STARTED:
                res.log.info("heartbeat started", seq=seq)
            elif event is HeartbeatEvent.RESUMED:
                res.log.info("heartbeat resumed", seq=seq, silent_for=_round(lost_for))
            else:
                res.log.debug("heartbeat", seq=seq)

    def _ended(self, record: PartitionHeartbeat, channel: Channel, res: ChannelResources) -> None:
        """The channel is gone. A connection that dropped (a killed or crashed guest) is a lost heartbeat;
        a channel the guest closed (or a rescind, or shutdown) just stops it."""
        record.channel_open = False
        if record.status == "failed":
            return
        if res.connection_lost():
            if record.status != "lost":
                res.log.warning("heartbeat lost", seq=record.seq, reason="connection lost")
            record.status = "lost"
        elif record.status != "stopped":
            res.log.info("heartbeat stopped", seq=record.seq)
            record.status = "stopped"

    def _remember(self, record: PartitionHeartbeat) -> PartitionHeartbeat:
        self.partitions.pop(record.partition, None)
        self.partitions[record.partition] = record
        while len(self.partitions) > MAX_REMEMBERED:
            gone = next((k for k, r in self.partitions.items() if not r.channel_open), None)
            if gone is None:
                break
            del self.partitions[gone]
        return record


def _round(seconds_: float | None) -> float | None:
    return None if seconds_ is None else round(seconds_, 3)
