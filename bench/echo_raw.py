"""Baseline (a): a raw uvloop ``asyncio.Protocol`` echo server and a pipelined client.

The server (``python -m bench.echo_raw``, run as its own process) writes back whatever it reads, on
127.0.0.1 TCP and on a Unix socket. The client keeps a fixed window of ``size``-byte messages in flight
and counts completed round trips as echoed bytes / ``size``. This is the ceiling a Python asyncio
server on uvloop reaches with no protocol at all; the VMBus path (b) is compared against it.

The same process also serves a *framed* echo (a'), for context only: each message starts with its u32
length and the server splits the stream into messages, copies each out and writes them back joined once
per read, as ``FramedConnection`` does. It shows what touching every message in Python costs before any
VMBus work is done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import uvloop

from .meter import CpuMeter
from .parent import REPO_ROOT, child_env


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class EchoServer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


LENGTH = struct.Struct("<I")


class FramedEchoServer(EchoServer):
    """Echo per message: split on the u32 length prefix, copy each message, write them back joined."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = len(buf)
        pos = 0
        out = []
        unpack = LENGTH.unpack_from
        while end - pos >= 4:
            (length,) = unpack(buf, pos)
            if length < 4:
                self.transport.close()
                return
            if end - pos < length:
                break
            out.append(bytes(buf[pos:pos + length]))
            pos += length
        if pos:
            del buf[:pos]
        if out:
            self.transport.write(b"".join(out))


async def _serve(unix_path: str) -> None:
    loop = asyncio.get_running_loop()
    servers = {
        "tcp": await loop.create_server(EchoServer, "127.0.0.1", 0, backlog=128),
        "unix": await loop.create_unix_server(EchoServer, unix_path),
        "framed_tcp": await loop.create_server(FramedEchoServer, "127.0.0.1", 0, backlog=128),
        "framed_unix": await loop.create_unix_server(FramedEchoServer, unix_path + ".framed"),
    }
    urls = {}
    for key, server in servers.items():
        name = server.sockets[0].getsockname()
        urls[key] = f"tcp://127.0.0.1:{name[1]}" if key.endswith("tcp") else f"unix:{name}"
    print(json.dumps(urls), flush=True)
    # Serve until the benchmark closes our stdin (so we never outlive it).
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    for server in servers.values():
        server.close()


MAX_ROUND_TRIPS = 100_000_000  # a count bound on top of the time bound; a capped run is flagged


class EchoClient(asyncio.Protocol):
    """Keeps ``window`` messages in flight; each echoed ``size`` bytes completes one and sends the next."""

    def __init__(self, size: int, window: int) -> None:
        self.size = size
        self.window = window
        # The first 4 bytes are the message length, so the framed server (a') can split the stream.
        self.msg = LENGTH.pack(size) + (bytes(range(256)) * (size // 256 + 1))[:size - 4]
        self.received = 0
        self.completed = 0
        self.sending = True
        self.completed_at_stop = 0
        self.transport: asyncio.Transport | None = None
        self.drained: asyncio.Future[None] = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        self.transport.write(self.msg * self.window)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        done = self.received // self.size - self.completed
        if not done:
            return
        self.completed += done
        if self.sending and self.completed >= MAX_ROUND_TRIPS:
            self.stop()
        elif self.sending:
            assert self.transport is not None
            self.transport.write(self.msg * done if done > 1 else self.msg)
        elif self.received >= self.sent_total() and not self.drained.done():
            self.drained.set_result(None)

    def sent_total(self) -> int:
        return (self.completed_at_stop + self.window) * self.size

    def stop(self) -> None:
        if not self.sending:
            return
        self.sending = False
        self.completed_at_stop = self.completed
        if self.received >= self.sent_total() and not self.drained.done():
            self.drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.drained.done():
            self.drained.set_exception(ConnectionError(f"echo connection lost: {exc}"))


async def measure(url: str, size: int, window: int, seconds: float, warmup: float,
                  server_pid: int | None = None) -> dict[str, Any]:
    """Round trips per second over ``seconds`` after ``warmup``, pipelined ``window`` deep."""
    loop = asyncio.get_running_loop()
    client = EchoClient(size, window)
    if url.startswith("tcp://"):
        host, port = url[6:].rsplit(":", 1)
        transport, _ = await loop.create_connection(lambda: client, host, int(port))
    else:
        transport, _ = await loop.create_unix_connection(lambda: client, url[5:])
    meter = CpuMeter(server_pid)
    await asyncio.sleep(warmup)
    c0, t0 = client.completed, time.perf_counter()
    meter.start()
    await asyncio.sleep(seconds)
    c1, t1 = client.completed, time.perf_counter()
    cpu = meter.stop(c1 - c0)
    client.stop()
    await asyncio.wait_for(client.drained, 10.0)
    transport.close()
    elapsed = t1 - t0
    rate = (c1 - c0) / elapsed
    return {"round_trips": c1 - c0, "seconds": elapsed, "rtt_per_s": rate, "mb_per_s": rate * size / 1e6,
            "capped": client.completed >= MAX_ROUND_TRIPS, **cpu}


class EchoServerProcess:
    """The raw echo server in its own process, like the parent daemon in (b)."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.echo_raw", "--unix", str(workdir / "echo.sock")],
                                     cwd=str(REPO_ROOT), env=child_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"raw echo server exited with {self.proc.wait(10)}")
        self.urls: dict[str, str] = json.loads(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description="raw uvloop echo server (benchmark baseline)")
    p.add_argument("--unix", required=True, help="Unix socket path to listen on")
    args = p.parse_args()
    uvloop.run(_serve(args.unix))


if __name__ == "__main__":
    main()
