"""One partition's I/O-port space on the parent: the VMM side of trapped IN/OUT (docs/protocol.md §13).

What QEMU's vCPU loop does with ``KVM_EXIT_IO`` (accel/kvm/kvm-all.c ``kvm_handle_io``: for each of
``count`` units, ``address_space_rw`` on the I/O address space): each IOPORT frame is decoded
(``vmbus_proto.ioport``), carried out on the partition's ``PortBus`` where the emulated devices registered
their ports, and answered at once with the IN data. It runs in the connection's frame callback, so exits
are handled in order, one at a time, as one vCPU's are. A malformed frame is the peer's fault: FrameError
closes its connection, and only its.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from vmbus_proto.framing import HEADER_SIZE, Frame, FrameKind
from vmbus_proto.ioport import Direction, PortBus, decode_request, encode_reply

from .counters import Sample


class Attachment(Protocol):
    """An emulated device's state for one partition."""

    def close(self) -> None: ...


class EmulatedDevice(Protocol):
    """A device the guest reaches by port I/O, not VMBus: one object per daemon, attached per partition."""

    name: str

    def attach(self, partition: str, bus: PortBus, log: Any) -> Attachment: ...

    def samples(self) -> list[Sample]: ...

    async def shutdown(self) -> None: ...


class PartitionPorts:
    """The port bus of one partition's connection, with its exit counters."""

    def __init__(self, partition: str, devices: Iterable[EmulatedDevice],
                 send: Callable[[int, int, bytes, bytes], None], log: Any) -> None:
        self.bus = PortBus()
        self._send = send
        self.attached = [dev.attach(partition, self.bus, log) for dev in devices]
        self.exits = {int(Direction.IN): 0, int(Direction.OUT): 0}
        self.bytes_in = 0  # IOPORT frame bytes received (requests)
        self.bytes_out = 0  # and sent (replies)

    def on_frame(self, frame: Frame) -> None:
        req = decode_request(frame.body, frame.data)  # FrameError: the connection closes
        data = self.bus.access(req)
        body = encode_reply(req.seq)
        self.exits[req.direction] += 1
        self.bytes_in += HEADER_SIZE + len(frame.body) + len(frame.data)
        self.bytes_out += HEADER_SIZE + len(body) + len(data)
        self._send(FrameKind.IOPORT, 0, body, data)

    def close(self) -> None:
        for att in self.attached:
            att.close()
        self.attached = []
