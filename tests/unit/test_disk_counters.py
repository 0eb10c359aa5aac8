"""DiskBackend's I/O counters (``stats()``, the ``disk closed`` log line) on real image files.

The benchmark reads them to tell a warm page cache from a cold one, or a filesystem without non-blocking
buffered reads; RWF_NOWAIT refusals are forced with a patched ``os.preadv`` so they do not depend on the
page cache's state.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from parent_partition.devices.storage.disk import DiskBackend

MiB = 1 << 20
READ_KEYS = ("reads_inline", "reads_nowait_refused", "reads_pool")


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[DiskBackend]:
    b = DiskBackend.open(tmp_path / "d.img", size=4 * MiB)
    yield b
    await b.close()


def preadv_that_fails(monkeypatch: pytest.MonkeyPatch, exc: OSError) -> list[int]:
    """Make every ``os.preadv`` raise ``exc``; returns the list its calls are counted in."""
    calls: list[int] = []

    def fake(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        calls.append(offset)
        raise exc

    monkeypatch.setattr(os, "preadv", fake)
    return calls


async def test_fresh_disk_counts_nothing(backend: DiskBackend) -> None:
    stats = backend.stats()
    assert {k: v for k, v in stats.items() if not k.startswith("nowait_")} == {
        "reads_inline": 0, "reads_nowait_refused": 0, "reads_pool": 0, "writes_inline": 0, "writes_pool": 0}


async def test_every_read_and_write_is_counted_once(backend: DiskBackend) -> None:
    data = os.urandom(8192)
    await backend.write(0, data)
    await backend.write(MiB, data, fua=True)
    assert await backend.read(0, 8192) == data
    assert await backend.read(MiB, 8192) == data
    await backend.read_soon(2 * MiB, 4096)
    stats = backend.stats()
    assert stats["writes_inline"] + stats["writes_pool"] == 2, stats
    assert stats["writes_pool"] >= 1, f"a FUA write must go to the pool (fdatasync): {stats}"
    # Each read is inline or pooled; read_soon is always pooled. Where the filesystem has no RWF_NOWAIT
    # (tmpfs), every read is pooled and nowait_read reports it.
    assert stats["reads_inline"] + stats["reads_pool"] == 3, stats
    assert stats["reads_pool"] >= 1, stats
    if not stats["nowait_read"]:
        assert stats["reads_pool"] == 3, stats


async def test_refused_read_is_counted_and_pooled(backend: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(4096)
    await backend.write(4096, data)
    if not backend.stats()["nowait_read"]:
        pytest.skip("RWF_NOWAIT reads are not available here")
    calls = preadv_that_fails(monkeypatch, BlockingIOError(errno.EAGAIN, "would block"))
    assert await backend.read(4096, 4096) == data
    assert calls == [4096], f"the inline attempt was not made once: {calls}"
    assert {k: backend.stats()[k] for k in READ_KEYS} == {"reads_inline": 0, "reads_nowait_refused": 1,
                                                           "reads_pool": 1}
    assert backend.stats()["nowait_read"], "an EAGAIN must not switch the inline path off"


async def test_unsupported_nowait_turns_the_inline_path_off(backend: DiskBackend,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if not backend.stats()["nowait_read"]:
        pytest.skip("RWF_NOWAIT reads are not available here")
    calls = preadv_that_fails(monkeypatch, OSError(errno.EOPNOTSUPP, "not supported"))
    await backend.read(0, 4096)
    await backend.read(4096, 4096)
    stats = backend.stats()
    assert len(calls) == 1, f"the inline path was tried again after EOPNOTSUPP: {calls}"
    assert stats["nowait_read"] is False, stats
    assert (stats["reads_inline"], stats["reads_nowait_refused"], stats["reads_pool"]) == (0, 0, 2), stats


async def test_close_logs_the_counters(tmp_path: Path) -> None:
    disk = DiskBackend.open(tmp_path / "d.img", size=MiB)
    await disk.write(0, b"x" * 512)
    await disk.read(0, 512)
    expected = disk.stats()
    with capture_logs() as logs:
        await disk.close()
    closed = [e for e in logs if e.get("event") == "disk closed"]
    assert len(closed) == 1, f"expected one 'disk closed' line, got {logs}"
    assert closed[0]["path"] == str(tmp_path / "d.img")
    assert {k: closed[0][k] for k in expected} == expected, closed[0]
