"""The virtual switch across worker processes: a trunk port per other worker (``parent_partition.workers``).

Each worker has its own ``Switch``; the switches of a parent's workers are joined in a full mesh, as the
member switches of a stack are (or vmswitch's trunk ports): a frame for a MAC learned on a trunk goes to
that worker, a flooded one to every worker, and a frame that came in on a trunk never goes out on another
(split horizon: every worker got the flood directly, so there is no loop and no spanning tree). MAC spoofing
is checked where a frame enters the parent, at its partition's port, so isolation holds across workers.

Between two workers the frames go through a Unix datagram socketpair the supervisor made and keeps open
(so a restarted worker inherits its end again). The socket's buffer holds what the other worker has not read
yet (``SO_SNDBUF``, about 208 KiB: some ninety 1,500-byte frames, three 64 KiB segments). When it is full the
trunk port stops taking frames off its queue until the socket is writable again, so a burst waits in the
port's queue and only a full queue drops (counted, as on any port); a peer whose end is gone costs the frame
(``queue_full``). A datagram is one frame, after a flag byte and, for a large segment, its virtio-net header.
"""

from __future__ import annotations

import asyncio
import collections
import socket

from vmbus_proto.devices.network import vnet

from .switch import MAX_LARGE_FRAME, Switch

HDR_SIZE = len(vnet.NO_OFFLOAD.pack())
BATCH = 256  # datagrams read per wake-up


class TrunkLink:
    """Worker ``peer``'s switch as port ``trunk:PEER`` of ``switch``, over datagram socket ``sock``."""

    def __init__(self, switch: Switch, peer: int, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.port = switch.attach(f"trunk:{peer}", _trunk_mac(peer), max_frame=MAX_LARGE_FRAME)
        self.port.trunk = True
        self.port.set_wakeup(self._flush)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self._unsent: collections.deque[bytes] = collections.deque()  # taken off the port, the socket was full
        self._waiting = False  # for the socket to be writable

    def _readable(self) -> None:
        send = self.port.send_nowait
        for _ in range(BATCH):
            try:
                data = self.sock.recv(MAX_LARGE_FRAME + HDR_SIZE + 1)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                continue
            if data[0]:
                send(data[1 + HDR_SIZE:], vnet.VnetHdr.unpack(data[1:1 + HDR_SIZE]))
            else:
                send(data[1:])

    def _flush(self) -> None:
        unsent = self._unsent
        while True:
            if not unsent:
                frames = self.port.recv_nowait(BATCH)
                if not frames:
                    return
                unsent.extend(b"\x00" + f.data if f.offload is None else b"\x01" + f.offload.pack() + f.data
                              for f in frames)
            while unsent:
                try:
                    self.sock.send(unsent[0])
                except (BlockingIOError, InterruptedError):  # the other worker has not read yet: wait for it
                    if not self._waiting:
                        self._waiting = True
                        self._loop.add_writer(self.sock.fileno(), self._writable)
                    return
                except OSError:  # its end is gone (a worker restarting)
                    self.port.counters.drops["queue_full"] += 1
                    self.port.switch.counters.drops["queue_full"] += 1
                unsent.popleft()

    def _writable(self) -> None:
        self._loop.remove_writer(self.sock.fileno())
        self._waiting = False
        self._flush()

    def close(self) -> None:
        if self._waiting:
            self._loop.remove_writer(self.sock.fileno())
        self._unsent.clear()
        self._loop.remove_reader(self.sock.fileno())
        self.port.detach()
        self.sock.close()


def _trunk_mac(peer: int) -> bytes:
    """A locally administered MAC for the trunk port (never a partition's: those come from a name's hash)."""
    return bytes([0x06, 0x76, 0x6D, 0x62, peer >> 8 & 0xFF, peer & 0xFF])
