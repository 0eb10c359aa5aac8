"""VSP plug-ins: what a device in the parent partition sees of VMBus (the plug-in contract, version 2).

Follows OpenVMM's ``VmbusDevice`` / ``SimpleVmbusDevice`` split (vm/devices/vmbus/vmbus_channel): a VSP
never sees control messages. It is one object per device class, shared by every child partition, made
from its configuration section (``Settings``, a dataclass) by ``create``. For each channel a guest opens it
gets ``open(channel, resources)`` and serves that channel in its own task until ``close(channel)``.
``resources`` is what OpenVMM hands a device when its channel opens: the partition's GPADLs of this channel
by id (held until the device lets go, so a GPADL_TEARDOWN waits for the device), a view of guest memory,
sub-channel offer and revoke, and ``fail`` to end the partition's connection on a protocol error.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.devices.base import DeviceSpec, Handshake, HandshakeModule, HandshakeTrace, Incoming, Outgoing
from vmbus_proto.errors import DeviceProtocolError, ProtocolError
from vmbus_proto.gpadl import Gpadl
from vmbus_proto.packets import PAGE_SIZE, Packet
from vmbus_proto.server import OfferSpec, OpenParams

from .counters import Sample
from .memory import GpadlMap, HostMemory, ShadowMemory
from .settings import NoSettings


@dataclass(frozen=True, slots=True)
class HostContext:
    """What the daemon gives every VSP when it makes it."""

    data_path: Path = Path("var")
    trace: bool = False  # --trace: devices log their handshake packets, decoded
    source: str | None = None  # the config file the settings came from, for error messages


class SubchannelControl(Protocol):
    """Sub-channel offer and revoke for one primary channel (NVSP SUBCHANNEL, VSTOR CREATE_SUB_CHANNELS)."""

    def offer(self, count: int) -> list[int]:
        """Offer ``count`` more sub-channels of the primary; returns their relids."""

    def revoke(self) -> None:
        """Rescind every sub-channel of the primary."""

    @property
    def offered(self) -> int:
        """How many sub-channels are offered now."""


class NoSubchannels:
    """Sub-channel control where there can be none: every offer is refused."""

    offered = 0

    def offer(self, count: int) -> list[int]:
        return []

    def revoke(self) -> None:
        return None


@dataclass(slots=True)
class ChannelResources:
    """What a VSP gets with one open channel."""

    partition: str
    offer: OfferSpec
    params: OpenParams
    log: Any
    gpadls: GpadlMap
    memory: HostMemory
    subchannels: SubchannelControl
    fail: Callable[[str], None]  # end the partition's connection with this reason
    trace: bool = False
    primary: int = 0  # a sub-channel's primary relid (0 on a primary)
    connection_lost: Callable[[], bool] = lambda: False  # the partition's connection is gone (not just the channel)

    @classmethod
    def standalone(cls, partition: str, offer: OfferSpec, params: OpenParams | None, log: Any,
                   fail: Callable[[str], None] | None = None) -> ChannelResources:
        """Resources for a channel outside a VMBus connection (the in-memory pair, unit tests): no GPADLs
        besides the ring, no sub-channels; ``params`` default to relid 1 with a two-page ring; ``fail``
        defaults to raising."""
        def raise_(reason: str) -> None:
            raise DeviceProtocolError(reason)

        if params is None:
            ring = Gpadl(1, 0xE1E10, ((2 * PAGE_SIZE, 0),), (0, 1))
            params = OpenParams(relid=1, openid=1, gpadl=ring, downstream_offset=1, target_vp=0, userdata=b"")
        memory = ShadowMemory()
        return cls(partition, offer, params, log, GpadlMap(lambda gid: None, memory), memory, NoSubchannels(),
                   fail or raise_)

    @property
    def relid(self) -> int:
        return self.params.relid

    @property
    def sub_channel_index(self) -> int:
        return self.offer.sub_channel_index

    @property
    def primary_relid(self) -> int:
        """The primary channel's relid (this channel's own, on a primary)."""
        return self.primary or self.relid


def offer_subchannels(res: ChannelResources, count: int) -> None:
    """Offer sub-channels up to ``count`` in all (OpenVMM ``enable_subchannels``: the count is a total)."""
    more = count - res.subchannels.offered
    if more > 0:
        relids = res.subchannels.offer(more)
        res.log.info("sub-channels offered", count=len(relids), relids=relids)


class Vsp(abc.ABC):
    """A device's host half. Subclasses set ``spec`` and implement ``serve`` for one open channel."""

    spec: ClassVar[DeviceSpec]
    Settings: ClassVar[type[Any]] = NoSettings  # the device's configuration section, [<spec.name>]

    def __init__(self) -> None:
        self.tasks: dict[Channel, asyncio.Task[None]] = {}
        self.opened = 0
        self.errors = 0

    @classmethod
    def create(cls, settings: Any, host: HostContext) -> Self:
        """Make the device from its settings (a ``Settings`` instance). Devices with settings override this."""
        return cls()

    @classmethod
    def check(cls, settings: Any, host: HostContext) -> None:
        """Check at start-up what would otherwise fail later, for every child (raise settings.ConfigError)."""
        return None

    @property
    def name(self) -> str:
        return self.spec.name

    def offer(self, partition: str) -> OfferSpec:
        """The primary channel this device offers to ``partition``."""
        return OfferSpec(self.spec.name, self.spec.class_id, self.spec.default_instance,
                         pipe_mode=self.spec.pipe_mode, mmio_megabytes=self.spec.mmio_megabytes)

    async def open(self, channel: Channel, res: ChannelResources) -> None:
        """Start serving ``channel``. Raising fails the open (OPENCHANNEL_RESULT with an error)."""
        self.opened += 1
        self.tasks[channel] = asyncio.get_running_loop().create_task(self._run(channel, res))

    async def _run(self, channel: Channel, res: ChannelResources) -> None:
        try:
            await self.serve(channel, res)
        except ChannelClosed:
            pass
        except ProtocolError as exc:  # the guest's fault: a device protocol error, or its rings (shared memory)
            self.errors += 1
            res.log.error("device protocol error; closing the partition's connection", error=str(exc))
            res.fail(f"{self.name} relid {channel.relid}: {exc}")
        except Exception:
            self.errors += 1
            res.log.exception("VSP failed; closing the partition's connection")
            res.fail(f"{self.name} relid {channel.relid}: internal device error")

    @abc.abstractmethod
    async def serve(self, channel: Channel, res: ChannelResources) -> None: ...

    async def close(self, channel: Channel) -> None:
        """Stop serving ``channel``: its serve task is cancelled and awaited, so a device that must
        finish in-flight work (a disk write) does it in its ``finally`` before this returns."""
        task = self.tasks.pop(channel, None)
        channel.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def samples(self) -> list[Sample]:
        """This device's counters, read when the JSON API or /metrics asks (never kept up to date for them).
        Devices extend the list with their own (``Sample.partition`` set where a value is per partition)."""
        return [Sample("channels_opened_total", self.opened, "channels this device served since start"),
                Sample("errors_total", self.errors, "channels that ended with a device error"),
                Sample("channels_open", len(self.tasks), "channels this device serves now", "gauge")]

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Flush whatever the backend holds (disks are flushed here)."""


async def send_all(channel: Channel, outs: list[Outgoing]) -> None:
    for o in outs:
        await channel.send(o.to_packet())


def incoming(pkt: Packet) -> Incoming:
    return Incoming(pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload)


class HandshakeVsp(Vsp):
    """A VSP that runs its device's protocol-version handshake, then hands packets to ``after_handshake``."""

    module: HandshakeModule

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "module" in cls.__dict__:
            cls.spec = cls.module.SPEC

    def __init__(self, **handshake_args: Any) -> None:
        super().__init__()
        self.handshake_args = handshake_args
        self.handshakes = 0

    def make_handshake(self) -> Handshake:
        return self.module.VspHandshake(**self.handshake_args)

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        hs = self.make_handshake()
        trace = HandshakeTrace(self.module.describe) if res.trace else None
        await self._send_traced(channel, res, trace, hs.start())
        while not hs.done:
            if hs.failed:
                raise DeviceProtocolError(f"{self.name} handshake failed: {hs.failed}")
            pkt = incoming(await channel.recv())
            if trace is not None:
                res.log.info(trace.received("G>H", pkt))
            await self._send_traced(channel, res, trace, hs.receive(pkt))
        self.handshakes += 1
        version = hs.negotiated_version
        res.log.info("device protocol negotiated", device=self.name,
                     version=self.spec.version_text(version) if version is not None else None)
        await self.after_handshake(channel, res, hs)

    @staticmethod
    async def _send_traced(channel: Channel, res: ChannelResources, trace: HandshakeTrace | None,
                           outs: list[Outgoing]) -> None:
        if trace is not None:
            for o in outs:
                res.log.info(trace.sent("H>G", o))
        await send_all(channel, outs)

    async def after_handshake(self, channel: Channel, res: ChannelResources, hs: Handshake) -> None:
        """The device's I/O path. Until a device has one, its packets are logged and dropped."""
        while True:
            pkt = await channel.recv()
            res.log.warning("packet for a device I/O path that is not implemented yet", device=self.name,
                            type=pkt.type, trans_id=pkt.trans_id, length=len(pkt.payload))

