"""The per-peer log limit (``logs.PeerLimiter``): one peer's flood of warnings costs at most a burst and a
rate of lines, the count of what was dropped goes out with its next line, and other peers are not limited."""

from __future__ import annotations

import io
import json

from vmbus_proto.aio import logs


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_flood_of_warnings_from_one_connection_is_cut_to_a_burst_and_counted() -> None:
    out = io.StringIO()
    logs.setup("info", out, json=True)
    try:
        flooder = logs.get(peer="unix", **{logs.LIMIT_KEY: 1})
        bystander = logs.get(peer="unix", **{logs.LIMIT_KEY: 2})  # same peer text, another connection
        for _ in range(60_000):
            flooder.warning("frame for a channel that is not open dropped", relid=99)
        bystander.warning("a bystander's warning")
        flooder.info("VMBus disconnected", reason="peer closed")
    finally:
        logs.setup("warning")
    lines = _lines(out)
    flood = [e for e in lines if e["event"].startswith("frame for a channel")]
    # the burst, plus what the rate refilled while the loop ran (generous: the loop takes well under 60 s)
    assert logs.LIMIT_BURST <= len(flood) < logs.LIMIT_BURST + 60 * logs.LIMIT_RATE, len(flood)
    assert [e["event"] for e in lines if "bystander" in str(e["event"])] == ["a bystander's warning"]
    last = lines[-1]
    held = sum(int(e.get("suppressed", 0)) for e in [*flood, last])  # each line written carries the count so far
    assert last["event"] == "VMBus disconnected" and last.get("suppressed") and held == 60_000 - len(flood), \
        (held, len(flood), last)
    assert not any(logs.LIMIT_KEY in e for e in lines), "the limiter's key leaked into the log"
    assert len(out.getvalue()) < 50_000, f"{len(out.getvalue())} bytes of log for one flood"


def test_info_lines_and_lines_of_no_peer_are_never_limited() -> None:
    out = io.StringIO()
    logs.setup("info", out, json=True)
    try:
        traced = logs.get(partition="vm1")
        for i in range(500):
            traced.info("control message", n=i)  # --trace: one line per message, never dropped
        for i in range(100):
            logs.get(component="parent").warning("daemon warning", n=i)
    finally:
        logs.setup("warning")
    lines = _lines(out)
    assert len([e for e in lines if e["event"] == "control message"]) == 500
    assert len([e for e in lines if e["event"] == "daemon warning"]) == 100
