"""The network data path's Python cost per frame, without processes or sockets: NetVSC and NetVSP state
machines (``NvspGuest`` and ``NvspHost``) wired in memory with the stream views both devices use (a
transfer-page packet's bytes copied into the guest's receive buffer, a send-buffer section's bytes riding
with its SEND_RNDIS_PKT), each packet counted as it would cross the socket.

Four paths, each a frame through one direction plus its completion back:

- ``tx64``: a 64-byte frame the guest transmits (send-buffer section), the host parses it, completes it;
- ``rx64``: a 64-byte frame the host delivers (one transfer-page range), the guest reads and completes it;
- ``tx_lso``: a 64 KiB TCP segment with the LSOv2 PPI, GPA-direct;
- ``rx_rsc``: the same segment coalesced (RSC, NVSP 6.1) across ~37 receive sub-allocations.

Reported: CPU microseconds (thread time, so a loaded machine moves them less) per frame of each side
(``host_us``, ``guest_us``), median of ``--repeat`` runs. This
is what profiling the VSP and VSC showed dominating once the transport is batched; the process-level
figures are ``bench.net_tap`` and ``bench.net_frames``. ``python -m bench.net_path`` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

from vmbus_proto.devices.network import guest as netguest
from vmbus_proto.devices.network import host as nethost
from vmbus_proto.devices.network import rndis
from vmbus_proto.devices.network.buffers import ByteBuffer

MAC_A, MAC_B = bytes.fromhex("00155d000001"), bytes.fromhex("00155d000002")
SEGMENT = 65_000  # a TCP segment as iperf3 over LSO/RSC gives it (payload + headers)


def tcp_frame(size: int) -> bytes:
    """An Ethernet + IPv4 + TCP frame of ``size`` bytes (checksums zero: nothing here verifies them)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 1, 0x4000, 64, 6, 0, bytes([169, 254, 0, 1]),
                     bytes([169, 254, 0, 2]))
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    return MAC_B + MAC_A + b"\x08\x00" + ip + tcp + bytes(size - 54)


class Pair:
    """A NetVSC and a NetVSP in memory, set up as the devices set them up (NVSP 6.1, RSC on)."""

    def __init__(self) -> None:
        self.recv, self.send = ByteBuffer(16 * 1024 * 1024), ByteBuffer(1024 * 1024)
        self.host = nethost.NvspHost(MAC_A)
        self.guest = netguest.NvspGuest(recv_gpadl=1, recv_view=self.recv, recv_size=self.recv.size, send_gpadl=2,
                                        send_view=self.send, send_size=self.send.size)
        self.guest.start()
        for _ in range(1000):
            a, b = self.guest.data_to_send(), self.host.data_to_send()
            if not a and not b:
                break
            for pkt in a:
                for event in self.host.receive(pkt):
                    if isinstance(event, nethost.ReceiveBufferRequested):
                        self.host.attach_receive_buffer(self.recv, self.recv.size)
                    elif isinstance(event, nethost.SendBufferRequested):
                        self.host.attach_send_buffer(self.send, self.send.size)
            for pkt in b:
                self.guest.receive(pkt)
        assert self.guest.ready and self.host.ready and self.host.rsc, "the pair did not come up with RSC"

    def to_host(self) -> float:
        """Hand what the guest queued to the host; the host's seconds."""
        out = self.guest.data_to_send()
        t0 = time.thread_time()
        for pkt in out:
            self.host.receive(pkt)
        return time.thread_time() - t0

    def to_guest(self) -> float:
        out = self.host.data_to_send()
        t0 = time.thread_time()
        for pkt in out:
            self.guest.receive(pkt)
        return time.thread_time() - t0


def _path(name: str, frames: int) -> dict[str, float]:
    pair = Pair()
    host_s = guest_s = 0.0
    small, big = tcp_frame(64), tcp_frame(SEGMENT)
    lso = rndis.PacketInfo(lso=rndis.LsoV2(1448, 34))
    rsc = rndis.PacketInfo(checksum=rndis.RX_IP_OK | rndis.RX_TCP_OK)
    step: Callable[[], None]
    if name.startswith("tx"):
        frame, info = (small, rndis.NO_INFO) if name == "tx64" else (big, lso)

        def step() -> None:
            nonlocal host_s, guest_s
            t0 = time.thread_time()
            pair.guest.send_frame(frame, info)
            guest_s += time.thread_time() - t0
            host_s += pair.to_host()
            guest_s += pair.to_guest()  # the completion
    else:
        batch = [(small, rndis.NO_INFO)] if name == "rx64" else [(big, rsc)]

        def step() -> None:
            nonlocal host_s, guest_s
            t0 = time.thread_time()
            pair.host.deliver(batch)
            host_s += time.thread_time() - t0
            guest_s += pair.to_guest()
            host_s += pair.to_host()  # the completion
    for _ in range(frames):
        step()
    return {"host_us": host_s / frames * 1e6, "guest_us": guest_s / frames * 1e6}


def run_path(frames: int = 20_000, repeat: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("tx64", "rx64", "tx_lso", "rx_rsc"):
        n = frames if name.endswith("64") else max(1, frames // 20)
        runs = [_path(name, n) for _ in range(repeat)]
        out[name] = {k: round(statistics.median(r[k] for r in runs), 2) for k in ("host_us", "guest_us")}
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.net_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=20_000, help="64-byte frames per run (a twentieth as many 64 KiB)")
    p.add_argument("--repeat", type=int, default=3, help="runs per path, median reported (default 3)")
    args = p.parse_args()
    print(json.dumps(run_path(args.frames, args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
