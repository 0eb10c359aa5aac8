"""The NBD server against a handwritten client on real Unix and loopback TCP sockets: golden handshake bytes,
option haggling, every command, limits and errors, pipelining, and disconnects (NBD proto.md)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import random
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from child_partition.devices.storage import nbd
from child_partition.devices.storage.blockdev import BlockDevice, BlockDeviceError, FileBlockDevice, MemoryBlockDevice
from child_partition.devices.storage.nbd import NbdServer, parse_listen
from vmbus_proto.aio import logs

MiB = 1024 * 1024
SIZE = 4 * MiB
TIMEOUT = 5.0


class RecordingDevice(MemoryBlockDevice):
    """A memory disk that records every request, can hold reads or writes at given offsets until released,
    and can fail on demand."""

    def __init__(self, size: int = SIZE, read_only: bool = False, *, max_transfer: int = MiB) -> None:
        super().__init__(size, read_only, max_transfer=max_transfer)
        self.calls: list[tuple[str, int, int, bool]] = []
        self.gates: dict[tuple[str, int], asyncio.Event] = {}
        self.hold_all: asyncio.Event | None = None
        self.read_delay = 0.0
        self.active = 0
        self.peak = 0
        self.fail: dict[str, BaseException] = {}
        self.extents: list[tuple[int, int]] | None = None

    async def _enter(self, op: str, offset: int) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if op in self.fail:
                raise self.fail[op]
            gate = self.gates.get((op, offset))
            if gate is not None:
                await gate.wait()
            if self.hold_all is not None:
                await self.hold_all.wait()
        finally:
            self.active -= 1

    async def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length, False))
        await self._enter("read", offset)
        if self.read_delay:
            await asyncio.sleep(self.read_delay)
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.calls.append(("write", offset, len(data), fua))
        await self._enter("write", offset)
        await super().write(offset, data, fua)

    async def flush(self) -> None:
        self.calls.append(("flush", 0, 0, False))
        await self._enter("flush", 0)
        await super().flush()

    async def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length, False))
        await self._enter("discard", offset)
        await super().discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.calls.append(("write_zeroes", offset, length, may_unmap))
        await self._enter("write_zeroes", offset)
        await super().write_zeroes(offset, length, may_unmap)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``self.extents`` (a map of the whole disk: (length, flags)) cut to start at ``offset``."""
        self.calls.append(("block_status", offset, length, False))
        await self._enter("block_status", offset)
        if self.extents is None:
            return await super().block_status(offset, length)
        out, pos = [], 0
        for n, flags in self.extents:
            if pos + n > offset:
                out.append((pos + n - max(pos, offset), flags))
            pos += n
        return out

    def ops(self, op: str) -> list[tuple[str, int, int, bool]]:
        return [c for c in self.calls if c[0] == op]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (up to TIMEOUT) for ``condition``; fail saying ``what`` did not happen."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {TIMEOUT} s")
        await asyncio.sleep(0.005)


