"""Lab 4: the guest's reaction to a hot remove (CHANNELMSG_RESCIND_CHANNELOFFER).

Write ``on_rescind``. The child partition calls it (as a task of its own) when the host rescinds the offer of
channel ``relid``: what Linux does in drivers/hv/channel_mgmt.c ``vmbus_onoffer_rescind()``, the driver's
remove (``vmbus_close()`` in drivers/hv/channel.c) and ``hv_process_channel_removal()``.

What you have (read child_partition/runner.py, vsc.py and bus.py):

* ``guest.vscs``: the bound drivers (``Vsc``) of primary channels, by relid.
* ``vsc.subchannels``: a driver's open sub-channels, by relid (the NIC has some).
* ``vsc.service``: the guest service above the driver (the disk and its NBD export, the NIC, the console), or
  None; ``service.on_lost(vsc)`` tells it this driver is gone.
* ``await vsc.detach(rescinded=...)``: the driver's remove: its device-specific stop, CLOSECHANNEL, the
  GPADL teardowns unless rescinded, and its guest pages given back.
* ``await vsc.on_subchannel_rescind(relid)``: close one of ``vsc``'s sub-channels after a rescind.
* ``guest.bus``: the VMBus connection (None when there is none); ``bus.release_relid(relid)`` sends
  RELID_RELEASED.

The bus has already failed the requests in flight on that channel (``ChannelClosed``), as Linux's rescind
wakes every waiter. ``make grade LAB=4`` runs this in a real child against a real parent.
"""

from __future__ import annotations

from child_partition.runner import ChildPartition


async def on_rescind(guest: ChildPartition, relid: int) -> None:
    """The host rescinded channel ``relid``: let go of it, in the right order, and tell the host when done."""
    raise NotImplementedError("write on_rescind in labs/04-hot-remove/starter/rescind.py")
