"""Both rings of one open channel as one side sees them (sans-IO).

Ring placement follows Linux drivers/hv/channel.c ``__vmbus_open`` and OpenVMM gpadl_ring ``make_rings``:
pages ``[0, downstream_offset)`` of the ring GPADL are the guest-to-host ring, the rest the host-to-guest
ring, each one header page plus data. The per-ring rules are in ``vmbus_proto.ring``.
"""

from __future__ import annotations

from .envelope import Signal
from .errors import FrameError
from .ring import GUEST_TO_HOST, HOST_TO_GUEST, RingReader, RingWriter


class ChannelRings:
    __slots__ = ("in_ring", "out_ring", "reader", "relid", "writer")

    def __init__(self, relid: int, *, host: bool, guest_to_host_data: int, host_to_guest_data: int) -> None:
        self.relid = relid
        if host:
            self.out_ring, self.in_ring = HOST_TO_GUEST, GUEST_TO_HOST
            self.writer, self.reader = RingWriter(host_to_guest_data), RingReader(guest_to_host_data)
        else:
            self.out_ring, self.in_ring = GUEST_TO_HOST, HOST_TO_GUEST
            self.writer, self.reader = RingWriter(guest_to_host_data), RingReader(host_to_guest_data)

    def arrive(self, size: int) -> bool:
        """A packet arrived on our inbound ring; raises RingOverrunError if it broke the credit."""
        return self.reader.arrive(size)

    def consume(self, size: int) -> Signal | None:
        """We took a packet off the inbound ring; returns the credit to send, if due."""
        if self.reader.consume(size):
            return self._credit()
        return None

    def _credit(self) -> Signal:
        index = self.reader.credit()
        return Signal(self.in_ring, read_index=index, interrupt_mask=self.reader.interrupt_mask)

    def can_send(self, size: int) -> bool:
        return self.writer.can_write(size)

    def sent(self, size: int) -> None:
        self.writer.write(size)

    def block(self, size: int) -> Signal:
        pss = self.writer.block(size)
        return Signal(self.out_ring, write_index=self.writer.write_index, pending_send_sz=pss)

    def on_signal(self, sig: Signal) -> Signal | None:
        """The peer's ring header fields arrived; returns a credit to send back, if due."""
        if sig.ring == self.out_ring:
            if sig.write_index is not None or sig.pending_send_sz is not None:
                raise FrameError(f"peer sent writer fields for ring {sig.ring} it reads")
            if sig.read_index is not None:
                self.writer.update(sig.read_index, sig.interrupt_mask or 0)
            elif sig.interrupt_mask is not None:
                self.writer.peer_interrupt_mask = sig.interrupt_mask
            return None
        if sig.read_index is not None or sig.interrupt_mask is not None:
            raise FrameError(f"peer sent reader fields for ring {sig.ring} it writes")
        if sig.pending_send_sz is not None and self.reader.writer_pending(sig.pending_send_sz):
            return self._credit()
        return None
