"""The demo's disk workload: verified random I/O on each VM's disk, through the VM's own StorVSC.

Each child partition exports its SCSI disk over NBD (``child-partition run --nbd``), as a guest's block layer
would hand it to a program. This module is a small NBD client (the NBD protocol spec, NetworkBlockDevice/nbd
doc/proto.md: fixed newstyle, NBD_OPT_GO, simple replies) that keeps a few requests in flight on each export.
Every request travels NBD -> the child's GuestDisk -> StorVSC EXECUTE_SRB on the VMBus ring -> the parent's
StorVSP -> the disk image, and back. Each worker writes stamped blocks in its own part of the disk and reads
them back, so a wrong byte anywhere on that path shows up as an error, not as a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import struct
import time
from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text

from child_partition.devices.storage.nbd import (
    IHAVEOPT,
    NBD_CMD_DISC,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_INFO_EXPORT,
    NBD_OPT_GO,
    NBD_REP_ACK,
    NBD_REP_INFO,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
)

_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")

BLOCK = 4096
SPAN = 64 << 20  # the part of each disk the workload touches
READ_SHARE = 0.7


class NbdError(Exception):
    """The NBD server refused the export or failed a request."""


class NbdClient:
    """One NBD connection with requests in flight, matched to replies by handle."""

    def __init__(self) -> None:
        self.size = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, tuple[asyncio.Future[bytes], int]] = {}
        self._handles = itertools.count(1)
        self._receiver: asyncio.Task[None] | None = None

    async def connect(self, path: str, export: str = "") -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        self._reader, self._writer = reader, writer
        magic, opt_magic, _flags = struct.unpack(">QQH", await reader.readexactly(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError("not a fixed-newstyle NBD server")
        writer.write(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        writer.write(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(data)) + data)
        while True:
            magic, _opt, rep, length = _OPT_REPLY.unpack(await reader.readexactly(_OPT_REPLY.size))
            body = await reader.readexactly(length)
            if magic != OPT_REPLY_MAGIC:
                raise NbdError("bad option reply magic")
            if rep == NBD_REP_ACK:
                break
            if rep & (1 << 31):
                raise NbdError(f"NBD_OPT_GO refused ({rep & 0x7FFFFFFF}): {body.decode(errors='replace')}")
            if rep == NBD_REP_INFO and struct.unpack_from(">H", body)[0] == NBD_INFO_EXPORT:
                self.size = struct.unpack_from(">Q", body, 2)[0]
        self._receiver = asyncio.get_running_loop().create_task(self._receive())

    async def _receive(self) -> None:
        assert self._reader is not None
        try:
            while True:
                magic, error, handle = _REPLY.unpack(await self._reader.readexactly(_REPLY.size))
                if magic != NBD_SIMPLE_REPLY_MAGIC:
                    raise NbdError("bad reply magic")
                fut, read_len = self._pending.pop(handle, (None, 0))
                data = await self._reader.readexactly(read_len) if read_len and not error else b""
                if fut is not None and not fut.done():
                    if error:
                        fut.set_exception(NbdError(f"NBD error {error}"))
                    else:
                        fut.set_result(data)
        except (asyncio.IncompleteReadError, ConnectionError, NbdError) as exc:
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(NbdError(f"connection lost: {exc}"))
            self._pending.clear()

    async def _request(self, cmd: int, offset: int, length: int, payload: bytes = b"") -> bytes:
        if self._writer is None or self._receiver is None or self._receiver.done():
            raise NbdError("not connected")
        handle = next(self._handles)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[handle] = (fut, length if cmd == NBD_CMD_READ else 0)
        self._writer.write(_REQUEST.pack(NBD_REQUEST_MAGIC, 0, cmd, handle, offset, length) + payload)
        return await fut

    async def read(self, offset: int, length: int) -> bytes:
        return await self._request(NBD_CMD_READ, offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self._request(NBD_CMD_WRITE, offset, len(data), data)

    async def close(self) -> None:
        """NBD_CMD_DISC once nothing is in flight, then close."""
        if self._writer is None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            if self._receiver is not None and not self._receiver.done():
                self._writer.write(_REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
            self._writer.close()
            await self._writer.wait_closed()
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        self._writer = None


@dataclass(slots=True)
class VmDisk:
    """One VM's share of the workload and its counters."""

    name: str
    via: str
    nbd_path: str
    completed: int = 0
    bytes: int = 0
    errors: int = 0
    last_error: str = ""
    iops: float = 0.0
    mbps: float = 0.0
    client: NbdClient = field(default_factory=NbdClient)
    _sample: tuple[float, int, int] = (0.0, 0, 0)

    def sample(self, now: float) -> None:
        """IOPS and MB/s since the previous sample."""
        t0, done0, bytes0 = self._sample
        if t0:
            dt = max(1e-6, now - t0)
            self.iops = (self.completed - done0) / dt
            self.mbps = (self.bytes - bytes0) / dt / 1e6
        self._sample = (now, self.completed, self.bytes)


