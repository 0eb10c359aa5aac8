"""``child-partition load network``: the frame format, who sends to whom, the receive-side accounting (ramp,
order, strays, latency), the window, and a whole run's totals over in-memory NICs (a hub, so every frame also
reaches the partitions it is not for)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from rich.console import Console

from child_partition import cli
from child_partition.devices.network.nic import LoopHub
from child_partition.load.network import (
    HEADER_BYTES,
    FrameTemplate,
    NetJob,
    NetPartition,
    NetTotals,
    Received,
    Window,
    _traffic,
    parse_frame,
    peers,
    render,
    results_json,
)

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


def test_receive_accounting() -> None:
    r = Received(1, measure_from_ns=1_000_000)
    t = FrameTemplate(MAC[1], MAC[0], 0, 1, 64)
    r.account(t.frame(0, 500_000), 600_000)  # sent during the ramp: seen, not measured
    r.account(t.frame(2, 1_000_000), 1_250_000)  # 250 µs
    r.account(t.frame(1, 1_100_000), 1_200_000)  # 100 µs, and behind sequence number 2
    r.account(FrameTemplate(MAC[2], MAC[0], 0, 2, 64).frame(0, 1_000_000), 1_100_000)  # for partition 2
    r.account(b"\xff" * 6 + MAC[3] + b"\x08\x06" + bytes(46), 1_100_000)  # an ARP request
    assert (r.live, r.rx.ios, r.rx.bytes) == (3, 2, 128)
    assert (r.reordered, r.misdelivered, r.foreign) == (1, 1, 1)
    assert dict(r.rx.latencies) == {250: 1, 100: 1}


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


def _hub_partitions(n: int) -> list[NetPartition]:
    hub = LoopHub()
    parts = [NetPartition("unix:/nowhere", f"p{i}", i, None) for i in range(n)]
    for i, p in enumerate(parts):
        p.nic = hub.attach(MAC[i], rx_queue=4096, tx_queue=64)
    return parts


@pytest.mark.parametrize(("flows", "rate", "window"), [("ring", 2000.0, 0), ("all-to-all", 0.0, 16)])
def test_a_run_over_a_hub_accounts_for_every_frame(flows: str, rate: float, window: int) -> None:
    job = NetJob(partitions=3, frame_size=80, rate=rate, flows=flows, runtime=0.3, ramp=0.1, window=window)
    parts = _hub_partitions(3)
    totals = NetTotals()
    out = io.StringIO()
    try:
        asyncio.run(_traffic(parts, job, Console(file=out, width=150), False, totals, asyncio.Event()))
    finally:
        for p in parts:
            p.memory.close()
    assert totals.errors == [] and totals.partitions_ok == 3, totals.errors
    assert totals.sent > 0, "nothing was sent in the measured window"
    assert totals.rx.ios == totals.sent and totals.lost == 0, f"{totals.sent} sent, {totals.rx.ios} received"
    assert totals.rx.bytes == 80 * totals.sent
    # A hub hands every frame to every port: each port also sees the frames meant for the third partition.
    assert totals.misdelivered > 0 and totals.foreign == 0 and totals.reordered == 0
    assert totals.nic["rx_drops"] == 0 and totals.nic["tx_frames"] == sum(p.live_sent for p in parts)
    res = json.loads(json.dumps(results_json("unix:/nowhere", job, totals)))
    assert res["received"] == totals.rx.ios and res["loss_frac"] == 0.0
    assert sum(r["received"] for r in res["per_partition"]) == res["received"]
    assert all(r["lost"] == 0 for r in res["per_partition"])
    p = res["latency_us"]["percentiles"]
    assert 0 < p["50"] <= p["99"] <= p["99.9"]
    render("unix:/nowhere", job, totals, Console(file=out, width=150))
    assert "0 lost (0.00%)" in out.getvalue(), out.getvalue()


def test_cli_arguments() -> None:
    args = cli.build_parser().parse_args(["load", "network", "--connect", "unix:/x", "--partitions", "4",
                                          "--frame-size", "1514", "--rate", "1000", "--flows", "all-to-all"])
    got = (args.device, args.partitions, args.frame_size, args.rate, args.flows)
    assert got == ("network", 4, 1514, 1000, "all-to-all"), got
    for bad in (["--frame-size", "63"], ["--frame-size", "1515"], ["--partitions", "1"], ["--flows", "star"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["load", "network", "--connect", "unix:/x", *bad])
    assert cli.main(["load", "network", "--connect", "unix:/x", "--partitions", "3", "--flows", "pairs"]) == 2


def test_a_stop_ends_the_run_early_and_keeps_what_was_measured() -> None:
    job = NetJob(partitions=2, frame_size=64, flows="pairs", runtime=600, ramp=0, window=8)
    parts = _hub_partitions(2)
    totals = NetTotals()

    async def go() -> None:
        stop = asyncio.Event()

        async def stop_after_traffic() -> None:
            for _ in range(3000):  # up to 30 s for 100 frames to arrive
                if parts[1].received.live >= 100:
                    break
                await asyncio.sleep(0.01)
            stop.set()

        stopper = asyncio.ensure_future(stop_after_traffic())
        await asyncio.wait_for(_traffic(parts, job, Console(file=io.StringIO()), False, totals, stop), 120)
        await stopper

    try:
        asyncio.run(go())
    finally:
        for p in parts:
            p.memory.close()
    assert totals.errors == [] and totals.partitions_ok == 2, totals.errors
    assert totals.seconds < 600 and totals.rx.ios >= 100, f"{totals.rx.ios} frames in {totals.seconds:.1f}s"
    assert totals.lost == 0, f"{totals.sent} sent, {totals.rx.ios} received"
