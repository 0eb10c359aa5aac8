"""Accepting children on a Unix socket, where a child's guest memory may arrive with its HELLO.

Shared-memory mode (docs/protocol.md §14) is the socket form of a Hyper-V host mapping guest pages: the
child passes a sealed memfd with SCM_RIGHTS on the first bytes it sends. asyncio's transports cannot take
ancillary data, so each accepted socket's first read is a ``recvmsg`` here; then the socket becomes a
``PartitionConnection`` as on any listener, fed those first bytes and holding the fd (``memfd``).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any

from vmbus_proto.envelope import encode_close
from vmbus_proto.framing import FrameKind, encode_frame

FIRST_READ = 64 * 1024  # a HELLO is far smaller; what else came is fed to the connection as read
MAX_FDS = 4  # SCM_RIGHTS fds taken from the first message (one is allowed; more are closed and refused)


class FirstMessage:
    """What a Unix child's first read brought: bytes, and the fds that came with them (to be closed by the
    connection that takes them, or here when none does)."""

    def __init__(self, data: bytes, fds: list[int], truncated: bool) -> None:
        self.data, self.fds, self.truncated = data, fds, truncated

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    out: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            out.extend(fds)
    return out


async def first_message(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> FirstMessage:
    """Wait for the socket's first bytes and take them with their fds (MSG_CMSG_CLOEXEC)."""
    while True:
        try:
            data, anc, flags, _ = sock.recvmsg(FIRST_READ, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), _set, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        return FirstMessage(data, _fds(anc), bool(flags & socket.MSG_CTRUNC))


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class UnixAcceptor:
    """A Unix listener's accept loop (``asyncio.Server``'s ``close`` and ``wait_closed`` for the daemon):
    each child's first message is read with its fds, within ``timeout``, then ``factory(first)`` makes the
    protocol the socket is handed to."""

    def __init__(self, sock: socket.socket, factory: Callable[[FirstMessage], asyncio.BaseProtocol],
                 timeout: float, log: Any) -> None:
        self.sock, self.factory, self.timeout, self.log = sock, factory, timeout, log
        sock.setblocking(False)
        self.sockets = [sock]
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._accept())
        self._starting: set[asyncio.Task[None]] = set()

    async def _accept(self) -> None:
        loop = self._loop
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: keep listening, as asyncio's own server does
                self.log.warning("accept failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._start(conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout):
                first = await first_message(self._loop, conn)
        except TimeoutError:
            # As a partition connection's own handshake timer says it (with a CLOSE frame the peer can read).
            reason = f"handshake timeout: no HELLO within {self.timeout:g}s"
            self.log.info("protocol error, closing connection", error=reason)
            with contextlib.suppress(OSError):
                conn.send(encode_frame(FrameKind.CLOSE, 0, encode_close(reason)))
            conn.close()
            return
        except OSError as exc:
            self.log.info("unix connection closed before its first message", error=str(exc))
            conn.close()
            return
        if not first.data:
            first.close()
            conn.close()
            return
        try:
            await self._loop.connect_accepted_socket(lambda: self.factory(first), conn)
        except BaseException:
            first.close()
            conn.close()
            raise

    def close(self) -> None:
        self._task.cancel()
        for task in self._starting:
            task.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._task, *self._starting, return_exceptions=True)
