"""DiskBackend against real image files: creation, round trips, durability, hole punching, errors, threads."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from parent_partition.devices.storage import disk as disk_mod
from parent_partition.devices.storage.disk import BLOCK_SIZE, DiskBackend, DiskError

MiB = 1 << 20


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[DiskBackend]:
    b = DiskBackend.open(tmp_path / "d.img", size=4 * MiB)
    yield b
    await b.close()


def record_fdatasync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def fake(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fake)
    return calls


# -- opening ---------------------------------------------------------------------------------------

async def test_created_sparse_at_size(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "new.img"
    b = DiskBackend.open(path, size=64 * MiB)
    try:
        st = path.stat()
        assert st.st_size == 64 * MiB == b.size
        assert st.st_blocks == 0  # sparse: nothing allocated
        assert b.block_size == BLOCK_SIZE == 512
        assert not b.read_only
        flags = fcntl.fcntl(b._fd, fcntl.F_GETFD)
        assert flags & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(b._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    finally:
        await b.close()


async def test_existing_image_keeps_its_size(tmp_path: Path) -> None:
    path = tmp_path / "old.img"
    path.write_bytes(b"\x5a" * 8192)
    b = DiskBackend.open(path, size=64 * MiB)
    try:
        assert b.size == 8192
        assert await b.read(0, 4) == b"\x5a" * 4
    finally:
        await b.close()
    assert path.stat().st_size == 8192


@pytest.mark.parametrize("size", [0, 511, 1000, -512])
def test_size_must_be_a_positive_multiple_of_512(tmp_path: Path, size: int) -> None:
    with pytest.raises(DiskError) as info:
        DiskBackend.open(tmp_path / "x.img", size=size)
    assert info.value.errno == errno.EINVAL
    assert not (tmp_path / "x.img").exists()


def test_existing_image_of_bad_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(DiskError) as info:
        DiskBackend.open(path)
    assert info.value.errno == errno.EINVAL
    path.write_bytes(b"")
    with pytest.raises(DiskError):
        DiskBackend.open(path, size=4096)


def test_missing_image_without_create(tmp_path: Path) -> None:
    with pytest.raises(DiskError) as info:
        DiskBackend.open(tmp_path / "nope.img", size=4096, create=False)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(DiskError) as info:
        DiskBackend.open(tmp_path / "nope.img")  # create, but no size to create with
    assert info.value.errno == errno.EINVAL


async def test_read_only_opens_o_rdonly_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x11" * 4096)
    b = DiskBackend.open(path, read_only=True)
    try:
        assert b.read_only
        assert fcntl.fcntl(b._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert await b.read(512, 512) == b"\x11" * 512
        with pytest.raises(DiskError) as info:
            await b.write(0, b"\0" * 512)
        assert info.value.errno == errno.EROFS
        with pytest.raises(DiskError) as info:
            await b.discard(0, 512)
        assert info.value.errno == errno.EROFS
        await b.flush()  # nothing to flush, no error
    finally:
        await b.close()
    assert path.read_bytes() == b"\x11" * 4096


# -- data ------------------------------------------------------------------------------------------

async def test_round_trips_at_random_offsets(backend: DiskBackend) -> None:
    rng = random.Random(1234)
    model = bytearray(backend.size)
    for _ in range(200):
        length = rng.choice([1, 7, 512, 4096, rng.randrange(1, 70000)])
        offset = rng.randrange(0, backend.size - length + 1)
        data = rng.randbytes(length)
        await backend.write(offset, data, fua=rng.random() < 0.1)
        model[offset:offset + length] = data
    for _ in range(200):
        length = rng.randrange(0, 100000)
        offset = rng.randrange(0, backend.size - length + 1)
        assert await backend.read(offset, length) == model[offset:offset + length]
    assert await backend.read(0, backend.size) == model


async def test_write_accepts_bytearray_and_memoryview(backend: DiskBackend) -> None:
    await backend.write(0, bytearray(b"ab" * 256))
    await backend.write(512, memoryview(b"xyz" * 1000)[:512])
    assert await backend.read(0, 1024) == b"ab" * 256 + (b"xyz" * 1000)[:512]


async def test_out_of_range_is_refused(backend: DiskBackend) -> None:
    for call in (lambda: backend.read(backend.size - 1, 2), lambda: backend.read(-1, 1),
                 lambda: backend.write(backend.size, b"x"), lambda: backend.discard(0, backend.size + 512),
                 lambda: backend.read(0, -1)):
        with pytest.raises(DiskError) as info:
            await call()
        assert info.value.errno == errno.EINVAL
    assert backend.path.stat().st_size == backend.size  # a bad write never grows the image


async def test_read_past_the_files_end_reads_zeros(backend: DiskBackend) -> None:
    await backend.write(0, b"\xff" * 8192)
    os.truncate(backend.path, 4096)  # the image shrank under us
    assert await backend.read(2048, 4096) == b"\xff" * 2048 + bytes(2048)
    assert await backend.read(backend.size - 512, 512) == bytes(512)


# -- durability ------------------------------------------------------------------------------------

async def test_fua_and_flush_call_fdatasync(backend: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_fdatasync(monkeypatch)
    await backend.write(0, b"a" * 512)
    assert calls == []
    await backend.write(512, b"b" * 512, fua=True)
    assert calls == [backend._fd]
    await backend.flush()
    assert len(calls) == 2


async def test_fua_returns_only_after_fdatasync(backend: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_pwrite, real_sync = os.pwrite, os.fdatasync

    def pwrite(fd: int, data: Any, offset: int) -> int:
        order.append("pwrite")
        return real_pwrite(fd, data, offset)

    def fdatasync(fd: int) -> None:
        time.sleep(0.05)
        order.append("fdatasync")
        real_sync(fd)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    await backend.write(0, b"z" * 4096, fua=True)
    order.append("returned")
    assert order == ["pwrite", "fdatasync", "returned"]


async def test_blocking_calls_run_off_the_loop_thread(backend: DiskBackend,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    threads: set[int] = set()

    def spy(func: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            threads.add(threading.get_ident())
            return func(*args)
        return wrapper

    for name in ("pread", "pwrite", "fdatasync"):
        monkeypatch.setattr(os, name, spy(getattr(os, name)))
    await backend.write(0, b"q" * 4096, fua=True)
    await backend.read(0, 4096)
    await backend.flush()
    await backend.discard(0, 4096)
    assert threads and threading.get_ident() not in threads


# -- discard ---------------------------------------------------------------------------------------

async def test_discard_punches_a_hole(backend: DiskBackend) -> None:
    await backend.write(0, random.Random(5).randbytes(2 * MiB))
    await backend.flush()
    before = os.stat(backend.path).st_blocks
    assert before >= 2 * MiB // 512
    punched = await backend.discard(256 * 1024, MiB)
    assert punched is True
    after = os.stat(backend.path).st_blocks
    assert before - after >= MiB // 512
    assert await backend.read(256 * 1024, MiB) == bytes(MiB)
    assert os.stat(backend.path).st_size == backend.size  # KEEP_SIZE


async def test_discard_falls_back_to_zeros(backend: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_punch(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(disk_mod, "_fallocate", no_punch)
    await backend.write(0, b"\xee" * (3 * MiB))
    assert await backend.discard(4096, 2 * MiB + 512) is False
    data = await backend.read(0, 3 * MiB)
    assert data[:4096] == b"\xee" * 4096
    assert data[4096:4096 + 2 * MiB + 512] == bytes(2 * MiB + 512)
    assert data[4096 + 2 * MiB + 512:] == b"\xee" * (MiB - 4096 - 512)


async def test_discard_error_becomes_disk_error(backend: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(disk_mod, "_fallocate", broken)
    with pytest.raises(DiskError) as info:
        await backend.discard(0, 4096)
    assert info.value.errno == errno.EIO


# -- errors and lifetime ---------------------------------------------------------------------------

async def test_io_errors_become_disk_errors(backend: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(*args: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pread", eio)
    monkeypatch.setattr(os, "preadv", _not_cached)  # take the pool path, not the cached fast path
    monkeypatch.setattr(os, "pwrite", eio)
    monkeypatch.setattr(os, "fdatasync", eio)
    for call in (lambda: backend.read(0, 512), lambda: backend.write(0, b"x" * 512), backend.flush):
        with pytest.raises(DiskError) as info:
            await call()
        assert info.value.errno == errno.EIO
        assert isinstance(info.value, OSError)


async def test_close_waits_for_in_flight_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = DiskBackend.open(tmp_path / "c.img", size=MiB)
    started, release = threading.Event(), threading.Event()
    real = os.pwrite

    def slow(fd: int, data: Any, offset: int) -> int:
        started.set()
        release.wait(5)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow)
    write = asyncio.ensure_future(b.write(0, b"w" * 512))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    closing = asyncio.ensure_future(b.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the fd stays open while a thread still uses it
    release.set()
    await write
    await closing
    assert b.closed and b._fd == -1
    with pytest.raises(DiskError) as info:
        await b.read(0, 512)
    assert info.value.errno == errno.EBADF
    monkeypatch.undo()
    assert (tmp_path / "c.img").read_bytes()[:512] == b"w" * 512


async def test_one_disk_holds_at_most_max_inflight_workers(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    b = DiskBackend.open(tmp_path / "m.img", size=MiB, max_inflight=2)
    lock = threading.Lock()
    now = peak = 0
    real = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        time.sleep(0.01)
        with lock:
            now -= 1
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    monkeypatch.setattr(os, "preadv", _not_cached)  # take the pool path, not the cached fast path
    try:
        await asyncio.gather(*(b.read(i * 512, 512) for i in range(20)))
        assert peak == 2
    finally:
        await b.close()


def test_close_sync(tmp_path: Path) -> None:
    b = DiskBackend.open(tmp_path / "s.img", size=4096)
    b.close_sync()
    assert b.closed
    b.close_sync()  # idempotent


async def test_concurrent_io_on_two_disks(tmp_path: Path) -> None:
    disks = [DiskBackend.open(tmp_path / f"{n}.img", size=4 * MiB) for n in range(2)]
    rng = random.Random(99)
    chunks = {(d, i): rng.randbytes(32 * 1024) for d in range(2) for i in range(32)}
    try:
        await asyncio.gather(*(disks[d].write(i * 64 * 1024, data, fua=i % 8 == 0)
                               for (d, i), data in chunks.items()))
        reads = await asyncio.gather(*(disks[d].read(i * 64 * 1024, 32 * 1024) for (d, i) in chunks))
        assert reads == list(chunks.values())
    finally:
        for d in disks:
            await d.close()


def _not_cached(*args: object) -> int:
    raise BlockingIOError(11, "would block (not in the page cache)")


async def test_cached_reads_are_served_without_a_pool_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = DiskBackend.open(tmp_path / "f.img", size=MiB)
    await b.write(4096, b"\x5a" * 4096)
    submitted: list[object] = []
    real_drain = DiskBackend._drain

    def counting_drain(self: DiskBackend) -> None:
        submitted.append(self)
        real_drain(self)

    monkeypatch.setattr(DiskBackend, "_drain", counting_drain)
    assert await b.read(4096, 4096) == b"\x5a" * 4096  # in the page cache: RWF_NOWAIT succeeds inline
    assert submitted == []
    monkeypatch.setattr(os, "preadv", _not_cached)  # now pretend it would block: the pool serves it
    assert await b.read(4096, 4096) == b"\x5a" * 4096
    assert len(submitted) == 1
    await b.close()


# -- zeroing and the allocation map ----------------------------------------------------------------

async def test_write_zeroes_keeps_the_range_allocated(backend: DiskBackend) -> None:
    await backend.write(0, b"\x11" * (2 * MiB))
    await backend.flush()
    before = os.stat(backend.path).st_blocks
    await backend.write_zeroes(4096, MiB)
    assert await backend.read(0, 2 * MiB) == b"\x11" * 4096 + bytes(MiB) + b"\x11" * (MiB - 4096)
    assert os.stat(backend.path).st_blocks >= before - 8  # not a hole
    assert await backend.allocation(0, 2 * MiB, 16) == [(0, 2 * MiB, True)]


async def test_write_zeroes_falls_back_to_writing_zeros(backend: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(disk_mod, "_fallocate", unsupported)
    await backend.write(0, b"\x22" * MiB)
    await backend.write_zeroes(512, 1024)
    assert await backend.read(0, 2048) == b"\x22" * 512 + bytes(1024) + b"\x22" * 512


async def test_allocation_follows_seek_data_and_seek_hole(backend: DiskBackend) -> None:
    size = backend.size
    assert await backend.allocation(0, size, 16) == [(0, size, False)]  # a fresh sparse image
    await backend.write(MiB, b"\x01" * MiB)
    await backend.write(size - 4096, b"\x02" * 4096)
    assert await backend.allocation(0, size, 16) == [
        (0, MiB, False), (MiB, MiB, True), (2 * MiB, size - 4096 - 2 * MiB, False), (size - 4096, 4096, True)]
    assert await backend.allocation(MiB + 512, MiB, 16) == [(MiB + 512, MiB - 512, True), (2 * MiB, 512, False)]
    assert await backend.allocation(0, size, 2) == [(0, MiB, False), (MiB, MiB, True)]  # limit
    await backend.discard(MiB, MiB)
    assert (await backend.allocation(0, size, 16))[0] == (0, size - 4096, False)
    with pytest.raises(DiskError):
        await backend.allocation(size - 512, 1024, 4)
