"""Lab 5: a sender that fills the ring and waits for the reader (reference solution).

Linux's VMBus writers return -EAGAIN when ``hv_ringbuffer_write`` finds no room, and a driver that must not
drop (storvsc, netvsc) sets ``pending_send_sz`` and sleeps until the host's interrupt, which
``hv_pkt_iter_close`` on the other side raises when free space crosses that mark (include/linux/hyperv.h
``set_channel_pending_send_size``; OpenVMM vmbus_ring ``OutgoingRing::try_write`` / ``commit_read``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vmbus_proto.packets import Packet


async def send_all(port: Any, packets: Iterable[Packet]) -> None:
    """Write every packet, in order; when one does not fit, announce it and sleep until the reader signals."""
    for pkt in packets:
        size = port.size_of(pkt)
        if not port.can_write(size):
            port.set_pending_send_sz(size)  # then look again: the reader may have made room meanwhile
            while not port.can_write(size):
                await port.wait_for_reader()
        port.write(pkt)
