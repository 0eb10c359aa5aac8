"""Lab 4, hot remove: your ``on_rescind`` in a real child (``guest.py``) against a real parent, devices rescinded
and re-added through the parent's JSON API while the child uses them.

One scenario runs once for all the behaviour steps. It starts a parent with its API, then a child that runs
your handler with ``--trace`` and an NBD export of its disk. It rescinds the storage device while a ``qemu-io``
reads through it, checks the release, and re-adds the device. Then it rescinds the video device (its VRAM
GPADL) and the NIC (its sub-channels and buffer GPADLs). Last it stops the child with Ctrl-C. Each step reports
its part. The written answers get a lenient key-term check (``labs.harness.key_terms``): a grader cannot judge
prose, and your instructor reads them.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from labs.harness import (
    Context,
    Failed,
    Lab,
    Proc,
    Step,
    answer,
    answers,
    control_messages,
    free_port,
    key_terms,
    parent,
)

HERE = Path(__file__).resolve().parent
SCENARIO_STEPS = ("storage: close and release", "storage: I/O across remove and re-add", "video: the VRAM GPADL",
                  "network: sub-channels", "guest pages returned", "clean shutdown afterwards")
PATTERN = 0x5A
IO_MB = 64  # MiB that qemu-io reads through the disk while it is removed and added back


class Api:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(self.base + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise Failed(f"{method} {path}: HTTP {exc.code} {exc.read().decode(errors='replace')}") from None

    def relids(self, device: str) -> list[int]:
        """The relids of ``device``'s channels (its primary and sub-channels)."""
        return [c["relid"] for c in self.call("GET", "/api/partitions/vm1/channels") if c["device"] == device]

    def gpadl_pages(self, relids: list[int]) -> int:
        return sum(g["pages"] for g in self.call("GET", "/api/partitions/vm1/gpadls") if g["relid"] in relids)


