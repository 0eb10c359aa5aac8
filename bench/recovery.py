"""Time to recovery after kill -9 of the parent under write load, and what survived it.

One run: a real ``parent-partition serve`` and a real ``child-partition run --nbd``; ``qemu-io`` (under
``stdbuf -oL``, so each command's line comes as it completes) writes stamped 64 KiB blocks through the child's
NBD export, each followed by a ``flush`` (NBD FLUSH -> SYNCHRONIZE CACHE -> ``fdatasync`` in the parent). A block
counts as acknowledged once its write printed ``wrote`` and the command after its flush printed too (a flush
prints nothing unless it fails). After ``--flushed`` acknowledged blocks the parent is killed with SIGKILL while
writes are in flight and restarted on the same data directory; the child reconnects with its backoff. Then
every acknowledged block is read back through the guest (``qemu-io read -P``) and from the image file.

Times (monotonic, seconds): ``outage`` kill -> the child has every channel open again; ``restart_to_listening``
parent start -> its listening line; ``restart_to_open`` parent start -> the child's channels open again (the
figure the issue asks for; most of it is the child's reconnect backoff, 0.1 s doubling to 5 s);
``restart_to_write`` parent start -> the first of the guest's writes completed after it (the guest resumes).

    .venv/bin/python -m bench.recovery --runs 3 --json bench/results/2026-12-03-recovery/runs.json

A kill -9 of a process leaves the page cache alone, so this proves the daemon acknowledges nothing it has not
handed to the kernel and loses no state across its restart; a power cut is beyond what a process test can show.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .parent import ParentProcess, child_env, start_parent, stop_process

BLOCK = 64 * 1024
WROTE = re.compile(r"^wrote \d+/\d+ bytes at offset (\d+)")
FAILED = re.compile(r"^(write|flush) failed")


def stamp(i: int) -> int:
    """The byte block ``i`` is filled with (never 0, so a lost block never reads back as its stamp)."""
    return i % 251 + 1


class Lines:
    """A subprocess's output lines, each with the monotonic time it was read."""

    def __init__(self, proc: subprocess.Popen[str], stream: Any = None) -> None:
        self.proc = proc
        self.stream = stream if stream is not None else proc.stdout
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.stream is not None
        for line in self.stream:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip()))
                self.cond.notify_all()

    def wait(self, pred: Any, what: str, timeout: float = 120.0, start: int = 0) -> tuple[int, float, str]:
        """The first line from ``start`` on that ``pred`` accepts: (its index, when it came, the line)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if pred(line):
                        return i, t, line
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and i >= len(self.lines)):
                    tail = "\n".join(x for _, x in self.lines[-10:])
                    state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
                    raise RuntimeError(f"{what}: not seen in {timeout:g}s ({state}); last lines:\n{tail}")
                self.cond.wait(min(left, 0.2))


def acknowledged(lines: list[str]) -> list[int]:
    """Blocks whose write and the flush after it completed: ``wrote`` for the block, then a line of the next
    write (a failed flush would have printed its own line in between)."""
    out: list[tuple[str, int | None]] = []
    for line in lines:
        if (w := WROTE.match(line)) is not None:
            out.append(("wrote", int(w.group(1)) // BLOCK))
        elif (f := FAILED.match(line)) is not None:
            out.append((f.group(1), None))
    return [blk for (kind, blk), (nxt, _) in itertools.pairwise(out)
            if kind == "wrote" and blk is not None and nxt in ("wrote", "write")]


def written(lines: list[str]) -> list[int]:
    """Blocks whose write completed (with or without a flush after it)."""
    return [int(w.group(1)) // BLOCK for line in lines if (w := WROTE.match(line)) is not None]


class StampedWriter:
    """qemu-io writing stamped blocks 0, 1, ... through ``uri``, each followed by a flush, its lines as they come."""

    def __init__(self, uri: str, blocks: int) -> None:
        cmds = [a for i in range(blocks) for a in ("-c", f"write -P {stamp(i)} {i * BLOCK} {BLOCK}", "-c", "flush")]
        self.proc = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", *cmds, uri], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        self.out = Lines(self.proc)

    def lines(self) -> list[str]:
        with self.out.cond:
            return [x for _, x in self.out.lines]

    def wait_acknowledged(self, n: int, timeout: float) -> None:
        """Until block ``n - 1`` and its flush are done (the write of block ``n`` completed after them)."""
        self.out.wait(lambda x: x.startswith(f"wrote {BLOCK}/{BLOCK} bytes at offset {n * BLOCK}"),
                      f"{n} acknowledged flushes", timeout)

    def failed(self) -> list[str]:
        return [x for x in self.lines() if FAILED.match(x)]

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 60)
        self.out.thread.join(10)


def missing(image: Path, blocks: list[int]) -> list[int]:
    """Which of ``blocks`` the image file does not hold with their stamp."""
    lost: list[int] = []
    with open(image, "rb") as fh:
        for b in blocks:
            fh.seek(b * BLOCK)
            if fh.read(BLOCK) != bytes((stamp(b),)) * BLOCK:
                lost.append(b)
    return lost


def run_once(workdir: Path, flushed: int = 32, blocks: int = 4096, timeout: float = 120.0) -> dict[str, Any]:
    """One kill -9 and restart of the parent under write load; the figures and what was verified."""
    parent_dir = workdir / "parent"
    sock = workdir / "vm1.nbd"
    uri = f"nbd+unix:///vm1?socket={sock}"
    parent: ParentProcess | None = start_parent(parent_dir, {"storage"}, log_level="info")
    assert parent is not None
    guest = subprocess.Popen(
        [sys.executable, "-m", "child_partition", "run", "--connect", parent.endpoint("unix"), "--name", "vm1",
         "--nbd", f"unix:{sock}", "--json-logs"], env=child_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    guest_log = Lines(guest, guest.stderr)
    writer: StampedWriter | None = None
    try:
        guest_log.wait(lambda x: '"nbd server listening"' in x, "the child's NBD export", timeout)
        writer = StampedWriter(uri, blocks)
        out = writer.out
        writer.wait_acknowledged(flushed, timeout)
        mark = len(guest_log.lines)
        before_kill = len(acknowledged(writer.lines()))
        killed = time.monotonic()
        parent.proc.send_signal(signal.SIGKILL)
        parent.proc.wait(30)
        guest_log.wait(lambda x: '"session with the parent ended"' in x, "the child notices", timeout, mark)
        mark = len(guest_log.lines)
        restarted = time.monotonic()
        parent = None
        parent = start_parent(parent_dir, {"storage"}, log_level="info")
        listening = time.monotonic()
        _, opened, _ = guest_log.wait(lambda x: '"all offered channels open"' in x, "channels open again",
                                      timeout, mark)
        # The guest resumes: its writes go on through the reconnected channels.
        after = len(out.lines)
        _, resumed, _ = out.wait(lambda x: WROTE.match(x) is not None, "a write after the restart", timeout, after)
        failed = writer.failed()
        writer.stop()  # enough: what was acknowledged before now is what counts
        acked = acknowledged(writer.lines())
        # Every acknowledged block, through the guest and from the parent's image file.
        check = [a for b in acked for a in ("-c", f"read -P {stamp(b)} {b * BLOCK} {BLOCK}")]
        read = subprocess.run(["qemu-io", "-f", "raw", "-r", *check, uri], capture_output=True, text=True,
                              timeout=timeout, check=False)
        bad_guest = read.returncode != 0 or "Pattern verification failed" in read.stdout
        lost = missing(parent_dir / "var" / "vm1" / "lun0.img", acked)
        return {"acknowledged_blocks": len(acked), "acknowledged_before_kill": before_kill,
                "lost_blocks": len(lost), "lost": lost[:20],
                "guest_read_ok": not bad_guest, "outage_s": round(opened - killed, 3),
                "restart_to_listening_s": round(listening - restarted, 3),
                "restart_to_open_s": round(opened - restarted, 3), "restart_to_write_s": round(resumed - restarted, 3),
                "failed_commands": len(failed), "failed_sample": failed[:3]}
    finally:
        if writer is not None:
            writer.stop()
        stop_process(guest, signal.SIGINT, 30)
        if parent is not None:
            parent.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="kill -9 and restart cycles, each on a fresh data dir")
    ap.add_argument("--flushed", type=int, default=32, help="acknowledged flushes before the kill")
    ap.add_argument("--json", type=Path, help="write the runs here")
    args = ap.parse_args(argv)
    if shutil.which("qemu-io") is None or shutil.which("stdbuf") is None:
        print("python -m bench.recovery: needs qemu-io (qemu-utils) and stdbuf (coreutils)", file=sys.stderr)
        return 2
    runs = []
    for n in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="vmbus-recovery-") as tmp:
            r = run_once(Path(tmp), args.flushed)
        runs.append(r)
        print(f"run {n + 1}: {r['acknowledged_blocks']} acknowledged blocks "
              f"({r['acknowledged_before_kill']} before the kill), {r['lost_blocks']} lost, "
              f"guest read {'ok' if r['guest_read_ok'] else 'FAILED'}; parent start -> listening "
              f"{r['restart_to_listening_s']:.2f} s, -> child's channels open {r['restart_to_open_s']:.2f} s; "
              f"kill -> open {r['outage_s']:.2f} s; first write done {r['restart_to_write_s']:.2f} s after the "
              f"restart; "
              f"{r['failed_commands']} commands failed during the outage", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return 0 if all(r["lost_blocks"] == 0 and r["guest_read_ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