class Client:
    """Just enough of an NBD client to drive the server byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reads: dict[int, int] = {}  # handle -> length, for READ replies that carry data
        self.handle = 0
        self.tflags = 0
        self.size = 0

    @classmethod
    async def connect(cls, address: str) -> Client:
        kind, where, port = parse_listen(address)
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(where, limit=64 * MiB)
        else:
            reader, writer = await asyncio.open_connection(where, port, limit=64 * MiB)
        return cls(reader, writer)

    async def recv(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def closed(self) -> bool:
        """True when the server has hung up (EOF or reset) without sending anything more. Closes this end."""
        try:
            return await asyncio.wait_for(self.reader.read(1), TIMEOUT) == b""
        except ConnectionError:
            return True
        finally:
            await self.close()

    async def greeting(self, cflags: int = nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES) -> bytes:
        hello = await self.recv(18)
        self.send(struct.pack(">I", cflags))
        return hello

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)

    async def opt_reply(self, opt: int) -> tuple[int, bytes]:
        magic, got, rep, length = struct.unpack(">QIII", await self.recv(20))
        assert magic == nbd.OPT_REPLY_MAGIC and got == opt
        return rep, await self.recv(length)

    @staticmethod
    def info_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)

    async def info(self, opt: int, name: str = "", infos: tuple[int, ...] = ()) -> tuple[int, dict[int, bytes]]:
        """NBD_OPT_INFO or NBD_OPT_GO; the final reply type and the info payloads by type."""
        self.option(opt, self.info_data(name, infos))
        got: dict[int, bytes] = {}
        while True:
            rep, data = await self.opt_reply(opt)
            if rep != nbd.NBD_REP_INFO:
                if rep == nbd.NBD_REP_ACK and opt == nbd.NBD_OPT_GO:
                    self.size, self.tflags = struct.unpack(">QH", got[nbd.NBD_INFO_EXPORT])
                return rep, got
            (kind,) = struct.unpack_from(">H", data)
            assert kind not in got
            got[kind] = data[2:]

    async def go(self, name: str = "", infos: tuple[int, ...] = ()) -> dict[int, bytes]:
        rep, got = await self.info(nbd.NBD_OPT_GO, name, infos)
        assert rep == nbd.NBD_REP_ACK
        return got

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"",
                handle: int | None = None) -> int:
        if handle is None:
            self.handle += 1
            handle = self.handle
        if cmd == nbd.NBD_CMD_READ:
            self.reads[handle] = length
        self.send(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload)
        return handle

    async def reply(self) -> tuple[int, int, bytes]:
        """(handle, error, data) of the next simple reply, whichever request it answers."""
        magic, error, handle = struct.unpack(">IIQ", await self.recv(16))
        assert magic == nbd.NBD_SIMPLE_REPLY_MAGIC
        length = self.reads.pop(handle, 0)
        return handle, error, (await self.recv(length) if length and not error else b"")

    async def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                   payload: bytes = b"") -> tuple[int, bytes]:
        handle = self.request(cmd, offset, length, flags, payload)
        got, error, data = await self.reply()
        assert got == handle
        return error, data

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        error, data = await self.call(nbd.NBD_CMD_READ, offset, length, flags)
        assert error == 0
        return data

    async def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        return (await self.call(nbd.NBD_CMD_WRITE, offset, len(data), flags, data))[0]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nbd", dir="/tmp") as d:  # short: sun_path is 108 bytes
        yield Path(d)


@pytest.fixture
def device() -> RecordingDevice:
    return RecordingDevice(SIZE, max_transfer=64 * 1024)


@pytest.fixture
async def server(device: RecordingDevice, sockdir: Path) -> AsyncIterator[NbdServer]:
    srv = NbdServer(device, "disk", description="the vm1 disk")
    await srv.start(f"unix:{sockdir / 'nbd.sock'}")
    yield srv
    await srv.close(grace=1.0)


async def connected(server: NbdServer, infos: tuple[int, ...] = ()) -> Client:
    c = await Client.connect(server.address)
    await c.greeting()
    await c.go("disk", infos)
    return c


async def serve(device: BlockDevice, sockdir: Path, max_inflight: int = nbd.MAX_INFLIGHT,
                max_inflight_bytes: int = nbd.MAX_INFLIGHT_BYTES) -> NbdServer:
    srv = NbdServer(device, "disk", max_inflight=max_inflight, max_inflight_bytes=max_inflight_bytes)
    await srv.start(f"unix:{sockdir / 'other.sock'}")
    return srv


EXPECTED_FLAGS = (nbd.NBD_FLAG_HAS_FLAGS | nbd.NBD_FLAG_SEND_FLUSH | nbd.NBD_FLAG_SEND_FUA | nbd.NBD_FLAG_SEND_TRIM
                  | nbd.NBD_FLAG_SEND_WRITE_ZEROES | nbd.NBD_FLAG_CAN_MULTI_CONN)


# -- handshake -------------------------------------------------------------------------------------------------


async def test_greeting_and_export_name_reply_are_the_golden_bytes(server: NbdServer) -> None:
    assert EXPECTED_FLAGS == 0x016D
    c = await Client.connect(server.address)
    assert await c.greeting(nbd.NBD_FLAG_C_FIXED_NEWSTYLE) == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    c.option(nbd.NBD_OPT_EXPORT_NAME, b"disk")
    assert await c.recv(10 + 124) == struct.pack(">QH", SIZE, 0x016D) + bytes(124)
    assert await c.write(0, b"x" * 512) == 0
    await c.close()

    # With NBD_FLAG_C_NO_ZEROES the 124 zero bytes are left out; the default export is the empty name.
    c = await Client.connect(server.address)
    await c.greeting(nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES)
    c.option(nbd.NBD_OPT_EXPORT_NAME, b"")
    assert await c.recv(10) == b"\x00\x00\x00\x00\x00\x40\x00\x00\x01\x6d"
    assert await c.read(0, 4) == b"xxxx"
    await c.close()


async def test_unknown_client_flags_and_bad_option_magic_hang_up(server: NbdServer) -> None:
    c = await Client.connect(server.address)
    await c.greeting(nbd.NBD_FLAG_C_FIXED_NEWSTYLE | 0x4)
    assert await c.closed()

    c = await Client.connect(server.address)
    await c.greeting()
    c.send(struct.pack(">QII", 0x1122334455667788, nbd.NBD_OPT_LIST, 0))
    assert await c.closed()


async def test_export_name_for_an_unknown_export_hangs_up(server: NbdServer) -> None:
    c = await Client.connect(server.address)
    await c.greeting()
    c.option(nbd.NBD_OPT_EXPORT_NAME, b"nope")
    assert await c.closed()


async def test_opt_list_names_the_export(server: NbdServer) -> None:
    c = await Client.connect(server.address)
    await c.greeting()
    c.option(nbd.NBD_OPT_LIST)
    assert await c.opt_reply(nbd.NBD_OPT_LIST) == (nbd.NBD_REP_SERVER, b"\x00\x00\x00\x04disk" + b"the vm1 disk")
    assert await c.opt_reply(nbd.NBD_OPT_LIST) == (nbd.NBD_REP_ACK, b"")
    c.option(nbd.NBD_OPT_LIST, b"junk")
    assert (await c.opt_reply(nbd.NBD_OPT_LIST))[0] == nbd.NBD_REP_ERR_INVALID
    c.option(nbd.NBD_OPT_ABORT)
    assert await c.opt_reply(nbd.NBD_OPT_ABORT) == (nbd.NBD_REP_ACK, b"")
    assert await c.closed()


async def test_opt_info_answers_every_info_type_then_go_enters_transmission(server: NbdServer) -> None:
    c = await Client.connect(server.address)
    await c.greeting()
    wanted = (nbd.NBD_INFO_NAME, nbd.NBD_INFO_DESCRIPTION, nbd.NBD_INFO_BLOCK_SIZE, 0x7777)
    rep, infos = await c.info(nbd.NBD_OPT_INFO, "", wanted)
    assert rep == nbd.NBD_REP_ACK
    assert infos == {
        nbd.NBD_INFO_EXPORT: struct.pack(">QH", SIZE, EXPECTED_FLAGS),
        nbd.NBD_INFO_NAME: b"disk",
        nbd.NBD_INFO_DESCRIPTION: b"the vm1 disk",
        # minimum 1 (read-modify-write), preferred 4096, maximum max_transfer raised to 1 MiB
        nbd.NBD_INFO_BLOCK_SIZE: struct.pack(">III", 1, 4096, MiB),
    }
    # Without requests only NBD_INFO_EXPORT is mandatory; block sizes are volunteered.
    rep, infos = await c.info(nbd.NBD_OPT_INFO, "disk")
    assert rep == nbd.NBD_REP_ACK and set(infos) == {nbd.NBD_INFO_EXPORT, nbd.NBD_INFO_BLOCK_SIZE}
    await c.go("disk")
    assert (c.size, c.tflags) == (SIZE, EXPECTED_FLAGS)
    assert await c.write(4096, b"abc") == 0
    assert await c.read(4095, 5) == b"\0abc\0"
    await c.close()


async def test_unknown_export_is_err_unknown_and_haggling_goes_on(server: NbdServer) -> None:
    c = await Client.connect(server.address)
    await c.greeting()
    assert (await c.info(nbd.NBD_OPT_INFO, "nope"))[0] == nbd.NBD_REP_ERR_UNKNOWN
    assert await c.info(nbd.NBD_OPT_GO, "nope") == (nbd.NBD_REP_ERR_UNKNOWN, {})
    await c.go("disk")
    assert await c.read(0, 8) == bytes(8)
    await c.close()


async def test_bad_meta_context_requests_tls_and_unknown_options_are_refused(server: NbdServer) -> None:
    c = await Client.connect(server.address)
    await c.greeting()
    refused = [
        # SET_META_CONTEXT before structured replies were negotiated
        (nbd.NBD_OPT_SET_META_CONTEXT, b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x0fbase:allocation",
         nbd.NBD_REP_ERR_INVALID),
        (nbd.NBD_OPT_LIST_META_CONTEXT, b"\0\0\0\0\0\0\0\x01\0\0\0\x09base", nbd.NBD_REP_ERR_INVALID),  # overruns
        (nbd.NBD_OPT_LIST_META_CONTEXT, b"\0\0\0\x04nope\0\0\0\0", nbd.NBD_REP_ERR_UNKNOWN),
        (nbd.NBD_OPT_STRUCTURED_REPLY, b"x", nbd.NBD_REP_ERR_INVALID),
        (nbd.NBD_OPT_STARTTLS, b"", nbd.NBD_REP_ERR_UNSUP),
        (nbd.NBD_OPT_EXTENDED_HEADERS, b"", nbd.NBD_REP_ERR_UNSUP),
        (nbd.NBD_OPT_PEEK_EXPORT, b"", nbd.NBD_REP_ERR_UNSUP),
        (4242, b"whatever", nbd.NBD_REP_ERR_UNSUP),
        (nbd.NBD_OPT_INFO, b"\0\0", nbd.NBD_REP_ERR_INVALID),  # too short
        (nbd.NBD_OPT_GO, b"\0\0\0\x09disk\0\0", nbd.NBD_REP_ERR_INVALID),  # name overruns the option
        (nbd.NBD_OPT_GO, b"\0\0\0\x04disk\0\x02\0\x01", nbd.NBD_REP_ERR_INVALID),  # request list overruns
        (nbd.NBD_OPT_GO, b"\0\0\0\x02\xff\xfe\0\0", nbd.NBD_REP_ERR_INVALID),  # name not UTF-8
        (nbd.NBD_OPT_LIST, bytes(70 * 1024), nbd.NBD_REP_ERR_TOO_BIG),
    ]
    for opt, data, expected in refused:
        c.option(opt, data)
        rep, message = await c.opt_reply(opt)
        assert rep == expected, (opt, hex(rep))
        message.decode()  # error replies carry a human-readable UTF-8 message
    await c.go("")  # still haggling: every refusal left the stream in step
    assert c.tflags == EXPECTED_FLAGS
    await c.close()


async def test_handshake_times_out(device: RecordingDevice, sockdir: Path) -> None:
    srv = NbdServer(device, handshake_timeout=0.2)
    await srv.start(f"unix:{sockdir / 'slow.sock'}")
    try:
        c = await Client.connect(srv.address)
        await c.greeting()
        assert await c.closed()
    finally:
        await srv.close()


# -- transmission --------------------------------------------------------------------------------------------


async def test_read_write_flush_trim_write_zeroes_round_trip(server: NbdServer, device: RecordingDevice) -> None:
    c = await connected(server)
    rng = random.Random(7)
    model = bytearray(SIZE)
    cases = [(0, 512), (4096, 64 * 1024), (1, 1), (511, 2), (1000, 5000), (3 * 65536 - 7, 200 * 1024 + 13),
             (SIZE - 700, 700), (MiB + 12345, MiB)]
    for offset, length in cases:
        data = rng.randbytes(length)
        assert await c.write(offset, data) == 0
        model[offset:offset + length] = data
    for offset, length in [*cases, (0, SIZE // 2), (SIZE // 2, SIZE // 2)]:
        assert await c.read(offset, length) == model[offset:offset + length]
    assert device.data == model
    # Every device request is whole blocks of at most max_transfer bytes (MemoryBlockDevice enforces it too).
    for _, offset, length, _ in device.calls:
        assert offset % 512 == 0 and length % 512 == 0 and length <= 64 * 1024

    assert await c.call(nbd.NBD_CMD_FLUSH) == (0, b"")
    assert device.ops("flush")

    # TRIM discards only the whole blocks inside the range; WRITE_ZEROES zeroes exactly.
    assert await c.call(nbd.NBD_CMD_TRIM, 100, 300 * 1024) == (0, b"")
    discards = device.ops("discard")
    start, end = 512, (100 + 300 * 1024) // 512 * 512
    assert discards[0][1] == start and discards[-1][1] + discards[-1][2] == end
    assert sum(length for _, _, length, _ in discards) == end - start
    model[start:end] = bytes(end - start)
    assert await c.read(0, 400 * 1024) == model[:400 * 1024]
    assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 1000, 200 * 1024 + 3, nbd.NBD_CMD_FLAG_NO_HOLE) == (0, b"")
    model[1000:1000 + 200 * 1024 + 3] = bytes(200 * 1024 + 3)
    assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 3 * MiB + 5, 10) == (0, b"")
    model[3 * MiB + 5:3 * MiB + 15] = bytes(10)
    # Zero lengths are harmless no-ops.
    for cmd in (nbd.NBD_CMD_READ, nbd.NBD_CMD_WRITE, nbd.NBD_CMD_TRIM, nbd.NBD_CMD_WRITE_ZEROES):
        assert await c.call(cmd, 77, 0) == (0, b"")
    assert device.data == model
    assert await c.read(0, SIZE) == model
    await c.close()


async def test_write_zeroes_and_trim_are_not_bound_by_the_maximum_block_size(server: NbdServer,
                                                                             device: RecordingDevice) -> None:
    c = await connected(server, (nbd.NBD_INFO_BLOCK_SIZE,))
    device.data[:] = b"\xff" * SIZE
    assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 0, 3 * MiB) == (0, b"")  # what nbdcopy 1.14 sends
    assert device.data[:3 * MiB] == bytes(3 * MiB) and device.data[3 * MiB] == 0xFF
    assert await c.call(nbd.NBD_CMD_TRIM, 0, SIZE) == (0, b"")
    assert sum(length for _, _, length, _ in device.ops("discard")) == SIZE
    await c.close()


async def test_fua_reaches_the_device_on_every_piece(server: NbdServer, device: RecordingDevice) -> None:
    c = await connected(server)
    fua = nbd.NBD_CMD_FLAG_FUA
    assert await c.write(0, b"a" * 4096) == 0
    assert {call[3] for call in device.ops("write")} == {False}
    device.calls.clear()
    assert await c.write(777, b"b" * 200 * 1024, fua) == 0  # unaligned and larger than max_transfer
    assert len(device.ops("write")) == 4 and {call[3] for call in device.ops("write")} == {True}
    device.calls.clear()
    assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 5, 100 * 1024, fua) == (0, b"")
    assert device.ops("write") and {call[3] for call in device.ops("write")} == {True}
    device.calls.clear()
    assert await c.call(nbd.NBD_CMD_TRIM, 0, 8192, fua) == (0, b"")
    assert [call[0] for call in device.calls] == ["discard", "flush"]
    # FUA is accepted (and ignored) where nothing is written.
    assert await c.call(nbd.NBD_CMD_READ, 150 * 1024, 1, fua) == (0, b"b")
    assert await c.call(nbd.NBD_CMD_FLUSH, 0, 0, fua) == (0, b"")
    await c.close()


async def test_out_of_range_requests_fail_and_the_stream_stays_in_step(server: NbdServer,
                                                                       device: RecordingDevice) -> None:
    c = await connected(server)
    assert await c.call(nbd.NBD_CMD_READ, SIZE - 10, 11) == (nbd.NBD_EINVAL, b"")
    assert await c.call(nbd.NBD_CMD_READ, 2**64 - 1, 1) == (nbd.NBD_EINVAL, b"")
    assert await c.write(SIZE - 10, b"z" * 11) == nbd.NBD_ENOSPC  # the payload is still consumed
    assert await c.call(nbd.NBD_CMD_TRIM, SIZE, 512) == (nbd.NBD_EINVAL, b"")
    assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, SIZE - 1, 2) == (nbd.NBD_ENOSPC, b"")
    assert await c.write(SIZE - 10, b"z" * 10) == 0
    assert await c.read(SIZE - 11, 11) == b"\0" + b"z" * 10
    assert not device.ops("discard")
    await c.close()


async def test_read_only_export_refuses_writes_with_eperm(sockdir: Path) -> None:
    dev = RecordingDevice(SIZE, read_only=True)
    dev.data[:4] = b"boot"
    srv = await serve(dev, sockdir)
    try:
        c = await Client.connect(srv.address)
        await c.greeting()
        await c.go("disk")
        assert c.tflags == (nbd.NBD_FLAG_HAS_FLAGS | nbd.NBD_FLAG_READ_ONLY | nbd.NBD_FLAG_SEND_FLUSH
                            | nbd.NBD_FLAG_SEND_FUA | nbd.NBD_FLAG_CAN_MULTI_CONN)
        assert await c.write(0, b"evil") == nbd.NBD_EPERM
        assert await c.call(nbd.NBD_CMD_TRIM, 0, 512) == (nbd.NBD_EPERM, b"")
        assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 0, 512) == (nbd.NBD_EPERM, b"")
        assert await c.call(nbd.NBD_CMD_FLUSH) == (0, b"")
        assert await c.read(0, 4) == b"boot"
        assert not dev.ops("write") and not dev.ops("discard")
        await c.close()
    finally:
        await srv.close()


async def test_unknown_commands_bad_flags_and_oversized_requests_are_einval(server: NbdServer) -> None:
    c = await connected(server)
    assert await c.call(nbd.NBD_CMD_READ, 0, 512, nbd.NBD_CMD_FLAG_DF) == (nbd.NBD_EINVAL, b"")
    assert await c.write(0, b"q" * 512, nbd.NBD_CMD_FLAG_NO_HOLE) == nbd.NBD_EINVAL
    assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 0, 512, nbd.NBD_CMD_FLAG_FAST_ZERO) == (nbd.NBD_EINVAL, b"")
    assert await c.call(nbd.NBD_CMD_TRIM, 0, 512, 0x8000) == (nbd.NBD_EINVAL, b"")
    for cmd in (nbd.NBD_CMD_CACHE, nbd.NBD_CMD_BLOCK_STATUS, 8, 42):
        assert await c.call(cmd, 0, 512) == (nbd.NBD_EINVAL, b"")
    assert await c.call(nbd.NBD_CMD_FLUSH, 0, 512) == (nbd.NBD_EINVAL, b"")
    # This client never asked for block sizes, so up to 32 MiB is served and more is refused.
    big = SIZE  # the export is smaller than 32 MiB: stay inside it
    assert await c.read(0, big) == bytes(big)
    assert await c.call(nbd.NBD_CMD_READ, 0, nbd.MAX_REQUEST + 1) == (nbd.NBD_EINVAL, b"")
    assert await c.read(0, 512) == bytes(512)
    await c.close()


async def test_oversized_write_payload_is_consumed_and_refused(sockdir: Path) -> None:
    dev = MemoryBlockDevice(64 * MiB)
    srv = await serve(dev, sockdir)
    try:
        c = await Client.connect(srv.address)
        await c.greeting()
        await c.go("")
        assert await c.write(0, b"\x01" * (nbd.MAX_REQUEST + 512)) == nbd.NBD_EINVAL
        assert await c.write(0, b"\x02" * nbd.MAX_REQUEST) == 0
        assert dev.data[nbd.MAX_REQUEST - 1:nbd.MAX_REQUEST + 1] == b"\x02\x00"
        await c.close()
    finally:
        await srv.close()


async def test_a_client_that_asked_for_block_sizes_is_held_to_the_maximum(server: NbdServer) -> None:
    c = await connected(server, (nbd.NBD_INFO_BLOCK_SIZE,))
    assert await c.call(nbd.NBD_CMD_READ, 0, MiB + 1) == (nbd.NBD_EINVAL, b"")
    assert await c.write(0, b"w" * (MiB + 1)) == nbd.NBD_EINVAL
    assert await c.read(0, MiB) == bytes(MiB)
    await c.close()
    c = await connected(server)  # GO without NBD_INFO_BLOCK_SIZE: the spec's defaults apply
    assert len(await c.read(0, 2 * MiB)) == 2 * MiB
    await c.close()


async def test_device_errors_become_nbd_errors(server: NbdServer, device: RecordingDevice) -> None:
    c = await connected(server)
    device.fail["write"] = BlockDeviceError(errno.ENOSPC)
    assert await c.write(0, b"x" * 512) == nbd.NBD_ENOSPC
    device.fail["write"] = OSError(errno.EDQUOT, "quota")
    assert await c.write(0, b"x" * 512) == nbd.NBD_ENOSPC
    device.fail["read"] = RuntimeError("transport fell over")
    assert await c.call(nbd.NBD_CMD_READ, 0, 512) == (nbd.NBD_EIO, b"")
    device.fail["flush"] = BlockDeviceError(errno.EIO)
    assert await c.call(nbd.NBD_CMD_FLUSH) == (nbd.NBD_EIO, b"")
    device.fail.clear()
    assert await c.write(0, b"ok") == 0 and await c.read(0, 2) == b"ok"
    await c.close()


async def test_an_unexpected_device_failure_is_logged_with_its_traceback(device: RecordingDevice,
                                                                         sockdir: Path) -> None:
    out = io.StringIO()
    logs.setup("debug", stream=out, json=True)  # before the server binds its logger
    server = NbdServer(device, "disk")
    await server.start(f"unix:{sockdir / 'nbd.sock'}")
    c = await connected(server)
    device.fail["read"] = RuntimeError("transport fell over")
    assert await c.call(nbd.NBD_CMD_READ, 0, 512) == (nbd.NBD_EIO, b"")
    device.fail["read"] = BlockDeviceError(errno.EIO, "medium error")
    assert await c.call(nbd.NBD_CMD_READ, 0, 512) == (nbd.NBD_EIO, b"")
    failed = [json.loads(x) for x in out.getvalue().splitlines() if "nbd request failed" in x]
    assert len(failed) == 2, failed
    assert "Traceback" in failed[0].get("exception", "") and "transport fell over" in failed[0]["exception"]
    assert "exception" not in failed[1], "a device error (the guest's answer) was logged as a bug"
    await c.close()
    await server.close(grace=1.0)


async def test_bad_request_magic_hangs_up(server: NbdServer) -> None:
    c = await connected(server)
    c.send(struct.pack(">IHHQQI", 0x12560953, 0, nbd.NBD_CMD_READ, 1, 0, 512))
    assert await c.closed()


async def test_disc_finishes_requests_in_flight_then_closes(server: NbdServer, device: RecordingDevice) -> None:
    c = await connected(server)
    device.data[8192:8196] = b"late"
    gate = device.gates[("read", 8192)] = asyncio.Event()
    handle = c.request(nbd.NBD_CMD_READ, 8192, 4)
    c.request(nbd.NBD_CMD_DISC)
    await asyncio.sleep(0.1)
    assert not c.reader.at_eof() and len(server.connections) == 1
    gate.set()
    assert await c.reply() == (handle, 0, b"late")
    assert await c.closed()


async def test_pipelined_requests_complete_out_of_order(server: NbdServer, device: RecordingDevice) -> None:
    c = await connected(server)
    device.data[0:4] = b"slow"
    device.data[MiB:MiB + 4] = b"fast"
    gate = device.gates[("read", 0)] = asyncio.Event()
    slow = c.request(nbd.NBD_CMD_READ, 0, 4)
    fast = c.request(nbd.NBD_CMD_READ, MiB, 4)
    write = c.request(nbd.NBD_CMD_WRITE, 2 * MiB, 3, payload=b"new")
    flush = c.request(nbd.NBD_CMD_FLUSH)
    first = {await c.reply() for _ in range(3)}
    assert first == {(fast, 0, b"fast"), (write, 0, b""), (flush, 0, b"")}
    gate.set()
    assert await c.reply() == (slow, 0, b"slow")
    await c.close()


async def test_requests_in_flight_are_bounded_per_connection(device: RecordingDevice, sockdir: Path) -> None:
    srv = await serve(device, sockdir, max_inflight=4)
    try:
        c = await Client.connect(srv.address)
        await c.greeting()
        await c.go("disk")
        device.hold_all = asyncio.Event()
        handles = {c.request(nbd.NBD_CMD_READ, i * 4096, 4096) for i in range(20)}
        await until(lambda: device.active == 4, "4 reads held at the device")
        device.hold_all.set()
        assert {(await c.reply())[0] for _ in range(20)} == handles
        assert device.peak == 4
        await c.close()
    finally:
        await srv.close()


async def test_payload_bytes_in_flight_are_bounded(device: RecordingDevice, sockdir: Path) -> None:
    srv = await serve(device, sockdir, max_inflight_bytes=256 * 1024)
    try:
        c = await Client.connect(srv.address)
        await c.greeting()
        await c.go("disk")
        device.hold_all = asyncio.Event()
        handles = {c.request(nbd.NBD_CMD_WRITE, i * 64 * 1024, 64 * 1024, payload=b"p" * 64 * 1024)
                   for i in range(10)}
        await until(lambda: device.active == 4, "4 writes held at the device")  # 4 x 64 KiB
        device.hold_all.set()
        assert {(await c.reply())[0] for _ in range(10)} == handles
        assert device.peak == 4  # the rest waited in the socket all along
        assert device.data[:640 * 1024] == b"p" * 640 * 1024
        await c.close()
    finally:
        await srv.close()


async def test_unaligned_writes_sharing_a_block_are_not_lost(server: NbdServer, device: RecordingDevice) -> None:
    c = await connected(server)
    c2 = await connected(server)  # and across connections
    device.read_delay = 0.01  # widen the read-modify-write window
    handles = set()
    for i in range(8):
        client = c if i % 2 else c2
        handle = client.request(nbd.NBD_CMD_WRITE, 100 + 64 * i, 64, payload=bytes([i + 1]) * 64)
        handles.add((client, handle))
    for client in (c, c2):
        for _ in range(4):
            handle, error, _ = await client.reply()
            assert error == 0 and (client, handle) in handles
    device.read_delay = 0
    assert await c.read(100, 512) == b"".join(bytes([i + 1]) * 64 for i in range(8))
    await c.close()
    await c2.close()


async def test_server_close_finishes_requests_in_flight(server: NbdServer, device: RecordingDevice) -> None:
    c = await connected(server)
    idle = await Client.connect(server.address)
    await idle.greeting()
    device.data[0:2] = b"ok"
    gate = device.gates[("read", 0)] = asyncio.Event()
    handle = c.request(nbd.NBD_CMD_READ, 0, 2)
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(server.close())
    assert await idle.closed()  # still negotiating: dropped at once
    await asyncio.sleep(0.1)
    assert not closing.done()
    gate.set()
    assert await c.reply() == (handle, 0, b"ok")
    assert await c.closed()
    await closing
    assert not Path(server.address[5:]).exists()


# -- addresses, other transports and devices ------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("tcp://127.0.0.1:10809") == ("tcp", "127.0.0.1", 10809)
    assert parse_listen("127.0.0.1:0") == ("tcp", "127.0.0.1", 0)
    assert parse_listen("tcp://[::1]:99") == ("tcp", "::1", 99)
    assert parse_listen("unix:/run/vm1.nbd") == ("unix", "/run/vm1.nbd", 0)
    assert parse_listen("unix:///run/vm1.nbd") == ("unix", "/run/vm1.nbd", 0)
    for bad in ("", "unix:", "127.0.0.1", "tcp://127.0.0.1", "http://x:1", "h:port", "h:70000", ":80"):
        with pytest.raises(ValueError):
            parse_listen(bad)


async def test_loopback_tcp_with_port_zero(device: RecordingDevice) -> None:
    for url in ("tcp://127.0.0.1:0", "127.0.0.1:0"):
        srv = NbdServer(device, "disk")
        address = await srv.start(url)
        try:
            kind, host, port = parse_listen(address)
            assert kind == "tcp" and host == "127.0.0.1" and port > 0
            assert srv.uri == f"nbd://127.0.0.1:{port}/disk"
            c = await Client.connect(address)
            sock = c.writer.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await c.greeting()
            await c.go("disk")
            assert await c.write(12345, b"tcp") == 0 and await c.read(12345, 3) == b"tcp"
            await c.close()
        finally:
            await srv.close()


async def test_unix_socket_stale_file_is_replaced_and_removed_on_close(device: RecordingDevice,
                                                                       sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    srv = NbdServer(device)
    await srv.start(f"unix:{path}")
    assert srv.uri == f"nbd+unix:///?socket={path}"
    c = await Client.connect(srv.address)
    await c.greeting()
    await c.go("")
    await c.close()
    await srv.close()
    assert not path.exists()


def test_geometry_and_names_are_validated() -> None:
    with pytest.raises(ValueError):
        NbdServer(MemoryBlockDevice(SIZE), "x" * 5000)
    with pytest.raises(ValueError):
        MemoryBlockDevice(1000)
    with pytest.raises(ValueError):
        MemoryBlockDevice(SIZE, max_transfer=1000)
    assert isinstance(MemoryBlockDevice(SIZE), BlockDevice)


async def test_memory_device_enforces_its_contract() -> None:
    dev = MemoryBlockDevice(8192, max_transfer=4096)
    for bad in (dev.read(1, 512), dev.read(0, 8192), dev.read(8192, 512), dev.read(0, 0)):
        with pytest.raises(BlockDeviceError) as info:
            await bad
        assert info.value.errno == errno.EINVAL
    ro = MemoryBlockDevice(8192, read_only=True)
    with pytest.raises(BlockDeviceError) as info:
        await ro.write(0, bytes(512))
    assert info.value.errno == errno.EPERM


async def test_file_device_through_nbd(sockdir: Path) -> None:
    path = sockdir / "disk.img"
    with FileBlockDevice.create(path, 2 * MiB, max_transfer=128 * 1024) as dev:
        srv = await serve(dev, sockdir)
        try:
            c = await connected(srv)
            payload = os.urandom(300 * 1024)
            assert await c.write(333, payload, nbd.NBD_CMD_FLAG_FUA) == 0
            assert await c.call(nbd.NBD_CMD_FLUSH) == (0, b"")
            assert await c.read(333, len(payload)) == payload
            assert await c.call(nbd.NBD_CMD_TRIM, 0, MiB) == (0, b"")
            assert await c.read(0, 4096) == bytes(4096)  # a punched hole (or written zeroes) reads back as zeroes
            await c.close()
        finally:
            await srv.close()
    assert path.read_bytes()[:MiB] == bytes(MiB)
    with FileBlockDevice(path, read_only=True) as ro:
        assert ro.size == 2 * MiB and not ro.supports_discard
        with pytest.raises(BlockDeviceError) as info:
            await ro.write(0, bytes(512))
        assert info.value.errno == errno.EPERM


# -- several exports, structured replies, base:allocation ------------------------------------------------------


async def structured(c: Client) -> tuple[int, int, int, bytes]:
    """(flags, type, handle, payload) of the next structured reply chunk."""
    magic, flags, kind, handle, length = struct.unpack(">IHHQI", await c.recv(20))
    assert magic == nbd.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
    return flags, kind, handle, await c.recv(length)


def meta_request(name: str, *queries: str) -> bytes:
    raw = name.encode()
    body = b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)
    return struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries)) + body


async def test_every_export_is_listed_and_reachable_by_name(device: RecordingDevice, sockdir: Path) -> None:
    other = RecordingDevice(MiB, read_only=True)
    other.data[:3] = b"ro!"
    srv = NbdServer(device, "vm1", description="vm1 LUN 0")
    srv.add_export(other, "vm1-lun1", "vm1 LUN 1")
    with pytest.raises(ValueError, match="taken"):
        srv.add_export(other, "vm1-lun1")
    await srv.start(f"unix:{sockdir / 'multi.sock'}")
    try:
        c = await Client.connect(srv.address)
        await c.greeting()
        c.option(nbd.NBD_OPT_LIST)
        assert await c.opt_reply(nbd.NBD_OPT_LIST) == (nbd.NBD_REP_SERVER, b"\0\0\0\x03vm1vm1 LUN 0")
        assert await c.opt_reply(nbd.NBD_OPT_LIST) == (nbd.NBD_REP_SERVER, b"\0\0\0\x08vm1-lun1vm1 LUN 1")
        assert await c.opt_reply(nbd.NBD_OPT_LIST) == (nbd.NBD_REP_ACK, b"")
        rep, infos = await c.info(nbd.NBD_OPT_INFO, "vm1-lun1")
        assert rep == nbd.NBD_REP_ACK
        assert struct.unpack(">QH", infos[nbd.NBD_INFO_EXPORT])[0] == MiB
        await c.go("vm1-lun1")
        assert c.size == MiB and c.tflags & nbd.NBD_FLAG_READ_ONLY
        assert await c.read(0, 3) == b"ro!"
        assert await c.write(0, b"no") == nbd.NBD_EPERM
        await c.close()
        c = await Client.connect(srv.address)  # the empty name is the first export
        await c.greeting()
        await c.go("")
        assert c.size == SIZE and not c.tflags & nbd.NBD_FLAG_READ_ONLY
        await c.close()
    finally:
        await srv.close()


async def test_structured_replies_carry_reads_and_errors(server: NbdServer, device: RecordingDevice) -> None:
    c = await Client.connect(server.address)
    await c.greeting()
    c.option(nbd.NBD_OPT_STRUCTURED_REPLY)
    assert await c.opt_reply(nbd.NBD_OPT_STRUCTURED_REPLY) == (nbd.NBD_REP_ACK, b"")
    await c.go("disk")
    device.data[4096:4100] = b"data"
    handle = c.request(nbd.NBD_CMD_READ, 4096, 4)
    c.reads.pop(handle)
    assert await structured(c) == (nbd.NBD_REPLY_FLAG_DONE, nbd.NBD_REPLY_TYPE_OFFSET_DATA, handle,
                                   struct.pack(">Q", 4096) + b"data")
    handle = c.request(nbd.NBD_CMD_READ, SIZE, 1)  # out of range: an error chunk, never a simple reply
    c.reads.pop(handle)
    flags, kind, got, payload = await structured(c)
    assert (flags, kind, got) == (nbd.NBD_REPLY_FLAG_DONE, nbd.NBD_REPLY_TYPE_ERROR, handle)
    error, n = struct.unpack_from(">IH", payload)
    assert error == nbd.NBD_EINVAL and len(payload) == 6 + n and payload[6:].decode()
    device.fail["read"] = BlockDeviceError(errno.EIO, "medium error")
    handle = c.request(nbd.NBD_CMD_READ, 0, 512)
    c.reads.pop(handle)
    flags, kind, got, payload = await structured(c)
    assert kind == nbd.NBD_REPLY_TYPE_ERROR and struct.unpack_from(">I", payload)[0] == nbd.NBD_EIO
    assert b"medium error" in payload
    device.fail.clear()
    assert await c.write(0, b"simple") == 0  # a reply without payload may stay simple
    await c.close()


async def test_base_allocation_block_status(server: NbdServer, device: RecordingDevice) -> None:
    c = await Client.connect(server.address)
    await c.greeting()
    c.option(nbd.NBD_OPT_LIST_META_CONTEXT, meta_request("disk"))  # no queries: every context
    assert await c.opt_reply(nbd.NBD_OPT_LIST_META_CONTEXT) == (
        nbd.NBD_REP_META_CONTEXT, struct.pack(">I", nbd.BASE_ALLOCATION_ID) + b"base:allocation")
    assert await c.opt_reply(nbd.NBD_OPT_LIST_META_CONTEXT) == (nbd.NBD_REP_ACK, b"")
    c.option(nbd.NBD_OPT_STRUCTURED_REPLY)
    assert (await c.opt_reply(nbd.NBD_OPT_STRUCTURED_REPLY))[0] == nbd.NBD_REP_ACK
    c.option(nbd.NBD_OPT_SET_META_CONTEXT, meta_request("disk", "qemu:dirty-bitmap:x", "base:allocation"))
    assert await c.opt_reply(nbd.NBD_OPT_SET_META_CONTEXT) == (
        nbd.NBD_REP_META_CONTEXT, struct.pack(">I", nbd.BASE_ALLOCATION_ID) + b"base:allocation")
    assert await c.opt_reply(nbd.NBD_OPT_SET_META_CONTEXT) == (nbd.NBD_REP_ACK, b"")
    await c.go("disk")
    hole = nbd.NBD_STATE_HOLE | nbd.NBD_STATE_ZERO
    device.extents = [(MiB, 0), (2 * MiB, hole), (MiB, 0)]
    handle = c.request(nbd.NBD_CMD_BLOCK_STATUS, 1000, 3 * MiB)
    flags, kind, got, payload = await structured(c)
    assert (flags, kind, got) == (nbd.NBD_REPLY_FLAG_DONE, nbd.NBD_REPLY_TYPE_BLOCK_STATUS, handle)
    assert payload == struct.pack(">7I", nbd.BASE_ALLOCATION_ID, MiB - 1000, 0, 2 * MiB, hole, 1000, 0)
    assert device.ops("block_status")[-1][1] == 512  # asked from the block holding the offset
    handle = c.request(nbd.NBD_CMD_BLOCK_STATUS, MiB, MiB, nbd.NBD_CMD_FLAG_REQ_ONE)
    assert (await structured(c))[3] == struct.pack(">III", nbd.BASE_ALLOCATION_ID, MiB, hole)
    handle = c.request(nbd.NBD_CMD_BLOCK_STATUS, SIZE - 512, 1024)  # past the end: an error chunk
    flags, kind, got, payload = await structured(c)
    assert (kind, got, struct.unpack_from(">I", payload)[0]) == (nbd.NBD_REPLY_TYPE_ERROR, handle, nbd.NBD_EINVAL)
    await c.close()
    # A client that selected nothing may not ask.
    c = await Client.connect(server.address)
    await c.greeting()
    c.option(nbd.NBD_OPT_STRUCTURED_REPLY)
    await c.opt_reply(nbd.NBD_OPT_STRUCTURED_REPLY)
    c.option(nbd.NBD_OPT_SET_META_CONTEXT, meta_request("disk", "qemu:allocation-depth"))
    assert await c.opt_reply(nbd.NBD_OPT_SET_META_CONTEXT) == (nbd.NBD_REP_ACK, b"")
    await c.go("disk")
    handle = c.request(nbd.NBD_CMD_BLOCK_STATUS, 0, 512)
    flags, kind, got, payload = await structured(c)
    assert (kind, got, struct.unpack_from(">I", payload)[0]) == (nbd.NBD_REPLY_TYPE_ERROR, handle, nbd.NBD_EINVAL)
    await c.close()


async def test_write_zeroes_may_punch_unless_no_hole_and_trim_is_one_discard(server: NbdServer,
                                                                            device: RecordingDevice) -> None:
    c = await connected(server)
    device.data[:] = b"\x77" * SIZE
    assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 100, 3 * MiB) == (0, b"")
    assert device.ops("write_zeroes") == [("write_zeroes", 512, 3 * MiB - 512, True)]  # whole blocks in one go
    assert device.data[100:100 + 3 * MiB] == bytes(3 * MiB) and device.data[99] == 0x77
    device.calls.clear()
    assert await c.call(nbd.NBD_CMD_WRITE_ZEROES, 0, 2 * MiB, nbd.NBD_CMD_FLAG_NO_HOLE) == (0, b"")
    assert device.ops("write_zeroes") == [("write_zeroes", 0, 2 * MiB, False)]
    device.calls.clear()
    assert await c.call(nbd.NBD_CMD_TRIM, 0, SIZE) == (0, b"")
    assert device.ops("discard") == [("discard", 0, SIZE, False)]
    await c.close()
