"""Shared-memory mode against a real parent (docs/protocol.md §14): the memfd a child passes with its HELLO and
what the parent refuses of it, rings a child scribbles on, and a storage round trip through the real tools
in both memory modes. Every bad child costs only its own connection: a bystander in shared mode, on the same
parent, never notices."""

from __future__ import annotations

import array
import contextlib
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmbus_proto.envelope import SHARED, Hello
from vmbus_proto.framing import ENVELOPE_VERSION, FrameKind, encode_frame
from vmbus_proto.packets import PAGE_SIZE, GpaRange, Packet, PacketType
from vmbus_proto.shm_ring import W_READ, GuestPages, RingOut, encode

from .conftest import Parent, Proc, bystander_of, child
from .rawclient import Closed, RawClient

pytestmark = pytest.mark.integration

BASE_PFN = 0x100
SIZE = 8 * 1024 * 1024
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def memfd(size: int = SIZE, seal: bool = True) -> int:
    fd = os.memfd_create("test-guest", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


class SharedClient(RawClient):
    """A raw client whose guest memory is a memfd it passes with its HELLO, so a test can write its rings by
    hand, wrongly too."""

    def __init__(self, url: str, fds: list[int] | None = None, size: int = SIZE) -> None:
        super().__init__(url)
        self.fds = [memfd(size)] if fds is None else fds
        self.map = mmap.mmap(self.fds[0], size) if fds is None else None
        self.pages = GuestPages(memoryview(self.map), BASE_PFN) if self.map is not None else None

    def hello_shared(self, name: str, memory: int | None = None) -> Hello:
        memory = memory or (BASE_PFN << 12) + SIZE
        hello = Hello(ENVELOPE_VERSION, name, memory=memory, memory_mode=SHARED, memory_base=BASE_PFN << 12)
        frame = encode_frame(FrameKind.HELLO, 0, hello.encode())
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.fds))] if self.fds else []
        self.sock.sendmsg([frame], anc)
        return Hello.decode(self.expect_kind(FrameKind.HELLO).body)

    def shared_channel(self, name: str, relid: int = 1, pages: int = 4) -> tuple[int, int]:
        """Negotiate with the shared HELLO and open channel ``relid`` (the heartbeat) on rings in our memory;
        returns the byte offsets of the guest-to-host and host-to-guest ring headers."""
        self.hello = self.hello_shared  # type: ignore[method-assign]  (negotiate sends our HELLO)
        self.negotiate(name)
        first = BASE_PFN + 0x10
        self.open(relid, pages, 0xE1E10, first_pfn=first)
        return (first - BASE_PFN) * PAGE_SIZE, (first - BASE_PFN + pages) * PAGE_SIZE

    def close(self) -> None:
        super().close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@pytest.fixture
def bystander_parent(parent: Parent, tmp_path: Path) -> Iterator[tuple[Parent, Proc]]:
    with bystander_of(parent, tmp_path) as vm:
        assert vm.wait_event("VMBus negotiated")
        yield parent, vm
    assert parent.proc.poll() is None, "the parent died"


def _closed_with(client: RawClient) -> str:
    with contextlib.suppress(Closed):
        client.wait_closed(30)
    return client.close_reason or ""


def _pipe_fd() -> list[int]:
    r, w = os.pipe()
    os.close(w)
    return [r]


@pytest.mark.parametrize(("fds", "reason"), [
    (lambda: [], "came without its memfd"),
    (lambda: [memfd(seal=False)], "not sealed against shrinking"),
    (lambda: [memfd(size=PAGE_SIZE)], "the memfd holds 4096 bytes"),
    (lambda: [memfd(), memfd()], "2 fds came with the HELLO"),
    (_pipe_fd, "not a memory file"),
], ids=["no-fd", "unsealed", "too-small", "two-fds", "a-pipe"])
def test_a_memfd_the_parent_cannot_take_is_refused(bystander_parent: tuple[Parent, Proc],
                                                   fds: Callable[[], list[int]], reason: str) -> None:
    parent, _ = bystander_parent
    client = SharedClient(parent.unix, fds=fds())
    with pytest.raises(Closed):
        client.hello_shared("bad-memory")
    assert reason in (client.close_reason or ""), client.close_reason
    assert client.close_code == "hello"
    client.close()


def test_a_shared_hello_on_tcp_is_refused(bystander_parent: tuple[Parent, Proc]) -> None:
    parent, _ = bystander_parent
    client = RawClient(parent.tcp)
    hello = Hello(ENVELOPE_VERSION, "tcp-shared", memory=(BASE_PFN << 12) + SIZE, memory_mode=SHARED,
                  memory_base=BASE_PFN << 12)
    client.send_frame(FrameKind.HELLO, 0, hello.encode())
    assert "came without its memfd" in _closed_with(client)
    client.close()


def test_the_parent_takes_a_good_memfd_and_answers_shared(bystander_parent: tuple[Parent, Proc]) -> None:
    parent, _ = bystander_parent
    client = SharedClient(parent.unix)
    assert client.hello_shared("good-memory").memory_mode == SHARED
    client.close()


def _scribble_write_index(pages: GuestPages, g2h: int, h2g: int) -> None:
    struct.pack_into("<I", pages.view, g2h, 12)  # an unaligned write_index


