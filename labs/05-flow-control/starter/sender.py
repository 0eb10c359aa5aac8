"""Lab 5, part A: a sender that pushes packets as fast as the ring allows, and waits correctly when it is full.

``port`` is a ``RingPort`` (labs/05-flow-control/flowlab.py): the writer's side of the echo channel's outbound
ring, with ``size_of(pkt)``, ``can_write(size)``, ``write(pkt)``, ``set_pending_send_sz(size)`` and
``await wait_for_reader()``. Read the handout's Background before you write this.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vmbus_proto.packets import Packet


async def send_all(port: Any, packets: Iterable[Packet]) -> None:
    """Write every packet of ``packets`` to the ring, in order, none dropped and none twice.

    When a packet does not fit: do not drop it, do not write it anyway (``RingFull``), and do not ask
    ``can_write`` again and again (a busy loop burns a CPU the reader needs). Tell the reader how much room
    you need and sleep until it signals; the room may still be short when you wake.
    """
    raise NotImplementedError("send_all()")
