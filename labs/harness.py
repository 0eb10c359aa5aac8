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
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).absolute().parent.parent  # not resolve(): a checkout of symlinks is graded as itself
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
            private = f"_lab_{self.code.parent.name}_{self.code.name}_{name}"
            sys.modules.pop(private, None)  # each step imports the graded file afresh
            self._modules[name] = import_file(path, private)
        return self._modules[name]

    def text(self, name: str) -> str:
        path = self.code / name
        if not path.exists():
            raise Failed(f"{path.relative_to(REPO)} is missing")
        return path.read_text()


def import_file(path: Path, name: str) -> ModuleType:
    """The Python file at ``path`` as module ``name``, imported once (a lab's helpers and graded files live
    in folders that are not packages)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


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
        return self.wait_until(lambda out: out if text in out else None, f"printing {text!r}", timeout)

    def wait_until(self, check: Callable[[str], T | None], what: str, timeout: float = 60.0) -> T:
        """Wait until ``check(output)`` returns something other than None, and return that; ``what`` names the
        awaited thing in the failure (``"printing 'x'"``). ``check`` may raise :class:`Failed` to stop early."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            got = check(out)
            if got is not None:
                return got
            if self.popen.poll() is not None:
                raise Failed(f"{Path(self.argv[0]).name} exited {self.popen.returncode} before {what}; "
                             f"its last lines:\n{_tail(out)}")
            driver_failed(out, what)
            if time.monotonic() > deadline:
                raise Failed(f"{Path(self.argv[0]).name} did not get to {what} within {timeout:g}s; "
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


#: What a child logs when a driver raised: it carries on without that device, so nothing awaited comes.
DRIVER_FAILED = ("device failed to attach", "device driver failed")


def driver_failed(out: str, what: str) -> None:
    """Fail at once, not at a deadline, when a device driver in this output has failed."""
    for line in out.splitlines():
        if any(phrase in line for phrase in DRIVER_FAILED):
            raise Failed(f"a device driver failed before {what}: {line.strip()}\n{_tail(out)}")


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
        proc.wait_for("parent partition listening")  # a parent that fails to start says why here
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


# ---- reading a --trace log (labs 1 and 4) -------------------------------------------------------------------

_TRACE = re.compile(r"\b(G>H|H>G) CHANNELMSG_(\w+)\((\d+)\)(.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")
_PFNS = re.compile(r"\((\d+) pfns\)")


@dataclass(frozen=True)
class TraceMsg:
    """One control message line of a ``--trace`` log: ``G>H CHANNELMSG_GPADL_BODY(9) msgnumber=0 gpadl=...``."""

    direction: str  # "G>H" (child to parent) or "H>G"
    name: str  # without the CHANNELMSG_ prefix: "GPADL_BODY"
    number: int  # its CHANNELMSG number: 9
    fields: dict[str, str]  # "gpadl": "0xe1e11", "if_type": "ba6163d9-...(storage)", ...
    text: str  # the rest of the line as printed

    def num(self, key: str) -> int:
        """A numeric field (decimal or 0x hex)."""
        return int(self.fields[key], 0)

    @property
    def pfn_count(self) -> int:
        """Page numbers a GPADL_HEADER or GPADL_BODY carries (the ``(N pfns)`` of its ``pfns=`` field)."""
        m = _PFNS.search(self.text)
        return int(m.group(1)) if m else 0


def control_messages(log: str) -> list[TraceMsg]:
    """Every VMBus control message a ``--trace`` log shows, in order."""
    out: list[TraceMsg] = []
    for line in log.splitlines():
        m = _TRACE.search(line)
        if m:
            direction, name, number, rest = m.groups()
            out.append(TraceMsg(direction, name, int(number), dict(_FIELD.findall(rest)), rest))
    return out


# ---- answers files (questions a student answers in starter/answers.toml) ------------------------------------

def answers(ctx: Context, name: str = "answers.toml") -> dict[str, Any]:
    """The student's answers file, parsed; a TOML mistake is a Failed that says where."""
    try:
        return tomllib.loads(ctx.text(name))
    except tomllib.TOMLDecodeError as exc:
        raise Failed(f"{(ctx.code / name).relative_to(REPO)} is not valid TOML: {exc}") from None


def answer(table: dict[str, Any], key: str) -> Any:
    """``table[key]`` where ``key`` is dotted (``"version.negotiated"``); Failed if it is missing or empty."""
    value: Any = table
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise Failed(f"answers.toml has no {key}")
        value = value[part]
    if value in ("", [], 0, None):
        raise Failed(f"{key} is not answered yet")
    return value


def key_terms(text: str, groups: list[tuple[str, ...]], key: str, min_words: int = 8) -> None:
    """A lenient check of a written answer: it has ``min_words`` words and names at least one term of each
    group (case-insensitive substrings). A grader cannot judge prose; this only catches a blank or
    off-topic answer, and your instructor reads the rest."""
    if not isinstance(text, str) or len(text.split()) < min_words:
        raise Failed(f"{key}: write a sentence or two (at least {min_words} words)")
    low = text.lower()
    missing = [" / ".join(g) for g in groups if not any(t.lower() in low for t in g)]
    if missing:
        raise Failed(f"{key}: the answer should say something about " + "; and about ".join(missing))
