"""Lab 2, part B: ring accounting (reference solution).

Linux include/linux/hyperv.h (``hv_get_bytes_to_write``, ``struct vmpacket_descriptor``) and
drivers/hv/ring_buffer.c (``hv_ringbuffer_write``: the 8-byte trailer and the ``<=`` that keeps a ring from
filling; ``hv_signal_on_write``; ``hv_pkt_iter_close``: the pending_send_sz crossing).
"""

from __future__ import annotations

DESCRIPTOR = 16  # struct vmpacket_descriptor: type, offset8, len8, flags (u16 each), trans_id (u64)
TRAILER = 8  # the u64 after every packet: (u64)start_write_index << 32


def packet_size(payload_len: int) -> int:
    """Bytes an in-band packet with ``payload_len`` payload bytes takes in the ring."""
    if payload_len < 0:
        raise ValueError("a payload has no negative length")
    return DESCRIPTOR + ((payload_len + 7) & ~7) + TRAILER


def bytes_to_write(write_index: int, read_index: int, data_size: int) -> int:
    """Free bytes in a ring of ``data_size`` data bytes, as the writer computes them."""
    if write_index >= read_index:
        return data_size - (write_index - read_index)
    return read_index - write_index


def can_write(write_index: int, read_index: int, data_size: int, size: int) -> bool:
    """Whether a packet of ring size ``size`` may be written now (it must not make the ring look empty)."""
    return size < bytes_to_write(write_index, read_index, data_size)


def next_write_index(write_index: int, size: int, data_size: int) -> int:
    """Where the write index stands after writing ``size`` bytes (the data area wraps around)."""
    return (write_index + size) % data_size


def must_signal_reader(old_write_index: int, read_index: int, interrupt_mask: int) -> bool:
    """After a write that started at ``old_write_index``: does the writer interrupt the reader?"""
    return interrupt_mask == 0 and read_index == old_write_index


def must_signal_writer(write_index: int, old_read_index: int, new_read_index: int, data_size: int,
                       pending_send_sz: int) -> bool:
    """After the reader moved its index from ``old_read_index`` to ``new_read_index``: does it interrupt the
    writer, which asked for ``pending_send_sz`` free bytes (0: it is not waiting)?"""
    if not pending_send_sz:
        return False
    free_now = bytes_to_write(write_index, new_read_index, data_size)
    bytes_read = (new_read_index - old_read_index) % data_size
    return free_now - bytes_read <= pending_send_sz < free_now