class StorageWorkload:
    """4 KiB random writes and verified reads on every VM's disk, ``iodepth`` requests in flight per VM."""

    title = "disk I/O"

    def __init__(self, iodepth: int = 4) -> None:
        self.iodepth = iodepth
        self.vms: list[VmDisk] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def add(self, name: str, via: str, nbd_path: str) -> None:
        self.vms.append(VmDisk(name, via, nbd_path))

    async def start(self) -> None:
        await asyncio.gather(*(vm.client.connect(vm.nbd_path) for vm in self.vms))
        now = time.monotonic()
        for vm in self.vms:
            vm.sample(now)
            span = min(SPAN, vm.client.size) // BLOCK
            share = max(1, span // self.iodepth)
            self._tasks += [asyncio.get_running_loop().create_task(self._worker(vm, i * share, share))
                            for i in range(self.iodepth)]

    async def _worker(self, vm: VmDisk, first: int, blocks: int) -> None:
        rnd = random.Random(f"{vm.name}/{first}")
        written: dict[int, bytes] = {}
        serial = itertools.count()
        while not self._stopping.is_set():
            block = first + rnd.randrange(blocks)
            try:
                if block in written and rnd.random() < READ_SHARE:
                    data = await vm.client.read(block * BLOCK, BLOCK)
                    if data != written[block]:
                        raise NbdError(f"block {block}: read back differs from what was written")
                else:
                    stamp = struct.pack(">8sQ", vm.name.encode()[:8], next(serial))
                    data = stamp * (BLOCK // len(stamp))
                    await vm.client.write(block * BLOCK, data)
                    written[block] = data
            except NbdError as exc:
                if self._stopping.is_set():
                    return
                vm.errors += 1
                vm.last_error = str(exc)
                if "connection lost" in str(exc):
                    return
                continue
            vm.completed += 1
            vm.bytes += BLOCK

    def sample(self) -> None:
        now = time.monotonic()
        for vm in self.vms:
            vm.sample(now)

    def view(self) -> Group:
        """A caption and a table: one row per VM."""
        caption = Text(f"{self.title}: 4 KiB random, {READ_SHARE:.0%} reads checked against what was written, "
                       f"{self.iodepth} in flight per VM", style="bold")
        t = Table(header_style="bold")
        t.add_column("VM")
        t.add_column("via")
        for col in ("IOPS", "MB/s", "completed", "errors"):
            t.add_column(col, justify="right")
        for vm in self.vms:
            t.add_row(vm.name, vm.via, f"{vm.iops:,.0f}", f"{vm.mbps:,.2f}", f"{vm.completed:,}",
                      f"[bold red]{vm.errors}[/]" if vm.errors else "0")
        return Group(caption, t)

    def progress(self) -> list[tuple[str, Text]]:
        """One line per VM, for output that is not a terminal."""
        return [(vm.name, Text(f"disk: completed={vm.completed} errors={vm.errors} IOPS={vm.iops:.0f} "
                               f"MB/s={vm.mbps:.2f}")) for vm in self.vms]

    async def stop(self) -> None:
        """Let the requests in flight finish, then disconnect every client."""
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(vm.client.close() for vm in self.vms), return_exceptions=True)
