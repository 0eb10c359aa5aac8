"""Both rings of one open channel as one side sees them (sans-IO).

Ring placement follows Linux drivers/hv/channel.c ``__vmbus_open`` and OpenVMM gpadl_ring ``make_rings``:
pages ``[0, downstream_offset)`` of the ring GPADL are the guest-to-host ring, the rest the host-to-guest
ring, each one header page plus data. The per-ring rules are in ``vmbus_proto.ring``.

Over a stream the bytes a packet's GPA ranges point at travel with the packet (docs/protocol.md §7.4), so a
channel also has a **data window** per direction: the inline data in flight, which the reader announced in
its HELLO. It is accounted exactly like a ring (the same writer and reader classes, charged align8(data
bytes)), and returned with the ring's credit, so every byte a peer may send is covered by a credit it can
see: a reader never has to stop reading its socket for a reason the writer cannot see.
"""

from __future__ import annotations

from .envelope import DEFAULT_DATA_WINDOW, Signal
from .errors import FrameError
from .packets import align8
from .ring import GUEST_TO_HOST, HOST_TO_GUEST, RingReader, RingWriter


class ChannelRings:
    __slots__ = ("data_reader", "data_writer", "in_ring", "out_ring", "reader", "relid", "writer")

    def __init__(self, relid: int, *, host: bool, guest_to_host_data: int, host_to_guest_data: int,
                 window_in: int = DEFAULT_DATA_WINDOW, window_out: int = DEFAULT_DATA_WINDOW) -> None:
        """``window_in`` is the data window this side announced; ``window_out`` the peer's."""
        self.relid = relid
        if host:
            self.out_ring, self.in_ring = HOST_TO_GUEST, GUEST_TO_HOST
            self.writer, self.reader = RingWriter(host_to_guest_data), RingReader(guest_to_host_data)
        else:
            self.out_ring, self.in_ring = GUEST_TO_HOST, HOST_TO_GUEST
            self.writer, self.reader = RingWriter(guest_to_host_data), RingReader(host_to_guest_data)
        self.data_writer, self.data_reader = RingWriter(window_out), RingReader(window_in)

    def arrive(self, size: int, data: int = 0) -> bool:
        """A packet arrived on our inbound ring with ``data`` inline bytes; raises RingOverrunError if it
        broke the ring's or the data window's credit."""
        if data:
            self.data_reader.arrive((data + 7) & ~7)
        return self.reader.arrive(size)

    def consume(self, size: int, data: int = 0) -> Signal | None:
        """We took a packet off the inbound ring; returns the credit to send, if due."""
        due = self.reader.consume(size)
        if data and self.data_reader.consume((data + 7) & ~7):
            due = True
        return self._credit() if due else None

    def _credit(self) -> Signal:
        index = self.reader.credit()
        data = self.data_reader.credit() if self.data_reader.uncredited else None
        return Signal(self.in_ring, read_index=index, interrupt_mask=self.reader.interrupt_mask,
                      data_read_index=data)

    def can_send(self, size: int, data: int = 0) -> bool:
        return self.writer.can_write(size) and (not data or self.data_writer.can_write(align8(data)))

    def try_send(self, size: int, data: int = 0) -> bool:
        """``sent(size, data)`` if ``can_send(size, data)``; returns whether it did."""
        if not data:
            return self.writer.try_write(size)
        data, data_writer = (data + 7) & ~7, self.data_writer
        if not data_writer.can_write(data) or not self.writer.try_write(size):
            return False
        data_writer.write(data)
        return True

    def fits_ever(self, size: int, data: int = 0) -> bool:
        return self.writer.fits_ever(size) and self.data_writer.fits_ever(align8(data))

    def sent(self, size: int, data: int = 0) -> None:
        self.writer.write(size)
        if data:
            self.data_writer.write(align8(data))

    def block(self, size: int, data: int = 0) -> Signal:
        """We cannot send: announce what we need of the ring and of the data window (0: not short)."""
        pss = self.writer.block(size) if not self.writer.can_write(size) else 0
        dps = 0
        if data and not self.data_writer.can_write(align8(data)):
            dps = self.data_writer.block(align8(data))
        return Signal(self.out_ring, write_index=self.writer.write_index, pending_send_sz=pss,
                      data_pending_sz=dps or None)

    def on_signal(self, sig: Signal) -> Signal | None:
        """The peer's ring header fields arrived; returns a credit to send back, if due."""
        if sig.ring == self.out_ring:
            if sig.write_index is not None or sig.pending_send_sz is not None or sig.data_pending_sz is not None:
                raise FrameError(f"peer sent writer fields for ring {sig.ring} it reads")
            if sig.read_index is not None:
                self.writer.update(sig.read_index, sig.interrupt_mask or 0)
            elif sig.interrupt_mask is not None:
                self.writer.peer_interrupt_mask = sig.interrupt_mask
            if sig.data_read_index is not None:
                self.data_writer.update(sig.data_read_index, 0)
            return None
        if sig.read_index is not None or sig.interrupt_mask is not None or sig.data_read_index is not None:
            raise FrameError(f"peer sent reader fields for ring {sig.ring} it writes")
        due = sig.pending_send_sz is not None and self.reader.writer_pending(sig.pending_send_sz)
        if sig.data_pending_sz is not None and self.data_reader.writer_pending(sig.data_pending_sz):
            due = True
        return self._credit() if due else None
