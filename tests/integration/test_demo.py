"""`parent-partition demo` as a real process: the narrated walk, the summaries, the disk work and clean stops.

Each test waits for lines of the demo's own output (a condition), never for a time; --pace 0 removes the
pauses of the walk.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
DEADLINE = 120.0  # four Python processes start on a loaded two-core machine


class Demo:
    """A demo process whose stdout lines are collected by a thread."""

    running: list[Demo] = []

    def __init__(self, cwd: Path, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        self.proc = subprocess.Popen([str(BIN / "parent-partition"), "demo", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        Demo.running.append(self)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_until(self, what: str, pred: Callable[[str], bool], timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred("".join(self.lines)):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "".join(self.lines[-40:])
                    raise AssertionError(f"demo never showed {what}; last lines:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"demo did not exit within {timeout:g}s; last lines:\n{self.text[-3000:]}") from None


@pytest.fixture(autouse=True)
def stop_demos() -> Iterator[None]:
    """A failed test still stops its demo the way a user would (Ctrl-C), so no partition is left running."""
    yield
    while Demo.running:
        demo = Demo.running.pop()
        if demo.proc.poll() is None:
            demo.proc.send_signal(signal.SIGINT)
            try:
                demo.proc.wait(60)
            except subprocess.TimeoutExpired:
                demo.proc.kill()
                demo.proc.wait()


def ping_counts(text: str) -> dict[str, tuple[int, int]]:
    """The latest (replies, sent) per VM from the demo's progress lines."""
    return {who: (int(replies), int(sent))
            for who, replies, sent in re.findall(r"(vm\d) │ ping vm\d: rtt=\S+ replies=(\d+)/(\d+)", text)}


def disk_counts(text: str) -> dict[str, tuple[int, int]]:
    """The latest (completed, errors) per VM from the demo's progress lines."""
    counts: dict[str, tuple[int, int]] = {}
    for who, done, errors in re.findall(r"(vm\d) │ disk: completed=(\d+) errors=(\d+)", text):
        counts[who] = (int(done), int(errors))
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_clean_end(demo: Demo, code: int) -> str:
    out = demo.text
    assert code == 0, f"demo exited with {code}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    assert out.count("unloaded cleanly") == 3, "not every child unloaded cleanly:\n" + out[-3000:]
    assert "parent partition stopped" in out and "clean shutdown" in out, out[-3000:]
    return out


