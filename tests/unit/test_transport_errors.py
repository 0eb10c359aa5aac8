"""A bug of ours in a Protocol callback costs that connection only: a CLOSE frame saying so, a log line with
the traceback, and no exception escaping into the event loop."""

from __future__ import annotations

import asyncio
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
                                  partitions={}, vsps=[], name="parent", totals=Totals(),
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
