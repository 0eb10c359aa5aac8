"""Start and stop a real ``parent-partition serve`` daemon as a subprocess for the benchmarks.

The daemon gets a temporary TOML config (listeners on 127.0.0.1 port 0 and a Unix socket in a temporary
directory, a temporary data dir, the chosen ``[devices]``) and JSON logs in a file. The bound TCP port is
read back from its ``parent partition listening`` log line. Below info level that line is not logged, so
a free port is picked first and the daemon is ready once its Unix socket exists.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vmbus_proto.devices.registry import REGISTRY

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICES = tuple(e.name for e in REGISTRY)  # every registered device: the [devices] table names each


def raise_nofile() -> None:
    """Raise the soft open-files limit to the hard limit (used in every benchmark process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def child_env() -> dict[str, str]:
    """Environment for benchmark subprocesses: the repo importable, no bytecode writes, quiet asyncio."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONASYNCIODEBUG", None)
    return env


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string for these paths


@dataclass
class ParentProcess:
    proc: subprocess.Popen[bytes]
    endpoints: list[str]
    log_path: Path
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def endpoint(self, kind: str) -> str:
        """The listener for ``kind``: "tcp", "unix", or "shared" (the Unix one, where a guest shares its memory)."""
        kind = "unix" if kind == "shared" else kind
        for ep in self.endpoints:
            if ep.startswith(kind + ":"):
                return ep
        raise LookupError(f"parent has no {kind} listener: {self.endpoints}")

    def _all(self) -> list[psutil.Process]:
        """The parent and its worker processes (``[parent] workers``)."""
        try:
            return [self.ps, *self.ps.children()]
        except psutil.Error:
            return [self.ps]

    def rss(self) -> int:
        return sum(int(p.memory_info().rss) for p in self._all())

    def cpu_seconds(self) -> float:
        return sum(float(t.user + t.system) for t in (p.cpu_times() for p in self._all()))

    def log_lines(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = {"level": "raw", "event": line.rstrip()}
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def events(self, event: str, **fields: object) -> list[dict[str, object]]:
        """The log lines of ``event`` whose ``fields`` have these values."""
        return [x for x in self.log_lines()
                if x.get("event") == event and all(x.get(k) == v for k, v in fields.items())]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the daemon's graceful shutdown), then SIGKILL if it overstays ``timeout``."""
        return stop_process(self.proc, signal.SIGTERM, timeout)


def stop_process(proc: subprocess.Popen[Any], sig: int, timeout: float) -> int:
    """Stop ``proc`` the way a user would (``sig``: SIGTERM for the daemon, SIGINT for a child, which then
    unloads), SIGKILL if it overstays ``timeout``; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_parent(workdir: Path, devices: set[str], *, log_level: str = "info",
                 wrap: list[str] | None = None, timeout: float = 30.0, extra_config: str = "",
                 extra_listen: tuple[str, ...] = (), workers: int = 1) -> ParentProcess:
    """Start the daemon with only ``devices`` enabled; returns once it logged its bound listeners.

    ``wrap`` runs the daemon under another Python tool, e.g. ``["-m", "pyinstrument", ...]``. ``workers``: its
    ``[parent] workers`` (1, the default, keeps every benchmark's figures those of one process).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "vmbus.sock"
    cfg = workdir / "parent.toml"
    logs_listen = log_level in ("debug", "info")
    port = 0 if logs_listen else _free_port()
    table = "\n".join(f"{d} = {'true' if d in devices else 'false'}" for d in DEVICES)
    cfg.write_text(
        "[parent]\n"
        f"listen = [{', '.join(_toml_str(u) for u in (f'tcp://127.0.0.1:{port}', f'unix:{sock}', *extra_listen))}]\n"
        f"data_dir = {_toml_str(str(workdir / 'var'))}\n"
        f"log_level = {_toml_str(log_level)}\n"
        f"workers = {workers}\n"
        f"\n[devices]\n{table}\n{extra_config}"
        # no web side unless asked for: the embedded default (8080) belongs to whoever runs the demo or a lab
        + ("" if "[http]" in extra_config else '\n[http]\nlisten = "none"\n'), encoding="utf-8")
    log_path = workdir / "parent.log"
    serve = ["-m", "parent_partition", "serve", "--config", str(cfg), "--json-logs"]
    cmd = [sys.executable, *(wrap or []), *serve]
    raise_nofile()  # rlimits are inherited: the daemon gets the raised limit too
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=child_env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"parent exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        if not logs_listen:
            if sock.is_socket():
                time.sleep(0.2)  # the daemon binds TCP, then the socket, then starts accepting
                return ParentProcess(proc, [f"tcp://127.0.0.1:{port}", f"unix:{sock}"], log_path)
            time.sleep(0.05)
            continue
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if "parent partition listening" in line:
                try:
                    listen = json.loads(line)["listen"]
                except (ValueError, KeyError):
                    continue
                return ParentProcess(proc, [str(x) for x in listen], log_path)
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"parent did not log its listeners within {timeout:g}s:\n{log_path.read_text()[-2000:]}")
