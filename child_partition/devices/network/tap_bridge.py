"""The guest's TAP bridge: the host kernel's network stack as this partition's guest stack.

A TAP device (``vmbus_proto.aio.tap``: ``IFF_VNET_HDR``, offloads CSUM|TSO4|TSO6) is joined to the NetVSC's
:class:`~.nic.Nic` both ways, as a guest's ``net_device`` sits on its netvsc: what the kernel sends on the TAP
is the guest transmitting (its virtio-net header, checksum left to the device or a TCP segment of up to
64 KiB, goes along as the frame's offload metadata and becomes RNDIS per-packet info in the NetVSC), what the
NIC receives is written to the TAP (checksum-OK and RSC-coalesced frames with the virtio-net header that
says so). Transmit has back-pressure: while the NIC has no room the TAP is not read (the kernel queues, then
drops, as for a stopped netdev queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

from vmbus_proto.aio.tap import Tap, TapError, _ip
from vmbus_proto.devices.network import vnet

from .nic import Nic, NicClosed, NicError

RX_BATCH = 256  # frames taken from the NIC per wake-up


@dataclasses.dataclass
class BridgeCounters:
    to_nic: int = 0        # frames the TAP gave that the NIC took
    to_nic_dropped: int = 0  # refused by the NIC (link down, or a frame it cannot carry)
    to_tap: int = 0        # frames from the NIC written to the TAP
    stalls: int = 0        # times the NIC's transmit queue was full and TAP reads paused


class TapBridge:
    """One TAP device joined to whichever NIC the NetVSC currently gives (``attach``/``detach``)."""

    def __init__(self, tap: Tap, log: Any) -> None:
        self.tap = tap
        self.log = log
        self.nic: Nic | None = None
        self.counters = BridgeCounters()
        self._rx_task: asyncio.Task[None] | None = None
        self._tx_task: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, name: str, netns: str | None, log: Any) -> TapBridge:
        """Create TAP ``name`` (in ``netns``), link up; TapError says which step failed."""
        return cls(Tap.open(name, netns=netns), log)

    def attach(self, nic: Nic) -> None:
        self.detach()
        self.nic = nic
        try:  # the guest's interface carries the NIC's MAC and MTU, as a netvsc netdev does
            _ip(*(["-n", self.tap.netns] if self.tap.netns else []), "link", "set", "dev", self.tap.name,
                "address", nic.mac.hex(":"), "mtu", str(nic.mtu))
        except TapError as exc:
            self.log.warning("TAP keeps its own MAC and MTU", tap=self.tap.name, error=str(exc))
        self.tap.start(self._from_tap)
        self._rx_task = asyncio.get_running_loop().create_task(self._to_tap(nic))

    def detach(self) -> None:
        self.tap.stop()
        for task in (self._rx_task, self._tx_task):
            if task is not None:
                task.cancel()
        self._rx_task = self._tx_task = None
        self.nic = None

    def close(self) -> None:
        self.detach()
        self.tap.close()

    def _from_tap(self, frames: list[tuple[vnet.VnetHdr, bytes]]) -> None:
        nic = self.nic
        if nic is None:
            return
        no_offload = vnet.NO_OFFLOAD
        c = self.counters
        for i, (hdr, frame) in enumerate(frames):
            try:
                if not nic.send_nowait(frame, None if hdr == no_offload else hdr):
                    c.stalls += 1
                    self.tap.stop()  # back-pressure: read no more until the NIC has room
                    self._tx_task = asyncio.get_running_loop().create_task(self._drain(nic, frames[i:]))
                    return
                c.to_nic += 1
            except (NicError, ValueError):
                c.to_nic_dropped += 1

    async def _drain(self, nic: Nic, frames: list[tuple[vnet.VnetHdr, bytes]]) -> None:
        no_offload = vnet.NO_OFFLOAD
        for hdr, frame in frames:
            try:
                await nic.send(frame, None if hdr == no_offload else hdr)
                self.counters.to_nic += 1
            except NicClosed:
                return
            except (NicError, ValueError):
                self.counters.to_nic_dropped += 1
        if self.nic is nic:
            self.tap.start(self._from_tap)

    async def _to_tap(self, nic: Nic) -> None:
        write = self.tap.write
        with contextlib.suppress(NicClosed):
            while True:
                frames = await nic.recv_batch_meta(RX_BATCH)
                for frame, hdr in frames:
                    write(frame, hdr)
                self.counters.to_tap += len(frames)
