"""Tier 3: ``parent-partition serve --http`` and ``parent-partition send-keys`` as real processes: text typed by the
command line reaches a real child, and every refusal is one line on stderr with a non-zero exit status."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import Parent, child
from .test_cli_errors import one_line, run_cli

pytestmark = pytest.mark.integration


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def _wait(pred: Any, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_send_keys_types_into_a_real_child_and_refusals_are_one_line(tmp_path: Path) -> None:
    parent = Parent(tmp_path / "parent", extra=["--http", "127.0.0.1:0"])
    vm = child(tmp_path, parent.unix, "vm1", "--log-level", "debug")
    try:
        url = parent.wait_event("web console and API listening")["url"]
        vm.wait_event("all offered channels open")
        _wait(lambda: any(s["partition"] == "vm1" and s["state"] == "active"
                          for s in _get(f"{url}/api/devices/keyboard")["sessions"]), "vm1's keyboard is active")
        code, out, err = run_cli(tmp_path, "parent-partition", "send-keys", "--api", url, "vm1", "typed by send-keys\n")
        assert code == 0 and out.startswith("vm1: ") and "key events sent" in out, (code, out, err)
        assert vm.wait_event("line typed")["text"] == "typed by send-keys"
        mark = vm.mark()
        code, out, err = run_cli(tmp_path, "parent-partition", "send-keys", "--api", url, "--keys", "Enter", "vm1",
                                 "then Enter")
        assert code == 0, err
        assert vm.wait_event("line typed", 30.0, mark)["text"] == "then Enter"

        refusals = [
            (["vm9", "hi"], "no partition named 'vm9' is connected"),
            (["--keys", "ctrl+nokey", "vm1"], "unknown key"),
        ]
        for argv, needle in refusals:
            code, _, err = run_cli(tmp_path, "parent-partition", "send-keys", "--api", url, *argv)
            line = one_line(err)
            assert code == 1 and line.startswith("parent-partition send-keys: error: ") and needle in line, (argv, err)
        # Not ready: the keyboard hot-removed, the partition still there.
        request = urllib.request.Request(f"{url}/api/partitions/vm1/devices/keyboard", method="DELETE")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 202
        _wait(lambda: not _get(f"{url}/api/devices/keyboard")["sessions"], "the keyboard session ended")
        code, _, err = run_cli(tmp_path, "parent-partition", "send-keys", "--api", url, "vm1", "x")
        assert code == 1 and "has no open keyboard channel" in one_line(err), err
        # A parent that is not there.
        dead = f"http://127.0.0.1:{_free_port()}"
        code, _, err = run_cli(tmp_path, "parent-partition", "send-keys", "--api", dead, "vm1", "x")
        assert code == 1 and f"cannot reach the parent's API at {dead}: connection refused" in one_line(err), err
        code, _, err = run_cli(tmp_path, "parent-partition", "send-keys", "--api", url, "vm1")
        assert code == 2 and "give TEXT to type, --keys to press, or both" in err, err
        # An explicitly chosen HTTP address that is taken stops the parent at start, in one line.
        taken = url.removeprefix("http://")
        code, _, err = run_cli(tmp_path, "parent-partition", "serve", "--listen", "tcp://127.0.0.1:0",
                               "--listen", f"unix:{tmp_path}/second.sock", "--data-dir", str(tmp_path / "var2"),
                               "--json-logs", "--http", taken)
        assert code == 1 and f"cannot listen for HTTP on {taken}" in err.splitlines()[-1], err
        code, _, err = run_cli(tmp_path, "parent-partition", "serve", "--http", "localhost")
        assert code == 2 and "argument --http: must be HOST:PORT" in one_line(err), err
        assert parent.proc.poll() is None and not parent.events("HTTP handler failed")
    finally:
        vm.stop()
        parent.stop()


def test_http_none_serves_no_http(tmp_path: Path) -> None:
    parent = Parent(tmp_path / "parent")  # the fixture's default: --http none
    try:
        assert not parent.events("web console and API listening")
        assert not parent.events("web console and API not started")
    finally:
        assert parent.stop() == 0
