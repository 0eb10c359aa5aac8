"""Runs the commands of a lab's handout as a student would type them (issue 13: every command in a handout
is run by a test).

The convention (labs/README.md, "Writing a lab"): fenced blocks tagged ``sh`` are commands, one per line
(``\\`` continues a line); other blocks (``console``, ``text``, ``mermaid``) are not run. A block whose first
line is ``# terminal N ...`` runs its commands in the background, each in its own session, for the rest of
the handout; at the end each gets Ctrl-C and must exit 0. Any other command must exit 0, or the status its
``# exits N`` comment states. Commands run in a scratch directory of symlinks to the repository's
top-level entries (so ``./var`` and ``./run`` are the test's own) with the venv's ``bin`` first on PATH, as a
student who has done the lab runs them: there, each lab's ``starter/`` is its ``solution/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
EXITS = re.compile(r"#\s*exits\s+(\d+)\b")
TERMINAL = re.compile(r"^#\s*terminal\s+\d+", re.I)
COMMAND_TIMEOUT = 300.0


@dataclass
class Command:
    line: str
    background: bool
    exits: int = 0


def commands(markdown: str) -> list[Command]:
    out: list[Command] = []
    for lang, body in FENCE.findall(markdown):
        if lang != "sh":
            continue
        lines = body.splitlines()
        background = bool(lines) and bool(TERMINAL.match(lines[0].strip()))
        joined: list[str] = []
        for raw in lines:
            if joined and joined[-1].endswith("\\"):
                joined[-1] = joined[-1][:-1].rstrip() + " " + raw.strip()
            else:
                joined.append(raw.strip())
        for line in joined:
            if not line or line.startswith("#"):
                continue
            m = EXITS.search(line)
            out.append(Command(line, background, int(m.group(1)) if m else 0))
    return out


def scratch(tmp: Path) -> Path:
    """A directory that looks like the checkout (symlinks) but keeps what commands write to itself."""
    work = tmp / "checkout"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {"var", "run", ".git", "labs"}:
            (work / entry.name).symlink_to(entry)
    for entry in (REPO / "labs").iterdir():
        target = work / "labs" / entry.name
        target.parent.mkdir(exist_ok=True)
        if entry.is_dir() and (entry / "solution").is_dir():
            target.mkdir()
            for part in entry.iterdir():
                (target / part.name).symlink_to(entry / ("solution" if part.name == "starter" else part.name))
        else:
            target.symlink_to(entry)
    return work


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_handout(readme: Path, tmp: Path) -> list[str]:
    """Run every command; the transcript (command, exit status, last lines) of each, for the failure message."""
    for port in (6464, 8080):
        assert _port_free(port), f"port {port} is taken: a handout's parent uses the embedded defaults"
    work = scratch(tmp)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NO_COLOR": "1",
           "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
           "VENV": str(Path(sys.executable).parent.parent)}  # make's venv: the real one, not the symlink
    background: list[tuple[Command, subprocess.Popen[bytes], Path]] = []
    transcript: list[str] = []
    try:
        for i, cmd in enumerate(commands(readme.read_text())):
            log = tmp / f"cmd{i}.log"
            if cmd.background:
                with log.open("wb") as out:
                    proc = subprocess.Popen(["bash", "-c", cmd.line], cwd=work, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                background.append((cmd, proc, log))
                transcript.append(f"$ {cmd.line} &")
                continue
            with log.open("wb") as out:
                try:
                    rc = subprocess.run(["bash", "-c", cmd.line], cwd=work, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT, check=False).returncode
                except subprocess.TimeoutExpired:
                    rc = -1
            tail = log.read_text(errors="replace").splitlines()[-15:]
            transcript.append(f"$ {cmd.line}  -> exit {rc}\n" + "\n".join("    " + t for t in tail))
            assert rc == cmd.exits, (f"{readme.relative_to(REPO)}: `{cmd.line}` exited {rc}, expected "
                                     f"{cmd.exits}\n" + "\n".join(transcript[-3:]))
            for bcmd, proc, blog in background:
                assert proc.poll() is None, (f"{readme.relative_to(REPO)}: background `{bcmd.line}` exited "
                                             f"{proc.returncode}:\n{blog.read_text(errors='replace')[-2000:]}")
    finally:
        for bcmd, proc, blog in reversed(background):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            transcript.append(f"$ {bcmd.line} (Ctrl-C) -> exit {rc}")
            if rc not in (0, -signal.SIGINT, 130):
                raise AssertionError(f"{readme.relative_to(REPO)}: `{bcmd.line}` exited {rc} on Ctrl-C:\n"
                                     + blog.read_text(errors="replace")[-2000:])
    return transcript