class Scenario:
    """The run; ``results[step]`` is None when the step's part held, else what went wrong."""

    def __init__(self, code: Path, tmp: Path) -> None:
        self.code, self.tmp = code, tmp
        self.results: dict[str, str | None] = {}
        self.vm: Proc | None = None
        self._reader: subprocess.Popen[str] | None = None  # qemu-io reading across the remove and re-add

    def part(self, step: str, fn: Any, *args: Any) -> Any:
        try:
            value = fn(*args)
        except Failed as exc:
            self.results[step] = str(exc)
            raise
        self.results[step] = None
        return value

    # ---- helpers ----------------------------------------------------------------------------------------

    def _returned(self, relids: list[int], offset: int, timeout: float = 60.0) -> tuple[int, int, list[int]]:
        """Wait until on_rescind returned for every relid (Failed at once if one raised), reading the log from
        ``offset``; the guest pages in use at the first call and after the last return, and the relids still
        bound to a driver."""
        assert self.vm is not None

        def check(out: str) -> tuple[int, int, list[int]] | None:
            called: list[int] = []
            done: dict[int, dict[str, str]] = {}
            for line in out[offset:].splitlines():
                if "on_rescind failed" in line:
                    raise Failed("your on_rescind raised: " + line.split("on_rescind failed", 1)[1].strip())
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                if "on_rescind called" in line:
                    called.append(int(fields["pages_in_use"]))
                elif "on_rescind returned" in line:
                    done[int(fields["relid"])] = fields
            if not all(r in done for r in relids):
                return None
            bound = [r for r in relids if done[r].get("still_bound") != "False"]
            return called[0], min(int(done[r]["pages_in_use"]) for r in relids), bound

        return self.vm.wait_until(check, f"on_rescind returning for relids {relids}", timeout)

    def _released_in_order(self, relids: list[int], since: int) -> None:
        """For each relid, after its RESCIND: CLOSECHANNEL (if it was open), then exactly one RELID_RELEASED, and
        no GPADL_TEARDOWN (the host answers nothing on a rescinded channel)."""
        assert self.vm is not None
        msgs = control_messages(self.vm.output())[since:]
        for relid in relids:
            mine = [m for m in msgs if m.fields.get("child_relid") == str(relid)]
            names = [m.name for m in mine]
            if "RESCIND_CHANNELOFFER" not in names:
                raise Failed(f"relid {relid}: no RESCIND_CHANNELOFFER in the child's trace")
            after = names[names.index("RESCIND_CHANNELOFFER") + 1:]
            if after.count("RELID_RELEASED") != 1:
                raise Failed(f"relid {relid}: RELID_RELEASED sent {after.count('RELID_RELEASED')} times after the "
                             "rescind (once, when you are done with it)")
            if "CLOSECHANNEL" not in after or after.index("CLOSECHANNEL") > after.index("RELID_RELEASED"):
                raise Failed(f"relid {relid}: the open channel must be closed (CLOSECHANNEL) before RELID_RELEASED")
            if "GPADL_TEARDOWN" in after:
                raise Failed(f"relid {relid}: GPADL_TEARDOWN after the rescind: the host answers nothing on a "
                             "rescinded channel (Linux skips it)")

    def _rescind(self, api: Api, device: str) -> tuple[int, int]:
        """Rescind ``device`` and check the guest let go of it; the GPADL pages the host had for it and the guest
        pages given back."""
        assert self.vm is not None
        vm = self.vm
        relids = api.relids(device)
        pages = api.gpadl_pages(relids)
        since, offset = len(control_messages(vm.output())), len(vm.output())
        api.call("DELETE", f"/api/partitions/vm1/devices/{device}")
        before, after, bound = self._returned(relids, offset)
        self._released_in_order(relids, since)
        if bound:
            raise Failed(f"relids {bound} still have a driver bound (guest.vscs, or a sub-channel) after on_rescind")
        # The parent frees a rescinded channel's GPADLs (ring and device) once the guest released the relid.
        vm.wait_until(lambda _out: True if api.gpadl_pages(relids) == 0 else None,
                      f"the parent freeing the GPADLs of relids {relids}", 30)
        return pages, before - after

    # ---- the run ------------------------------------------------------------------------------------------

    def run(self) -> None:
        http = free_port()
        api = Api(f"http://127.0.0.1:{http}")
        sock = self.tmp / "vm1.nbd"
        uri = f"nbd+unix:///vm1?socket={sock}"
        with parent(self.tmp, "--http", f"127.0.0.1:{http}") as (_, url):
            self.vm = Proc([sys.executable, str(HERE / "guest.py"), "--code", str(self.code), "run", "--connect", url,
                            "--name", "vm1", "--no-reconnect", "--trace", "--nbd", f"unix:{sock}"],
                           self.tmp / "vm1.log")
            try:
                self.vm.wait_for("all offered channels open", 90)
                self.vm.wait_for("NIC queues", 60)
                _qemu_io(uri, f"write -P {PATTERN:#x} 0 {IO_MB}M")
                freed: dict[str, tuple[int, int]] = {}  # device -> (GPADL pages it held, pages the guest got back)

                def storage() -> None:
                    reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"read -P {PATTERN:#x} 0 {IO_MB}M",
                                               "-c", f"read -P {PATTERN:#x} 0 {IO_MB}M", uri],
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    self._reader = reader
                    freed["storage"] = self._rescind(api, "storage")

                def io_across() -> None:
                    api.call("POST", "/api/partitions/vm1/devices/storage")
                    assert self._reader is not None
                    try:
                        out, _ = self._reader.communicate(timeout=120)
                    except subprocess.TimeoutExpired:
                        self._reader.kill()
                        raise Failed("qemu-io's reads did not finish within 120 s of the re-add") from None
                    if self._reader.returncode != 0 or "Pattern verification failed" in out:
                        raise Failed(f"qemu-io's reads across the remove and re-add failed:\n{out[-800:]}")
                    _qemu_io(uri, f"read -P {PATTERN:#x} 0 1M")  # and the re-added disk serves new I/O

                def video() -> None:
                    freed["video"] = self._rescind(api, "video")

                def network() -> None:
                    if len(api.relids("network")) < 2:
                        raise Failed("the NIC has no sub-channels; the grader needs some (the parent's default)")
                    freed["network"] = self._rescind(api, "network")

                def pages() -> None:
                    # A driver holds at least the pages it shared by GPADL (storage also has a DMA pool).
                    short = {d: p for d, p in freed.items() if p[1] < p[0]}
                    if short:
                        raise Failed("guest pages not given back: " + ", ".join(
                            f"{d} gave back {p[1]} pages but had shared {p[0]} by GPADL" for d, p in short.items()))

                def shutdown() -> None:
                    assert self.vm is not None
                    status = self.vm.interrupt()
                    if status != 0 or "unloaded cleanly" not in self.vm.output():
                        raise Failed(f"the child did not unload cleanly after the rescinds (exit {status}):\n"
                                     + "\n".join(self.vm.output().splitlines()[-8:]))

                for step, fn in zip(SCENARIO_STEPS, (storage, io_across, video, network, pages, shutdown),
                                    strict=True):
                    self.part(step, fn)
            finally:
                self.vm.interrupt()
                if self._reader is not None and self._reader.poll() is None:
                    self._reader.kill()
                    self._reader.wait()


