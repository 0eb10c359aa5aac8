"""Lab 2, part B: ring accounting. Write the functions below (the handout has the ring picture).

Mirror Linux include/linux/hyperv.h (``hv_get_bytes_to_write``, ``struct vmpacket_descriptor``) and
drivers/hv/ring_buffer.c (``hv_ringbuffer_write``, ``hv_signal_on_write``, ``hv_pkt_iter_close``). Indices are
byte offsets into the ring's data area (the header page not counted), multiples of 8, below ``data_size``.
"""

from __future__ import annotations


def packet_size(payload_len: int) -> int:
    """Bytes an in-band packet (no extension header) with ``payload_len`` payload bytes takes in the ring:
    its descriptor, its payload padded to 8 bytes, and the trailer every packet carries. ValueError below 0."""
    raise NotImplementedError("packet_size()")


def bytes_to_write(write_index: int, read_index: int, data_size: int) -> int:
    """Free bytes in a ring of ``data_size`` data bytes, as the writer computes them (equal indices: empty)."""
    raise NotImplementedError("bytes_to_write()")


def can_write(write_index: int, read_index: int, data_size: int, size: int) -> bool:
    """Whether a packet of ring size ``size`` may be written now. Careful: after the write, a full ring and an
    empty one must not look the same."""
    raise NotImplementedError("can_write()")


def next_write_index(write_index: int, size: int, data_size: int) -> int:
    """Where the write index stands after writing ``size`` bytes (the data area wraps around)."""
    raise NotImplementedError("next_write_index()")


def must_signal_reader(old_write_index: int, read_index: int, interrupt_mask: int) -> bool:
    """After a write that started at ``old_write_index`` (the reader is at ``read_index`` and asked for
    ``interrupt_mask``): does the writer interrupt the reader?"""
    raise NotImplementedError("must_signal_reader()")


def must_signal_writer(write_index: int, old_read_index: int, new_read_index: int, data_size: int,
                       pending_send_sz: int) -> bool:
    """After the reader moved its index from ``old_read_index`` to ``new_read_index`` (the writer is at
    ``write_index`` and asked for ``pending_send_sz`` free bytes, 0 meaning it is not waiting): does the
    reader interrupt the writer? Only when free space crosses what the writer waits for."""
    raise NotImplementedError("must_signal_writer()")
