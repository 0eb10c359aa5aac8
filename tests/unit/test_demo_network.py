"""The demo's network view from log records: counts from the work's start, a first answer told once, the
switch's port counters, and records it cannot read left alone."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from parent_partition.demo_network import NetworkWorkload, ring


def ping(who: str, sent: int, received: int, rtt: Any = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"who": who, "level": "info", "target": "x", "sent": sent, "received": received,
                           "event": "ping reply" if rtt is not None else "ping lost"}
    if rtt is not None:
        rec["rtt_ms"] = rtt
    return rec


def render(w: NetworkWorkload) -> str:
    console = Console(width=160, record=True)
    console.print(w.view())
    return console.export_text()


async def test_counts_start_with_the_work_and_a_first_answer_is_told_once() -> None:
    said: list[tuple[str, str]] = []
    w = NetworkWorkload(ring(["vm1", "vm2", "vm3"]), lambda who, text: said.append((who, text.plain)))
    assert {n: v.target for n, v in w.vms.items()} == {"vm1": "vm2", "vm2": "vm3", "vm3": "vm1"}
    for n in range(1, 6):  # vm2 not up yet: vm1's pings are lost
        assert w.on_record(ping("vm1", n, 0))
    await w.start()
    assert w.on_record(ping("vm1", 6, 0))  # its request left before the work began: the counts start after it
    assert w.on_record(ping("vm1", 7, 1, 0.412))
    assert w.on_record(ping("vm1", 8, 2, 0.398))
    assert w.vms["vm1"].shown == (2, 2) and w.vms["vm1"].loss == 0.0
    assert said == [("vm2", "answers vm1's ping through the switch in 0.412 ms  (vm1's NetVSC → the parent's "
                            "NetVSP → the switch → vm2's NetVSC, and back)")], said
    assert w.on_record({"who": "parent", "level": "info", "event": "switch counters", "switch": {},
                        "ports": {"vm1": {"port_rx_frames": 9, "port_tx_frames": 8, "port_rx_flooded": 2,
                                          "port_dropped_queue_full": 1}}})
    row = next(line for line in render(w).splitlines() if "vm1" in line and "→ vm2" in line)
    assert row.split("│")[3:10] == [" 0.398 ms ", "          2/2 ", "   0% ", "         9 ", "           8 ",
                                    "       2 ", "       1 "], row
    assert w.progress()[0] == ("vm1", Text("ping vm2: rtt=0.398ms replies=2/2 loss=0% to_switch=9 from_switch=8 "
                                           "dropped=1"))


def test_records_it_cannot_read_or_does_not_own_are_left_alone() -> None:
    w = NetworkWorkload(ring(["vm1", "vm2"]), lambda who, text: None)
    assert w.on_record(ping("vm1", 1, 1, "fast"))  # malformed: taken, counts unchanged
    assert w.vms["vm1"].sent == 0
    assert not w.on_record(ping("vm9", 1, 1, 0.5))  # not one of the demo's VMs
    assert not w.on_record({"who": "vm1", "event": "all offered channels open"})
    assert ring(["vm1"]) == {}