def _qemu_io(uri: str, cmd: str) -> None:
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, uri], capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode != 0 or "failed" in proc.stdout.lower():
        raise Failed(f"qemu-io -c '{cmd}' failed: {(proc.stdout + proc.stderr)[-600:]}")


@functools.cache
def scenario(code: Path) -> dict[str, str | None]:
    with tempfile.TemporaryDirectory(prefix="lab4-") as tmp:
        run = Scenario(code, Path(tmp))
        try:
            run.run()
        except Failed as exc:
            failed = next((s for s in SCENARIO_STEPS if run.results.get(s) is not None), None)
            for step in SCENARIO_STEPS:  # a failure before the first part (the start) is every step's
                run.results.setdefault(step, f"not reached: '{failed}' failed first" if failed else str(exc))
        return run.results


def _scenario_step(step: str) -> Any:
    def check(ctx: Context) -> None:
        error = scenario(ctx.code).get(step)
        if error is not None:
            raise Failed(error)
    return check


CHOICES = {  # multiple choice: the letter
    "choice.ring_gpadl_gone": "b",
    "choice.vram_gpadl_gone": "b",
    "choice.in_flight": "c",
    "choice.nic_releases": "b",
}

WHY = {  # the key terms a written answer should touch (any one term of each group)
    "why.no_teardown": [("answer", "reply", "respond", "torndown"), ("rescind", "revoke", "gone", "removed"),
                        ("wait", "hang", "block", "forever", "never")],
    "why.release_last": [("relid",), ("reuse", "re-offer", "reoffer", "again", "new offer"),
                         ("last", "after", "done", "finished", "no longer")],
    "why.linux": [("vmbus_onoffer_rescind",), ("hv_process_channel_removal",), ("vmbus_close", "remove")],
    "why.in_flight_io": [("retry", "retried", "again", "wait"),
                         ("re-add", "readd", "new channel", "new controller", "came back", "re-offer", "reoffer"),
                         ("channelclosed", "fail", "error", "closed")],
}


def check_questions(ctx: Context) -> None:
    a = answers(ctx)
    wrong = [k for k, v in CHOICES.items() if str(answer(a, k)).strip().lower() != v]
    if wrong:
        raise Failed("not the right choice: " + ", ".join(wrong))
    for key, groups in WHY.items():
        key_terms(answer(a, key), groups, key)


LAB = Lab(
    number=4,
    title="Hot remove",
    difficulty="moderate",
    steps=[
        Step("storage: close and release", 3, _scenario_step("storage: close and release"),
             "CLOSECHANNEL, no GPADL_TEARDOWN, RELID_RELEASED last; unbind the driver first"),
        Step("storage: I/O across remove and re-add", 3, _scenario_step("storage: I/O across remove and re-add"),
             "the host re-offers a relid only after RELID_RELEASED; the disk's service must hear on_lost"),
        Step("video: the VRAM GPADL", 2, _scenario_step("video: the VRAM GPADL"),
             "the VRAM GPADL is the host's to drop at RELID_RELEASED, not yours to tear down"),
        Step("network: sub-channels", 3, _scenario_step("network: sub-channels"),
             "a sub-channel's relid is not in guest.vscs: find the driver whose subchannels hold it"),
        Step("guest pages returned", 2, _scenario_step("guest pages returned"),
             "detach() gives the driver's pages back; a sub-channel's go with on_subchannel_rescind()"),
        Step("clean shutdown afterwards", 1, _scenario_step("clean shutdown afterwards"),
             "a driver left in guest.vscs is closed again at shutdown"),
        Step("questions", 4, check_questions, "answers.toml; the handout's Background has the pointers"),
    ],
    starter_fails=frozenset({*SCENARIO_STEPS, "questions"}),
)
