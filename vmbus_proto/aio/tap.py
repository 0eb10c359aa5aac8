"""TAP devices (Linux ``/dev/net/tun``, Documentation/networking/tuntap.rst) on the asyncio loop.

``Tap.open(name)`` creates (or attaches to) a TAP interface with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, sets
``TUNSETVNETHDRSZ`` 12 (``struct virtio_net_hdr_v1``) and ``TUNSETOFFLOAD`` ``TUN_F_CSUM | TUN_F_TSO4 |
TUN_F_TSO6`` (so the kernel hands us checksum-offloaded frames and TCP segments of up to 64 KiB instead of
MTU-sized ones, as it does to a virtio-net or Hyper-V NIC), brings the link up (``SIOCSIFFLAGS``) and can move
it into a network namespace (``ip link set dev NAME netns NS``: the file descriptor keeps working there).

Every frame read or written is one ``read``/``write`` of the 12-byte header followed by the Ethernet frame;
``start(on_frames)`` reads in batches from ``loop.add_reader`` until the fd is drained (or a batch limit), and
``write`` never blocks: a frame the kernel refuses (EAGAIN) is dropped and counted, as a NIC's full ring would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import socket
import struct
import subprocess
from collections.abc import Callable

from vmbus_proto.devices.network import vnet

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFNAMSIZ = 16
# One read: the header plus the largest GSO frame the kernel builds (64 KiB IP datagram + Ethernet + VLAN).
READ_SIZE = vnet.HDR_V1_LEN + 65535 + 18


class TapError(OSError):
    """A TAP device could not be created or configured; the message says which step and why."""


@dataclasses.dataclass
class TapCounters:
    rx_frames: int = 0      # read from the kernel
    rx_bytes: int = 0
    rx_errors: int = 0      # unreadable virtio-net headers
    tx_frames: int = 0      # written to the kernel
    tx_bytes: int = 0
    tx_dropped: int = 0     # refused by the kernel (EAGAIN, or an error for that frame)


def _ifreq(name: str, data: bytes = b"") -> bytearray:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise TapError(f"interface name {name!r}: 1..{IFNAMSIZ - 1} bytes")
    return bytearray(struct.pack("16s", raw) + data.ljust(24, b"\0"))


class Tap:
    """One open TAP device. Frames in and out are ``(VnetHdr, bytes)`` with ``vnet_hdr``, plain bytes without."""

    def __init__(self, fd: int, name: str, vnet_hdr: bool, netns: str | None) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.netns = netns
        self.counters = TapCounters()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(cls, name: str, *, vnet_hdr: bool = True, offload: bool = True, up: bool = True,
             mtu: int | None = None, netns: str | None = None) -> Tap:
        """Create TAP ``name`` (needs CAP_NET_ADMIN), configured as the module docstring says."""
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(e.errno, f"cannot open /dev/net/tun for TAP {name}: {e.strerror}") from None
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            _ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("H", flags)), f"TUNSETIFF {name}")
            if vnet_hdr:
                _ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", vnet.HDR_V1_LEN), f"TUNSETVNETHDRSZ {name}")
                if offload:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            tap = cls(fd, name, vnet_hdr, None)
            if mtu is not None:
                tap._sock_ioctl(SIOCSIFMTU, struct.pack("i", mtu), "SIOCSIFMTU")
            if netns is not None:
                tap.move_to(netns)
            if up:
                tap.set_up()
            return tap
        except BaseException:
            os.close(fd)
            raise

    # -- link configuration --------------------------------------------------------------------------------
    def _sock_ioctl(self, request: int, data: bytes, what: str) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return _ioctl(s.fileno(), request, _ifreq(self.name, data), f"{what} {self.name}")

    def set_up(self) -> None:
        """Bring the link up (``SIOCSIFFLAGS`` here, ``ip -n NS link set up`` once moved to a namespace)."""
        if self.netns is not None:
            _ip("-n", self.netns, "link", "set", "dev", self.name, "up")
            return
        flags = struct.unpack_from("H", self._sock_ioctl(SIOCGIFFLAGS, b"", "SIOCGIFFLAGS"), 16)[0]
        self._sock_ioctl(SIOCSIFFLAGS, struct.pack("H", flags | IFF_UP), "SIOCSIFFLAGS")

    def move_to(self, netns: str) -> None:
        """Move the interface into network namespace ``netns`` (the fd stays ours; the link goes down)."""
        _ip("link", "set", "dev", self.name, "netns", netns)
        self.netns = netns

    def mac(self) -> bytes:
        if self.netns is not None:
            out = _ip("-n", self.netns, "-br", "link", "show", "dev", self.name)
            return bytes.fromhex(out.split()[2].replace(":", ""))
        return self._sock_ioctl(SIOCGIFHWADDR, b"", "SIOCGIFHWADDR")[18:24]

    # -- frames --------------------------------------------------------------------------------------------
    def read_batch(self, max_frames: int = 64) -> list[tuple[vnet.VnetHdr, bytes]]:
        """Up to ``max_frames`` frames waiting in the kernel, without blocking (empty when none)."""
        out: list[tuple[vnet.VnetHdr, bytes]] = []
        c = self.counters
        for _ in range(max_frames):
            try:
                raw = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            if self.vnet_hdr:
                try:
                    hdr = vnet.VnetHdr.unpack(raw)
                except ValueError:
                    c.rx_errors += 1
                    continue
                frame = raw[vnet.HDR_V1_LEN:]
            else:
                hdr, frame = vnet.NO_OFFLOAD, raw
            c.rx_frames += 1
            c.rx_bytes += len(frame)
            out.append((hdr, frame))
        return out

    def write(self, frame: bytes, hdr: vnet.VnetHdr | None = None) -> bool:
        """Hand one frame to the kernel; False (counted in ``tx_dropped``) when it refuses it. Never blocks."""
        if self.vnet_hdr:
            head = vnet.NO_OFFLOAD_V1 if hdr is None else hdr.pack()
            buffers = [head, frame]
        else:
            if hdr is not None and hdr.gso:
                self.counters.tx_dropped += 1
                return False
            buffers = [vnet.complete(frame, hdr) if hdr is not None else frame]
        try:
            os.writev(self.fd, buffers)
        except OSError:  # EAGAIN (queue full), EINVAL (a header the kernel rejects), EIO (link down)
            self.counters.tx_dropped += 1
            return False
        self.counters.tx_frames += 1
        self.counters.tx_bytes += len(frame)
        return True

    def start(self, on_frames: Callable[[list[tuple[vnet.VnetHdr, bytes]]], None], batch: int = 64) -> None:
        """Call ``on_frames(batch)`` from the running loop whenever the kernel has frames for us."""
        self._loop = asyncio.get_running_loop()

        def readable() -> None:
            frames = self.read_batch(batch)
            if frames:
                on_frames(frames)

        self._loop.add_reader(self.fd, readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None

    def close(self) -> None:
        """Stop reading and close the fd (the kernel deletes a non-persistent TAP with its last fd)."""
        self.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ioctl(fd: int, request: int, arg: bytes | bytearray, what: str) -> bytes:
    try:
        return bytes(fcntl.ioctl(fd, request, bytes(arg)))
    except OSError as e:
        raise TapError(e.errno, f"{what}: {e.strerror}") from None


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise TapError("the 'ip' command (iproute2) is not installed") from None
    if done.returncode != 0:
        raise TapError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def delete_link(name: str, netns: str | None = None) -> None:
    """Delete interface ``name`` (in ``netns``), ignoring one that is already gone."""
    with contextlib.suppress(TapError):
        _ip(*(["-n", netns] if netns else []), "link", "del", "dev", name)
