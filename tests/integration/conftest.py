"""Integration fixtures: a real parent daemon and real child processes on loopback TCP and Unix sockets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from child_partition.runner import EXIT_REFUSED
from vmbus_proto.devices.registry import ALL as OFFERED

from .netns import netns_factory, tap_allowed  # noqa: F401  (network namespace fixtures)
from .rawclient import RawClient

BIN = Path(sys.executable).parent
OPEN_MODE_NOTICE = "partitions with no secret configured may connect unauthenticated"


class Proc:
    """A subprocess whose JSON log lines (stderr) are collected by a thread."""

    def __init__(self, cmd: list[str], cwd: Path, name: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.name = name
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, text=True, start_new_session=True)
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"event": line.rstrip(), "level": "raw"})
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                 start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    if pred(self.lines[i]):
                        return self.lines[i]
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and i >= len(self.lines)):
                    sys.stderr.write(f"--- last log lines of {self.name} ---\n" + "".join(self.raw[-30:]))
                    state = "still running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
                    last = self.lines[-1].get("event", "?") if self.lines else "nothing logged"
                    raise AssertionError(f"{self.name} ({state}): expected log line not seen in {timeout:g}s; "
                                         f"last line: {str(last)[:160]!r}")
                self._cond.wait(min(remaining, 0.2))

    def wait_event(self, event: str, timeout: float = 30.0, start: int = 0, **fields: Any) -> dict[str, Any]:
        return self.wait_for(lambda r: r.get("event") == event and all(r.get(k) == v for k, v in fields.items()),
                             timeout, start)

    def wait_count(self, event: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``event`` has been logged ``count`` times (lines reach us through a pipe, after the peer
        that caused them may already have seen the result); more than ``count`` fails at once."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self.lines if r.get("event") == event]
                assert len(got) <= count, f"{self.name}: {event!r} logged {len(got)} times, expected {count}"
                if len(got) == count:
                    return got
                left = deadline - time.monotonic()
                assert left > 0, f"{self.name}: {event!r} logged {len(got)} times in {timeout:g}s, expected {count}"
                self._cond.wait(left)

    def events(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.lines if r.get("event") == event]

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def complaints(self) -> list[dict[str, Any]]:
        """Warnings and errors logged, but the parent's start-up notice that the open mode takes unauthenticated
        partitions on its local listeners (README, Authentication)."""
        with self._cond:
            return [r for r in self.lines if r.get("level") in ("warning", "error")
                    and not str(r.get("event", "")).startswith(OPEN_MODE_NOTICE)]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._thread.join(5)
        return code


class Parent(Proc):
    def __init__(self, workdir: Path, config: str = "", extra: list[str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "parent.toml"
        cfg.write_text(config)
        self.unix_path = workdir / "run" / "vmbus.sock"
        cmd = [str(BIN / "parent-partition"), "serve", "--config", str(cfg), "--json-logs",
               "--listen", "tcp://127.0.0.1:0", "--listen", f"unix:{self.unix_path}",
               "--data-dir", str(workdir / "var"), *(extra or [])]
        if "--http" not in cmd:
            cmd += ["--http", "none"]  # tests that want the web side pass --http 127.0.0.1:0
        if "--workers" not in cmd and "workers" not in config:
            # One process, whose fds, memory and disks the tests inspect by its pid; test_workers.py runs more.
            cmd += ["--workers", "1"]
        super().__init__(cmd, workdir, "parent")
        ready = self.wait_event("parent partition listening")
        self.tcp = next(u for u in ready["listen"] if u.startswith("tcp://"))
        self.unix = f"unix:{self.unix_path}"


def child(workdir: Path, url: str, name: str, *extra: str) -> Proc:
    return Proc([str(BIN / "child-partition"), "run", "--connect", url, "--name", name, "--json-logs", *extra],
                workdir, name)


def gave_up(proc: Proc, status: int = EXIT_REFUSED, timeout: float = 60.0) -> str:
    """A child that must give up by itself, not retry: its exit status is ``status`` (a refusal's by default)
    and its only non-log line, returned, is the reason."""
    try:
        code = proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise AssertionError(f"{proc.name} did not give up within {timeout:g}s (it kept retrying?)") from None
    proc.stop()
    plain = [str(r["event"]) for r in proc.lines if r.get("level") == "raw"]
    assert code == status, f"{proc.name} exited {code}, not {status}: {plain}"
    assert len(plain) == 1, f"{proc.name} printed {len(plain)} lines besides its log, not one: {plain}"
    return plain[0]


@contextlib.contextmanager
def bystander_of(parent: Parent, workdir: Path) -> Iterator[Proc]:
    """A child that shares ``parent`` with a test's misbehaving guests and must never notice them."""
    vm = child(workdir, parent.unix, "bystander")
    vm.wait_event("all offered channels open")
    yield vm
    assert not vm.events("session with the parent ended"), "the bystander noticed another partition's trouble"
    assert vm.stop() == 0


# Short enough that tests of the timeouts run quickly, long enough that a loaded machine never trips them.
FAST_LIMITS = """
[parent]
handshake_timeout = 3.0
stall_timeout = 3.0
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def parent(tmp_path: Path) -> Iterator[Parent]:
    p = Parent(tmp_path / "parent", FAST_LIMITS)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def shared_parent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parent]:
    p = Parent(tmp_path_factory.mktemp("shared") / "parent", FAST_LIMITS)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def bystander(shared_parent: Parent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    with bystander_of(shared_parent, tmp_path_factory.mktemp("bystander")) as vm:
        yield vm


@pytest.fixture
def survived_parent(shared_parent: Parent, bystander: Proc) -> Iterator[Parent]:
    """The shared parent for one case of bad input; after it the daemon is alive and still serves a newcomer
    every offer."""
    yield shared_parent
    ok = RawClient(shared_parent.tcp)
    offers = ok.negotiate(f"healthy-{time.monotonic_ns()}")
    assert len(offers) == len(OFFERED)
    ok.close()
    assert shared_parent.proc.poll() is None
