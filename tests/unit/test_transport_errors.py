"""A bug of ours in a Protocol callback costs that connection only: a CLOSE frame saying so, a log line with
the traceback, and no exception escaping into the event loop."""

from __future__ import annotations

import asyncio
import itertools
import socket
from types import SimpleNamespace
from typing import Any

import structlog
from structlog.testing import capture_logs

from parent_partition.config import Config
from parent_partition.connection import PartitionConnection
from parent_partition.counters import Totals
from vmbus_proto.aio.transport import FramedConnection
from vmbus_proto.envelope import decode_close_code
from vmbus_proto.framing import Frame, FrameDecoder, FrameKind, frame_parts
from vmbus_proto.limits import MemoryBudget


class Buggy(FramedConnection):
    def on_control(self, frame: Frame) -> None:
        raise RuntimeError("a bug in the handler")


async def test_an_exception_in_a_frame_handler_closes_that_connection_with_a_reason() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    with capture_logs() as logs:
        _, conn = await loop.create_connection(Buggy, sock=ours)
        await loop.sock_sendall(theirs, b"".join(frame_parts(FrameKind.CONTROL, 0, b"\x80")))
        decoder, frames = FrameDecoder(1 << 20), []
        while not frames:
            chunk = await asyncio.wait_for(loop.sock_recv(theirs, 65536), 10)
            assert chunk, "the connection closed without a CLOSE frame"
            buf = decoder.get_buffer(len(chunk))
            buf[:len(chunk)] = chunk
            frames = list(decoder.buffer_updated(len(chunk)))
        await asyncio.wait_for(conn.closed_future, 10)
    theirs.close()
    assert frames[0].kind == FrameKind.CLOSE
    assert decode_close_code(frames[0].body)[0] == "internal error: RuntimeError"
    logged = [e for e in logs if e["log_level"] == "error"]
    assert logged and "internal error" in str(logged[0]["event"]) and logged[0].get("exc_info"), logs
    assert not errors, errors  # nothing reached the loop's exception handler


async def test_a_device_operation_that_raises_closes_only_that_partitions_connection() -> None:
    """PartitionConnection runs device opens, closes and GPADL teardowns as tasks: one that raises is our bug,
    logged with its traceback, and the partition's connection closes with a CLOSE frame saying so."""
    loop = asyncio.get_running_loop()
    daemon: Any = SimpleNamespace(config=Config(), log=structlog.get_logger(), accepting=True, connections=set(),
                                  partitions={}, vsps=[], name="parent", totals=Totals(), budget=MemoryBudget(1 << 30),
                                  partitions_changed=lambda: None)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    with capture_logs() as logs:
        _, conn = await loop.create_connection(lambda: PartitionConnection(daemon, "test"), sock=ours)

        async def broken() -> None:
            raise KeyError("a device name the connection does not know")

        conn._spawn(broken())
        frames = await _frames(theirs)
        await asyncio.wait_for(conn.closed_future, 10)
    theirs.close()
    assert decode_close_code(frames[0].body)[0] == "internal error: KeyError"
    assert any(e["event"].startswith("internal error in a device operation") and e.get("exc_info") for e in logs)


async def _frames(sock: socket.socket) -> list[Frame]:
    loop = asyncio.get_running_loop()
    decoder, frames = FrameDecoder(1 << 20), []
    while not frames:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        assert chunk, "the connection closed without a CLOSE frame"
        buf = decoder.get_buffer(len(chunk))
        buf[:len(chunk)] = chunk
        frames = list(decoder.buffer_updated(len(chunk)))
    return frames


async def test_the_guest_drops_host_packets_for_a_channel_it_closed_quietly_and_warns_for_others() -> None:
    from child_partition.bus import GuestBus  # noqa: PLC0415
    from vmbus_proto.aio.channel import Channel  # noqa: PLC0415
    from vmbus_proto.channel import ChannelRings  # noqa: PLC0415

    bus = GuestBus("vm1", log=structlog.get_logger())
    rings = ChannelRings(5, host=False, guest_to_host_data=4096, host_to_guest_data=4096)
    bus.add_channel(Channel(bus, 5, rings, log=structlog.get_logger()))
    bus.close_channel(5)
    with capture_logs() as logs:
        bus.on_unknown_channel(Frame(FrameKind.SIGNAL, 5, b""))  # the host's packet crossed our CLOSECHANNEL
        bus.on_unknown_channel(Frame(FrameKind.SIGNAL, 9, b""))  # a relid never open here
    levels = {e["relid"]: e["log_level"] for e in logs}
    assert levels == {5: "debug", 9: "warning"}, logs


class Counting(FramedConnection):
    """Counts SIGNAL frames for relids never opened, in the order of their relids."""

    def __init__(self) -> None:
        super().__init__(log=structlog.get_logger())
        self.seen: list[int] = []

    def on_unknown_channel(self, frame: Frame) -> None:
        self.seen.append(frame.relid)


async def test_one_peers_flood_is_handled_a_turn_at_a_time_in_order() -> None:
    """10,000 small frames in one write: at most FRAMES_PER_TURN of them between two turns of the event loop
    (another connection's callbacks run in between), all of them in the order sent, and reading resumes."""
    from vmbus_proto.aio.transport import FRAMES_PER_TURN  # noqa: PLC0415
    from vmbus_proto.envelope import Signal  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    _, conn = await loop.create_connection(Counting, sock=ours)
    n = 10_000
    samples: list[int] = []

    def tick() -> None:  # once per turn of the loop: how many frames the connection has handled so far
        samples.append(len(conn.seen))
        if len(conn.seen) < n and len(samples) < 1_000_000:
            loop.call_soon(tick)

    tick()
    await loop.sock_sendall(theirs, b"".join(
        b"".join(frame_parts(FrameKind.SIGNAL, 1 + i, Signal(0).encode())) for i in range(n)))
    while len(conn.seen) < n and len(samples) < 1_000_000:
        await asyncio.sleep(0)
    assert len(conn.seen) == n, f"only {len(conn.seen)} of {n} frames handled"
    per_turn = [b - a for a, b in itertools.pairwise(samples)]
    assert max(per_turn) <= FRAMES_PER_TURN, f"{max(per_turn)} frames handled in one turn of the loop"
    assert conn.seen == [1 + i for i in range(n)], "frames handled out of order"
    await loop.sock_sendall(theirs, b"".join(frame_parts(FrameKind.SIGNAL, 7, Signal(0).encode())))
    while len(conn.seen) == n:  # reading was resumed: a later frame still arrives
        await asyncio.sleep(0)
    assert conn.seen[-1] == 7
    conn.transport.close()
    theirs.close()