def test_demo_narrates_vm1_summarises_the_others_works_the_disks_and_stops_after_duration(tmp_path: Path) -> None:
    port = free_port()
    http = free_port()
    demo = Demo(tmp_path, "--pace", "0", "--duration", "6", "--port", str(port), "--http", f"127.0.0.1:{http}")
    out = assert_clean_end(demo, demo.wait())
    assert f"listening on tcp://127.0.0.1:{port}" in out
    assert f"web console http://127.0.0.1:{http}/" in out, "the demo does not say where its web console is"
    # The walk: every stage of vm1's lifecycle with its explanation.
    for title in ("1/11  Connecting: the VMBus version", "2/11  Offers", "3/11  storage channel: sharing the ring "
                  "pages (GPADL)", "4/11  storage channel: opening the channel", "5/11  storage: the VSTOR handshake",
                  "6/11  heartbeat: ring, open and the IC NEGOTIATE", "7/11  mouse", "8/11  video", "9/11  network",
                  "10/11  keyboard",
                  "11/11  vm1 is up"):
        assert title in out, f"stage {title!r} missing"
    words = " ".join(out.split())  # explanations wrap
    assert "newest first" in words and "Guest Physical Address Descriptor List" in words
    # The devices' own packets, with their real names and numbers, and versions as the README writes them.
    for packet in ("VSTOR_OPERATION_BEGIN_INITIALIZATION(7)", "VSTOR_OPERATION_QUERY_PROTOCOL_VERSION(9) version=6.2",
                   "NVSP_MSG_TYPE_INIT(1) min_protocol_ver=6.1", "SYNTHVID_VERSION_REQUEST(1) version=3.5",
                   "SYNTH_KBD_PROTOCOL_REQUEST(1) version=1.0", "SYNTH_HID_PROTOCOL_REQUEST(0) version=2.0",
                   "SYNTH_HID_INITIAL_DEVICE_INFO(2)", "ICMSGTYPE_NEGOTIATE(0) icflags=TRANSACTION|REQUEST"):
        assert packet in out, f"device packet {packet!r} missing"
    assert "version=0x602" not in out and "version=0x50003" not in out  # (VMBus 5.3 is 0x50003 in INITIATE_CONTACT)
    # vm2 and vm3: one summary line each, not a full trace.
    for who in ("vm1", "vm2", "vm3"):
        assert re.search(rf"{who} │ up over \S+ in [\d.]+s: VMBus 5\.3 · heartbeat IC 3\.0 · storage VSTOR 6\.2 · "
                         r"mouse SYNTHHID 2\.0 · video SYNTHVID 3\.5 · network NVSP 6\.1 · keyboard SYNTH_KBD 1\.0",
                         out), who
    assert out.count("CHANNELMSG_INITIATE_CONTACT") == 1, "only vm1's lifecycle is traced"
    # The disk work: the final table has every VM with completed requests and no errors.
    rows = dict(re.findall(r"│ (vm\d) │ (?:tcp|unix)\s+│\s+[\d,]+ │\s+[\d.,]+ │\s+([\d,]+) │\s+0 │", out))
    assert set(rows) == {"vm1", "vm2", "vm3"}, "the final table lacks a VM, or shows errors:\n" + out[-2000:]
    assert all(int(n.replace(",", "")) > 0 for n in rows.values()), rows
    # The network: each VM pings the next through the switch; each first answer is told once.
    for who, pinger in (("vm2", "vm1"), ("vm3", "vm2"), ("vm1", "vm3")):
        told = re.findall(rf"{who} │ answers {pinger}'s ping through the switch in [\d.]+ ms", out)
        assert len(told) == 1, f"{who} answering {pinger}'s ping told {len(told)} times, not once"
    pings = {who: (target, int(replies), int(sent)) for who, target, replies, sent in re.findall(
        r"│ (vm\d) │ → (vm\d) │\s+[\d.]+ ms │\s+(\d+)/(\d+) │", out)}
    assert pings.keys() == {"vm1", "vm2", "vm3"}, "the final network table lacks a VM:\n" + out[-2000:]
    assert {who: p[0] for who, p in pings.items()} == {"vm1": "vm2", "vm2": "vm3", "vm3": "vm1"}, pings
    assert all(0 < replies <= sent for _, replies, sent in pings.values()), f"no replies: {pings}"
    # The switch port's counters, live in the table and once more when each NIC leaves the switch.
    for who in ("vm1", "vm2", "vm3"):
        assert re.search(rf"parent │ {who}'s NIC off the switch: [1-9][\d,]* frames to it, [1-9][\d,]* from it, "
                         r"[\d,]+ flooded, 0 dropped", out), f"{who}'s switch port counters missing at detach"


def test_ctrl_c_while_the_vms_work_stops_everything_cleanly(tmp_path: Path) -> None:
    demo = Demo(tmp_path, "--pace", "0")
    demo.wait_until("disk progress and ping replies for all three VMs",
                    lambda text: len(c := disk_counts(text)) == 3 and all(done > 0 for done, _ in c.values())
                    and len(p := ping_counts(text)) == 3 and all(replies > 0 for replies, _ in p.values()))
    demo.proc.send_signal(signal.SIGINT)
    out = assert_clean_end(demo, demo.wait())
    assert all(errors == 0 for _, errors in disk_counts(out).values()), out[-2000:]
    # vm1's teardown is traced: close, GPADL teardown, unload.
    for msg in ("CHANNELMSG_CLOSECHANNEL(7)", "CHANNELMSG_GPADL_TEARDOWN(11)", "CHANNELMSG_GPADL_TORNDOWN(12)",
                "CHANNELMSG_UNLOAD(16)", "CHANNELMSG_UNLOAD_RESPONSE(17)"):
        assert msg in out, f"{msg} missing from the traced teardown"


def test_ctrl_c_during_a_pause_of_the_walk_stops_at_once_and_cleanly(tmp_path: Path) -> None:
    """A long --pace: Ctrl-C in the pause after the parent came up ends the demo; no child was started."""
    sock = tmp_path / "demo.sock"
    demo = Demo(tmp_path, "--pace", "600", "--listen", f"tcp://127.0.0.1:{free_port()}", "--listen", f"unix:{sock}")
    demo.wait_until("the parent listening", lambda text: "listening on" in text)
    assert sock.exists()
    demo.proc.send_signal(signal.SIGINT)
    code = demo.wait()
    out = demo.text
    assert code == 0, out[-3000:]
    assert "Traceback" not in out and "1/10" not in out and "unloaded cleanly" not in out, out[-3000:]
    assert "parent partition stopped" in out and "clean shutdown" in out, out[-3000:]
    assert not sock.exists(), "the parent left its Unix socket behind"


def test_demo_help_documents_its_options() -> None:
    out = subprocess.run([str(BIN / "parent-partition"), "demo", "--help"], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    for option in ("--pace", "--duration", "--port", "--listen", "--trace-parent", "--data-dir", "--iodepth", "--http"):
        assert option in out, f"{option} is not in demo --help"
