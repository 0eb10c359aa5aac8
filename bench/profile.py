"""Sample the parent daemon (and the benchmark's guest side) during a VMBus 1 KiB run with py-spy.

py-spy attaches from outside (``record --pid --nonblocking``), so the measured code is unchanged. Its
folded stacks are summarised as the top functions by self and by inclusive samples.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import uvloop

from . import vmbus_echo
from .parent import REPO_ROOT, start_parent

_STRIP = re.compile(r"\((?:.*?/site-packages/|.*?/lib/python3\.\d+/|" + re.escape(str(REPO_ROOT)) + "/)")


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def summarise(folded: Path, top: int = 25) -> dict[str, Any]:
    """Top frames of py-spy's raw (folded) output: self samples and inclusive samples, in percent."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        if " " not in line:
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        total += n
        frames = [_STRIP.sub("(", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    pct = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {"samples": total,
            "self": [[f, pct(n)] for f, n in own.most_common(top)],
            "inclusive": [[f, pct(n)] for f, n in incl.most_common(top)]}


def profile_vmbus(workdir: Path, outdir: Path, seconds: float, window: int, transport: str = "tcp",
                  size: int = 1024) -> dict[str, Any]:
    """``transport``: "tcp", "unix" (streaming) or "shared" (the Unix socket with shared memory)."""
    spy = find_py_spy()
    if spy is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    outdir.mkdir(parents=True, exist_ok=True)
    parent = start_parent(workdir / "profile-parent", {"echo"})
    result: dict[str, Any] = {"transport": transport, "size": size, "window": window, "seconds": seconds}
    try:
        spies = {}
        for who, pid in (("parent", parent.pid), ("guest", os.getpid())):
            out = outdir / f"profile-{who}-{size}-{transport}.folded"
            spies[who] = (out, subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--duration", str(int(seconds + 1)), "--rate", "500",
                 "--nonblocking", "--format", "raw", "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        result["run"] = uvloop.run(vmbus_echo.measure(parent.endpoint(transport), size, window, seconds, 0.5,
                                                      parent.pid, name="bench-profile", shared=transport == "shared"))
        for who, (out, proc) in spies.items():
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0 or not out.exists():
                result[who] = {"error": err.decode(errors="replace")[-500:]}
            else:
                result[who] = summarise(out) | {"folded": str(out)}
    finally:
        parent.stop()
    return result