def _scribble_len8(pages: GuestPages, g2h: int, h2g: int) -> None:
    struct.pack_into("<HHHHQ", pages.view, g2h + PAGE_SIZE, int(PacketType.DATA_INBAND), 2, 300, 1, 7)
    struct.pack_into("<I", pages.view, g2h, 32)  # 32 bytes published; the descriptor claims 2,408


def _gpa_outside(pages: GuestPages, g2h: int, h2g: int) -> None:
    out = RingOut(pages.ring([(g2h // PAGE_SIZE) + BASE_PFN + i for i in range(4)]))
    beyond = BASE_PFN + SIZE // PAGE_SIZE + 5
    out.write(encode(Packet(PacketType.DATA_USING_GPA_DIRECT, 1, 9, b"x" * 8, (GpaRange(100, 0, (beyond,)),))))


def _scribble_read_index(pages: GuestPages, g2h: int, h2g: int) -> None:
    words = pages.view[h2g:h2g + PAGE_SIZE].cast("I")
    words[W_READ] = 4097 * 4  # the ring the parent writes: an index past its end
    words.release()


RING_G2H, RING_H2G = 0x10 * PAGE_SIZE, 0x14 * PAGE_SIZE  # where shared_channel puts the rings (4 pages each)


@pytest.mark.parametrize(("scribble", "before_open", "reason"), [
    (_scribble_write_index, False, "write_index 12 is not an 8-aligned offset"),
    (_scribble_len8, False, "packet of 2408 bytes with 32 published"),
    (_gpa_outside, False, "outside the partition's guest memory"),
    (_scribble_read_index, True, "read_index 16388"),  # found by the heartbeat's first packet to the guest
], ids=["write-index", "len8", "gpa-outside-memory", "read-index"])
def test_a_child_that_scribbles_on_its_rings_costs_only_its_connection(
        bystander_parent: tuple[Parent, Proc], scribble: Callable[[GuestPages, int, int], None], before_open: bool,
        reason: str) -> None:
    parent, vm = bystander_parent
    client = SharedClient(parent.unix)
    assert client.pages is not None
    if before_open:
        scribble(client.pages, RING_G2H, RING_H2G)
    # (the parent may close before the open completes, or before our event reaches it)
    with contextlib.suppress(Closed, BrokenPipeError, ConnectionResetError):
        g2h, h2g = client.shared_channel("scribbler")
        assert (g2h, h2g) == (RING_G2H, RING_H2G)
        if not before_open:
            scribble(client.pages, g2h, h2g)
        client.send_frame(FrameKind.EVENT, 1, b"")  # the channel's event: look at the ring
    got = _closed_with(client)
    assert reason in got, got
    client.close()
    # The parent says why in its log, and serves the next partition.
    assert parent.wait_event("protocol error, closing connection", partition="scribbler")
    healthy = SharedClient(parent.unix)
    healthy.shared_channel("healthy-after")
    healthy.close()
    assert not [e for e in vm.lines if e.get("level") == "error"]


def test_a_stream_frame_for_a_shared_channel_is_refused(bystander_parent: tuple[Parent, Proc]) -> None:
    parent, _ = bystander_parent
    client = SharedClient(parent.unix)
    client.shared_channel("mixed")
    client.send_packet(1, Packet(PacketType.DATA_INBAND, 0, 1, b"hi"))
    assert "PACKET frame for channel 1, whose rings are in shared memory" in _closed_with(client)
    client.close()


@pytest.mark.parametrize("mode", ["shared", "stream"])
def test_qemu_io_and_nbdcopy_through_either_memory_mode(parent: Parent, tmp_path: Path, mode: str) -> None:
    """The same disk traffic, real tools, over the Unix socket in each mode; the parent's log says which."""
    sock = tmp_path / "nbd.sock"
    vm = child(tmp_path, parent.unix, f"vm-{mode}", "--memory-mode", mode, "--nbd", f"unix:{sock}")
    try:
        vm.wait_event("disk exported over NBD", timeout=60)
        url = f"nbd+unix:///vm-{mode}?socket={sock}"
        io = _run(["qemu-io", "-f", "raw", "-c", "write -P 0xa5 1M 3M", "-c", "read -P 0xa5 1M 3M",
                   "-c", "read -P 0 0 1M", url])
        assert "Pattern verification failed" not in io, io
        copy = tmp_path / "copy.img"
        _run(["nbdcopy", url, str(copy)])
        data = copy.read_bytes()
        assert data[1 << 20:4 << 20] == b"\xa5" * (3 << 20) and not data[:1 << 20].strip(b"\0")
        connected = parent.wait_event("partition connected", partition=f"vm-{mode}")
        assert connected.get("memory") == ("shared" if mode == "shared" else None), connected
    finally:
        assert vm.stop() == 0


def _run(cmd: list[str]) -> str:
    import subprocess  # noqa: PLC0415

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, f"{cmd[0]} failed: {res.stderr or res.stdout}"
    return res.stdout


def test_a_unix_peer_that_never_says_hello_is_closed_with_the_reason(bystander_parent: tuple[Parent, Proc]) -> None:
    """A Unix peer's first bytes are read before its connection exists (with any fds): one that sends none gets
    the same CLOSE a silent TCP peer gets."""
    parent, _ = bystander_parent
    client = RawClient(parent.unix)
    assert "handshake timeout: no HELLO within 3s" in _closed_with(client)
    client.close()
