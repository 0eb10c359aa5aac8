"""``child-partition load network`` against a real parent: partitions bring up their NetVSCs, send frames to
each other through the parent's switch for a second, report what arrived, and leave cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import BIN, Parent

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("partitions", "flows", "extra"), [(2, "pairs", ["--window", "32"]),
                                                              (4, "all-to-all", ["--rate", "300"])])
def test_partitions_send_frames_to_each_other_through_the_switch(parent: Parent, workdir: Path, partitions: int,
                                                                 flows: str, extra: list[str]) -> None:
    out = workdir / "net.json"
    proc = subprocess.run([str(BIN / "child-partition"), "load", "network", "--connect", parent.unix,
                           "--partitions", str(partitions), "--flows", flows, "--frame-size", "128",
                           "--runtime", "1", "--ramp", "0.2", "--json", str(out), *extra],
                          check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"partitions: {partitions} ok, 0 failed" in proc.stdout, proc.stdout
    doc = json.loads(out.read_text())
    net = doc["workloads"]["network"]
    res = net["extra"]
    assert doc["errors"] == [] and net["partitions_ok"] == partitions, doc["errors"]
    assert res["received"] > 0, f"no frame arrived: {res['sent']} sent"
    assert res["received"] <= res["sent"] and res["lost"] == res["sent"] - res["received"]
    assert net["ops"]["receive"]["ops"] == res["received"], "the engine and the receivers counted differently"
    assert all(r["received"] > 0 for r in res["per_partition"]), "a partition received nothing"
    assert res["nic"]["tx_frames"] >= res["sent"]
    p = net["ops"]["receive"]["latency_us"]["percentiles"]
    assert 0 < p["50"] <= p["99"] <= p["99.9"]
    # Every partition left the switch with RNDIS HALT and unloaded; the parent complained about nothing.
    names = {r["name"] for r in res["per_partition"]}
    parent.wait_for(lambda r: names <= {e["partition"] for e in parent.events("VMBus disconnected")}, 30)
    assert {e["partition"] for e in parent.events("NIC off the switch")} >= names
    assert not parent.complaints(), "the parent complained"


def test_sigint_ends_the_run_early_with_the_results_so_far(parent: Parent, workdir: Path) -> None:
    out = workdir / "net.json"
    proc = subprocess.Popen([str(BIN / "child-partition"), "load", "network", "--connect", parent.tcp,
                             "--partitions", "2", "--rate", "500", "--runtime", "600", "--ramp", "0",
                             "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for i in range(2):  # both NICs up on the switch: the traffic is about to start
            parent.wait_event("RNDIS initialized", timeout=60, partition=f"netload-{proc.pid}-{i}")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, f"exit status {proc.returncode}, expected 130 (SIGINT)\n" + stdout + stderr
    assert "interrupted by SIGINT" in stderr, stderr
    assert "partitions: 2 ok, 0 failed" in stdout, stdout
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["seconds"] < 600 and res["interrupted"] == "SIGINT", res
    names = {f"netload-{proc.pid}-{i}" for i in range(2)}
    parent.wait_for(lambda r: names <= {e["partition"] for e in parent.events("VMBus disconnected")}, 30)
    assert not parent.complaints(), "the parent complained"
