"""VSP plug-ins: what a device in the parent partition sees of VMBus.

Follows OpenVMM's ``VmbusDevice`` / ``SimpleVmbusDevice`` split (vm/devices/vmbus/vmbus_channel): a VSP
never sees control messages; it gets its offer, ``open(channel)`` and ``close(channel)``, and a channel
to read packets from and write packets and completions to. Each VSP is one object shared by every child
partition, serving each open channel in its own task.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.base import DeviceSpec, Handshake, HandshakeTrace, Incoming, Outgoing
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import Packet
from vmbus_proto.server import OfferSpec, OpenParams


@dataclass(slots=True)
class OpenChannelInfo:
    """What a VSP learns about a channel when it is opened."""

    partition: str
    params: OpenParams
    log: Any
    trace: bool = False  # --trace: log the device's handshake packets, decoded


class Vsp(abc.ABC):
    """A device's host half. Subclasses implement ``serve`` for one open channel."""

    spec: DeviceSpec

    def __init__(self) -> None:
        self.tasks: dict[Channel, asyncio.Task[None]] = {}
        self.opened = 0
        self.errors = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def offer(self, partition: str) -> OfferSpec:
        return OfferSpec(self.spec.name, self.spec.class_id, self.spec.default_instance,
                         pipe_mode=self.spec.pipe_mode, mmio_megabytes=self.spec.mmio_megabytes)

    async def open(self, channel: Channel, info: OpenChannelInfo) -> None:
        """Start serving ``channel``. Raising fails the open (OPENCHANNEL_RESULT with an error)."""
        self.opened += 1
        self.tasks[channel] = asyncio.get_running_loop().create_task(self._run(channel, info))

    async def _run(self, channel: Channel, info: OpenChannelInfo) -> None:
        try:
            await self.serve(channel, info)
        except ChannelClosed:
            pass
        except DeviceProtocolError as exc:
            self.errors += 1
            info.log.error("device protocol error; closing the partition's connection", error=str(exc))
            channel.conn.fail(f"{self.name} relid {channel.relid}: {exc}")
        except Exception:
            self.errors += 1
            info.log.exception("VSP failed; closing the partition's connection")
            channel.conn.fail(f"{self.name} relid {channel.relid}: internal device error")

    @abc.abstractmethod
    async def serve(self, channel: Channel, info: OpenChannelInfo) -> None: ...

    async def close(self, channel: Channel) -> None:
        """Stop serving ``channel``: its serve task is cancelled and awaited, so a device that must
        finish in-flight work (a disk write) does it in its ``finally`` before this returns."""
        task = self.tasks.pop(channel, None)
        channel.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Flush whatever the backend holds (disks are flushed here)."""


async def send_all(channel: Channel, outs: list[Outgoing]) -> None:
    for o in outs:
        await channel.send(o.to_packet())


def incoming(pkt: Packet) -> Incoming:
    return Incoming(pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload)


class HandshakeVsp(Vsp):
    """A VSP that runs its device's protocol-version handshake, then hands packets to ``handle``."""

    module: ModuleType

    def __init__(self, **handshake_args: Any) -> None:
        super().__init__()
        self.spec = self.module.SPEC
        self.handshake_args = handshake_args
        self.handshakes = 0

    def make_handshake(self) -> Handshake:
        hs: Handshake = self.module.VspHandshake(**self.handshake_args)
        return hs

    async def serve(self, channel: Channel, info: OpenChannelInfo) -> None:
        hs = self.make_handshake()
        trace = HandshakeTrace(self.module.describe) if info.trace else None
        await self._send_traced(channel, info, trace, hs.start())
        while not hs.done:
            pkt = incoming(await channel.recv())
            if trace is not None:
                info.log.info(trace.received("G>H", pkt))
            await self._send_traced(channel, info, trace, hs.receive(pkt))
        self.handshakes += 1
        version = hs.negotiated_version
        info.log.info("device protocol negotiated", device=self.name,
                      version=self.spec.version_text(version) if version is not None else None)
        await self.after_handshake(channel, info, hs)

    @staticmethod
    async def _send_traced(channel: Channel, info: OpenChannelInfo, trace: HandshakeTrace | None,
                           outs: list[Outgoing]) -> None:
        if trace is not None:
            for o in outs:
                info.log.info(trace.sent("H>G", o))
        await send_all(channel, outs)

    async def after_handshake(self, channel: Channel, info: OpenChannelInfo, hs: Handshake) -> None:
        """The device's I/O path. Until a device has one, its packets are logged and dropped."""
        while True:
            pkt = await channel.recv()
            info.log.warning("packet for a device I/O path that is not implemented yet", device=self.name,
                             type=pkt.type, trans_id=pkt.trans_id, length=len(pkt.payload))
