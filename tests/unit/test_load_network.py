"""``child-partition load network``: the frame format, who sends to whom, the receive-side accounting (ramp,
order, strays, latency), the window, and a whole run's totals over in-memory NICs (a hub, so every frame also
reaches the partitions it is not for)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from rich.console import Console

from child_partition import cli
from child_partition.devices.network.nic import LoopHub
from child_partition.load.command import build_parser
from child_partition.load.network import (
    HEADER_BYTES,
    FrameTemplate,
    NetPartition,
    NetworkWorkload,
    Received,
    Window,
    parse_frame,
    peers,
)

from .loadrun import run

MAC = [bytes.fromhex(f"00155d0000{i:02x}") for i in range(4)]


def test_frame_carries_route_sequence_and_time_and_has_the_asked_size() -> None:
    for size in (64, 100, 1514):
        frame = FrameTemplate(MAC[1], MAC[0], 0, 1, size).frame(7, 123_456_789)
        assert len(frame) == size, f"a {size}-byte frame came out {len(frame)} bytes"
        assert frame[:6] == MAC[1] and frame[6:12] == MAC[0] and frame[12:14] == b"\x88\xb5"
        assert parse_frame(frame) == (0, 1, 7, 123_456_789)
    assert HEADER_BYTES <= 64


def test_frames_of_others_and_bad_sizes_are_told_apart() -> None:
    good = FrameTemplate(MAC[1], MAC[0], 0, 1, 64).frame(0, 0)
    assert parse_frame(good[:12] + b"\x08\x00" + good[14:]) is None, "an IPv4 frame was taken for ours"
    assert parse_frame(good[:14] + b"XXXX" + good[18:]) is None, "a frame without the magic was taken for ours"
    assert parse_frame(good[:30]) is None, "a truncated frame was taken for ours"
    for size in (63, 1515):
        with pytest.raises(ValueError, match="outside 64-1514"):
            FrameTemplate(MAC[1], MAC[0], 0, 1, size)


def test_flows() -> None:
    assert peers("ring", 3) == [[1], [2], [0]]
    assert peers("pairs", 4) == [[1], [0], [3], [2]]
    assert peers("all-to-all", 3) == [[1, 2], [0, 2], [0, 1]]
    with pytest.raises(ValueError, match="even number"):
        peers("pairs", 3)
    with pytest.raises(ValueError, match="at least 2"):
        peers("ring", 1)
    with pytest.raises(ValueError, match="unknown --flows"):
        peers("star", 3)


class WindowFrom:
    """A recorder whose measured window starts at ``t`` (monotonic seconds)."""

    def __init__(self, t: float) -> None:
        self.t = t
        self.records: list[tuple[str, int, int]] = []

    def record(self, op: str, usec: int, nbytes: int = 0, *, started: float | None = None) -> None:
        self.records.append((op, usec, nbytes))

    def error(self, op: str, message: str) -> None:
        raise AssertionError(message)

    def measuring(self, at: float | None = None) -> bool:
        return at is not None and at >= self.t


def test_receive_accounting() -> None:
    rec = WindowFrom(0.001)
    r = Received(1, box=[rec])
    t = FrameTemplate(MAC[1], MAC[0], 0, 1, 64)
    r.account(t.frame(0, 500_000), 600_000)  # sent during the ramp: seen, not measured
    r.account(t.frame(2, 1_000_000), 1_250_000)  # 250 µs
    r.account(t.frame(1, 1_100_000), 1_200_000)  # 100 µs, and behind sequence number 2
    r.account(FrameTemplate(MAC[2], MAC[0], 0, 2, 64).frame(0, 1_000_000), 1_100_000)  # for partition 2
    r.account(b"\xff" * 6 + MAC[3] + b"\x08\x06" + bytes(46), 1_100_000)  # an ARP request
    assert (r.live, r.frames, r.latencies.bytes) == (3, 2, 128)
    assert (r.reordered, r.misdelivered, r.foreign) == (1, 1, 1)
    assert dict(r.latencies.latencies) == {250: 1, 100: 1}
    assert rec.records == [("receive", 250, 64), ("receive", 100, 64)]


def test_window_waits_for_arrivals_and_writes_off_lost_frames() -> None:
    async def go() -> None:
        w = Window(2, 2)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(w.room(0, 1, loop.time() + 30), 30)  # one on its way: room for another
        waiting = asyncio.ensure_future(w.room(0, 2, loop.time() + 30))
        await asyncio.sleep(0)
        assert not waiting.done(), "the sender did not wait with its window full"
        w.arrived(0)
        await asyncio.wait_for(waiting, 30)
        # Nothing arrives for 3 outstanding frames: they are written off after LOST_AFTER and sending goes on.
        await asyncio.wait_for(w.room(1, 3, loop.time() + 30), 30)
        assert w.written_off[1] == 3

    asyncio.run(go())


class HubNetwork(NetworkWorkload):
    """The network workload with in-memory NICs on a hub (so every frame also reaches the partitions it is not
    for) instead of NetVSCs on a parent."""

    hub: ClassVar[LoopHub]

    async def start_partition(self, index: int) -> NetPartition:
        p = NetPartition("unix:/nowhere", f"p{index}", index, None)
        p.nic = self.hub.attach(MAC[index], rx_queue=4096, tx_queue=64)
        return p


def _run(argv: list[str], stop_when: Callable[[], bool] | None = None) -> tuple[dict[str, Any], str]:
    HubNetwork.hub = LoopHub()
    doc = json.loads(json.dumps(run(HubNetwork, argv, stop_when=stop_when).to_json()))
    out = io.StringIO()
    HubNetwork.render(doc["workloads"]["network"], Console(file=out, width=150))
    return doc, out.getvalue()


@pytest.mark.parametrize(("flows", "extra"), [("ring", ["--rate", "2000"]), ("all-to-all", ["--window", "16"])])
def test_a_run_over_a_hub_accounts_for_every_frame(flows: str, extra: list[str]) -> None:
    doc, text = _run(["--partitions", "3", "--frame-size", "80", "--flows", flows, "--runtime", "0.3",
                      "--warmup", "0.1", *extra])
    net = doc["workloads"]["network"]
    x = net["extra"]
    assert doc["errors"] == [] and net["partitions_ok"] == 3, doc["errors"]
    assert x["sent"] > 0, "nothing was sent in the measured window"
    assert x["received"] == x["sent"] and x["lost"] == 0, f"{x['sent']} sent, {x['received']} received"
    assert net["ops"]["receive"]["ops"] == x["received"] and net["ops"]["receive"]["bytes"] == 80 * x["sent"]
    # A hub hands every frame to every port: each port also sees the frames meant for the third partition.
    assert x["misdelivered"] > 0 and x["foreign"] == 0 and x["reordered"] == 0
    assert x["nic"]["rx_drops"] == 0 and x["nic"]["tx_frames"] >= x["sent"]
    assert sum(r["received"] for r in x["per_partition"]) == x["received"]
    assert all(r["lost"] == 0 for r in x["per_partition"])
    p = net["ops"]["receive"]["latency_us"]["percentiles"]
    assert 0 < p["50"] <= p["99"] <= p["99.9"]
    assert "0 lost (0.00%)" in text, text


def test_cli_arguments() -> None:
    classes = {"network": NetworkWorkload}
    args = build_parser(classes, {}).parse_args(["network", "--connect", "unix:/x", "--partitions", "4",
                                                 "--frame-size", "1514", "--rate", "1000", "--flows", "all-to-all"])
    got = (args.workload, args.partitions, args.frame_size, args.rate, args.flows)
    assert got == ("network", 4, 1514, 1000, "all-to-all"), got
    for bad in (["--frame-size", "63"], ["--frame-size", "1515"], ["--partitions", "1"], ["--flows", "star"]):
        with pytest.raises(SystemExit):
            build_parser(classes, {}).parse_args(["network", "--connect", "unix:/x", *bad])
    assert cli.main(["load", "network", "--connect", "unix:/x", "--partitions", "3", "--flows", "pairs"]) == 2


def test_a_stop_ends_the_run_early_and_keeps_what_was_measured() -> None:
    seen: list[HubNetwork] = []

    class Watched(HubNetwork):
        async def setup(self) -> None:
            seen.append(self)

    def enough() -> bool:  # 100 frames arrived at partition 1
        return bool(seen and len(seen[0].parts) == 2 and seen[0].parts[1].received.live >= 100)

    Watched.hub = LoopHub()
    doc = json.loads(json.dumps(run(Watched, ["--partitions", "2", "--flows", "pairs", "--runtime", "600",
                                              "--warmup", "0", "--window", "8"], stop_when=enough).to_json()))
    net, x = doc["workloads"]["network"], doc["workloads"]["network"]["extra"]
    assert doc["errors"] == [] and net["partitions_ok"] == 2, doc["errors"]
    assert doc["seconds"] < 600 and x["received"] >= 100, f"{x['received']} frames in {doc['seconds']:.1f}s"
    assert x["lost"] == 0, f"{x['sent']} sent, {x['received']} received"
