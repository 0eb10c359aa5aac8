"""What every lab's grader is made of: steps with points, a context that loads the student's code, and real
parent and child partitions to run it against.

The model is MIT 6.1810's ``make grade``: each lab folder has a ``grader.py`` whose ``LAB`` lists its steps;
a step is a function that raises :class:`Failed` (or any exception, or fails an ``assert``) with a sentence
the student can act on. The same grader grades the student's ``starter/`` and the reference ``solution/``
(``make grade LAB=N SOLUTION=1``); ``starter_fails`` names the steps the untouched starter must fail, and CI
checks both directions (tests/labs/test_labs.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO

REPO = Path(__file__).resolve().parent.parent
LABS = REPO / "labs"
BIN = Path(sys.executable).parent  # the venv's scripts: parent-partition, child-partition


class Failed(Exception):
    """A step's check did not hold; the message says what the student should look at."""


@dataclass(frozen=True)
class Step:
    name: str
    points: int
    check: Callable[[Context], None]
    hint: str = ""  # printed under a failed step


@dataclass(frozen=True)
class Lab:
    number: int
    title: str
    difficulty: str  # "easy", "moderate" or "hard", as 6.1810 tags its exercises
    steps: list[Step]
    starter_fails: frozenset[str] = frozenset()  # steps the untouched starter must fail (CI checks)

    @property
    def total(self) -> int:
        return sum(s.points for s in self.steps)


@dataclass
class Context:
    """What a step sees: the folder it grades (``starter/`` or ``solution/``) and a scratch directory."""

    lab_dir: Path
    code: Path
    tmp: Path
    _modules: dict[str, ModuleType] = field(default_factory=dict)

    def load(self, name: str) -> ModuleType:
        """Import ``<code>/<name>.py`` under a private name (a starter and a solution never mix)."""
        if name not in self._modules:
            path = self.code / f"{name}.py"
            if not path.exists():
                raise Failed(f"{path.relative_to(REPO)} is missing")
            spec = importlib.util.spec_from_file_location(f"_lab_{self.code.parent.name}_{self.code.name}_{name}",
                                                          path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            self._modules[name] = module
        return self._modules[name]

    def text(self, name: str) -> str:
        path = self.code / name
        if not path.exists():
            raise Failed(f"{path.relative_to(REPO)} is missing")
        return path.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A partition process whose output goes to a file the grader reads (never a pipe nobody drains)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv, self.log = argv, log
        self._out: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, cwd=cwd,
                                      env={**os.environ, "NO_COLOR": "1", **(env or {})},
                                      start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """Wait until ``text`` shows in the output; the output so far."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if text in out:
                return out
            if self.popen.poll() is not None:
                raise Failed(f"{Path(self.argv[0]).name} exited {self.popen.returncode} before printing "
                             f"{text!r}; its last lines:\n{_tail(out)}")
            if time.monotonic() > deadline:
                raise Failed(f"{Path(self.argv[0]).name} did not print {text!r} within {timeout:g}s; "
                             f"its last lines:\n{_tail(out)}")
            time.sleep(0.05)

    def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl-C, as a user stops it; its exit status (killed if it does not stop in time)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._out.close()
        return self.popen.returncode


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


@contextlib.contextmanager
def parent(tmp: Path, *args: str, config: str = "") -> Iterator[tuple[Proc, str]]:
    """A real ``parent-partition serve`` on a free loopback port (no web console unless asked); yields it and
    the URL a child connects to. Stopped with Ctrl-C at the end."""
    port = free_port()
    argv = [str(BIN / "parent-partition"), "serve", "--listen", f"tcp://127.0.0.1:{port}",
            "--data-dir", str(tmp / "var"), *args]
    if "--http" not in args:
        argv += ["--http", "none"]
    if config:
        (tmp / "parent.toml").write_text(config)
        argv += ["--config", str(tmp / "parent.toml")]
    proc = Proc(argv, tmp / "parent.log")
    url = f"tcp://127.0.0.1:{port}"
    try:
        proc.wait_for("parent partition listening")  # probe does not retry a refused connection
        probe = subprocess.run([str(BIN / "child-partition"), "probe", "--connect", url, "--timeout", "60"],
                               check=False, capture_output=True, text=True, timeout=90)
        if probe.returncode != 0:
            raise Failed(f"the parent did not come up: {probe.stderr.strip()}\n{_tail(proc.output())}")
        yield proc, url
    finally:
        proc.interrupt()


def child(tmp: Path, url: str, name: str, *args: str) -> Proc:
    """A real ``child-partition run`` named ``name``; its log is ``<tmp>/<name>.log``."""
    return Proc([str(BIN / "child-partition"), "run", "--connect", url, "--name", name, "--no-reconnect", *args],
                tmp / f"{name}.log")
