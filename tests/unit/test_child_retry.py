"""The child's retry policy, with the bus replaced by stand-ins (no parent): which failures end the run,
with which status and line, and which are retried."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest

from child_partition import runner
from child_partition.bus import ParentRefused
from child_partition.runner import EXIT_LOST, EXIT_OK, EXIT_REFUSED, ChildPartition

URL = "tcp://127.0.0.1:6464"


class RefusingBus:
    """A bus whose parent refuses this partition's HELLO."""

    def __init__(self, kind: str, reason: str) -> None:
        self.error = ParentRefused(kind, reason)
        self.closing = False

    async def negotiate(self) -> dict[int, Any]:
        raise self.error

    def close(self) -> None:
        self.closing = True


def run_child(monkeypatch: pytest.MonkeyPatch, connect: Any, *, reconnect: bool = True,
              negotiated: bool = False, attempts_before_stop: int = 3) -> tuple[int, ChildPartition, int]:
    """Run a child against ``connect`` (returns a bus or raises); stop it after that many attempts."""
    calls = 0

    async def main() -> tuple[int, ChildPartition]:
        stop = asyncio.Event()

        async def open_bus(*_: Any, **__: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls >= attempts_before_stop:
                stop.set()
            return connect()

        monkeypatch.setattr(runner, "open_bus", open_bus)
        child = ChildPartition(URL, "vm1", reconnect=reconnect)
        child.negotiated = negotiated
        status = await asyncio.wait_for(child.run(stop), 30)
        return status, child

    status, child = asyncio.run(main())
    return status, child, calls


def test_a_taken_name_ends_the_run_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    status, child, calls = run_child(monkeypatch, lambda: RefusingBus("name-taken", "partition name 'vm1' is ..."))
    assert (status, calls) == (EXIT_REFUSED, 1)
    assert child.failure == (f"partition name 'vm1' is already connected to the parent at {URL}; "
                             "choose another --name (or stop the child that uses this one)")


def test_a_taken_name_after_our_own_session_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent may still hold our previous connection: that refusal passes once it notices."""
    status, child, calls = run_child(monkeypatch, lambda: RefusingBus("name-taken", "taken"), negotiated=True)
    assert (status, calls, child.failure) == (EXIT_OK, 3, None)


def test_no_version_in_common_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    status, child, _ = run_child(monkeypatch, lambda: RefusingBus("versions", "host refused every VMBus version "
                                                                             "tried (5.3)"))
    assert status == EXIT_REFUSED and child.failure is not None
    assert child.failure.startswith(f"the parent at {URL} refused this child: host refused every VMBus version "
                                    "tried (5.3); drop --vmbus-version")


def refused() -> Any:
    raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")


def unknown_host() -> Any:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_no_parent_yet_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    status, child, calls = run_child(monkeypatch, refused)
    assert (status, calls, child.failure) == (EXIT_OK, 3, None)


def test_no_parent_without_reconnect_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    status, child, calls = run_child(monkeypatch, refused, reconnect=False)
    assert (status, calls) == (EXIT_LOST, 1)
    assert child.failure == (f"no parent at {URL} (connection refused); start one with "
                             f"'parent-partition serve --listen {URL}'")


def test_an_unknown_host_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    status, child, calls = run_child(monkeypatch, unknown_host)
    assert (status, calls) == (EXIT_REFUSED, 1)
    assert child.failure == f"cannot connect to the parent at {URL}: cannot resolve the host: Name or service not known"
