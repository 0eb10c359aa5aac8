"""Shell tier: the generic VSP plumbing (parent_partition/vsp.py) and VSC plumbing (child_partition/vsc.py)
over the in-memory channel pair: how a device's failure is contained, how a close ends a serve task, and
how a driver's handshake fails or times out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

import child_partition.vsc
from child_partition.devices.input.vsc import KeyboardVsc
from child_partition.devices.network.vsc import NetworkVsc
from parent_partition.devices.input.vsp import KeyboardVsp
from parent_partition.vsp import ChannelResources, Vsp
from vmbus_proto.aio.channel import Channel, ChannelClosed
from vmbus_proto.aio.pair import MemoryLink
from vmbus_proto.devices.echo import protocol as echo
from vmbus_proto.errors import DeviceProtocolError

from .adapters import attach, open_vsp


def _flush() -> None:
    """What a device's backend does on close (a disk's fdatasync), run in a worker thread."""


class ScriptedVsp(Vsp):
    """Completes every request with ``ok:`` and its payload; ``protocol`` is a malformed request, ``boom``
    makes the device itself fail. On its way out a serve task flushes, in a thread, before it ends."""

    spec = echo.SPEC

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[int] = []

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        try:
            while True:
                pkt = await channel.recv()
                if pkt.payload == b"protocol":
                    raise DeviceProtocolError(f"request {pkt.trans_id} is malformed")
                if pkt.payload == b"boom":
                    raise RuntimeError("the backend exploded")
                await channel.complete(pkt.trans_id, b"ok:" + pkt.payload)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, _flush)
            self.flushed.append(channel.relid)


class SilentVsp(Vsp):
    """Reads every packet and never answers."""

    spec = echo.SPEC

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        while True:
            await channel.recv()


def events(logs: list[Any], level: str) -> list[str]:
    return [e["event"] for e in logs if e["log_level"] == level]


async def test_a_device_protocol_error_fails_the_connection_with_its_reason() -> None:
    vsp = ScriptedVsp()
    with capture_logs() as logs:
        link = MemoryLink()
        pair = link.open(1)
        await open_vsp(vsp, pair)
        assert (await asyncio.wait_for(pair.guest.request(b"hello"), 30)).payload == b"ok:hello"
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(pair.guest.request(b"protocol"), 30)
        await asyncio.wait_for(link.closed(), 30)
    assert link.host.failure == "echo relid 1: request 2 is malformed", link.host.failure
    assert link.guest.peer_reason == link.host.failure
    assert vsp.errors == 1 and vsp.flushed == [1]
    assert "device protocol error; closing the partition's connection" in events(logs, "error")


async def test_an_unexpected_device_error_is_logged_and_fails_only_that_connection() -> None:
    vsp = ScriptedVsp()
    with capture_logs() as logs:
        links = [MemoryLink(partition=name) for name in ("vm1", "vm2")]
        pairs = [link.open(1) for link in links]
        for pair in pairs:
            await open_vsp(vsp, pair)
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(pairs[0].guest.request(b"boom"), 30)
        await asyncio.wait_for(links[0].closed(), 30)
        answer = await asyncio.wait_for(pairs[1].guest.request(b"still here"), 30)
    assert links[0].guest.peer_reason == "echo relid 1: internal device error", links[0].guest.peer_reason
    assert answer.payload == b"ok:still here" and not links[1].host.closing, "the other partition was hurt"
    failed = [e for e in logs if e["event"] == "VSP failed; closing the partition's connection"]
    assert len(failed) == 1 and failed[0].get("exc_info"), logs
    assert vsp.errors == 1


async def test_close_cancels_the_serve_task_and_waits_for_its_cleanup() -> None:
    vsp = ScriptedVsp()
    link = MemoryLink()
    pair = link.open(1)
    await open_vsp(vsp, pair)
    assert (await asyncio.wait_for(pair.guest.request(b"x"), 30)).payload == b"ok:x"
    await vsp.close(pair.host)
    assert vsp.flushed == [1], "close returned before the serve task's finally had run"
    assert vsp.tasks == {} and pair.host.closed and vsp.errors == 0


async def test_a_channel_the_guest_closed_ends_its_serve_task_quietly() -> None:
    vsp = ScriptedVsp()
    link = MemoryLink()
    pairs = [link.open(relid) for relid in (1, 2)]
    for pair in pairs:
        await open_vsp(vsp, pair)
    pairs[0].close_guest()
    await asyncio.wait_for(pairs[0].closed(), 30)  # the host ran vsp.close for it
    assert vsp.flushed == [1] and vsp.errors == 0 and link.host.failure is None
    assert (await asyncio.wait_for(pairs[1].guest.request(b"y"), 30)).payload == b"ok:y"


async def test_a_vsc_handshake_the_host_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child_partition.vsc, "HANDSHAKE_TIMEOUT", 0.5)
    vsp = SilentVsp()
    with pytest.raises(TimeoutError):
        await attach(vsp, KeyboardVsc)
    assert vsp.tasks == {}, "the host still serves the abandoned channel"


async def test_a_vsc_handshake_every_version_refused_fails() -> None:
    with pytest.raises(DeviceProtocolError, match="keyboard"):
        await attach(KeyboardVsp(supported=()), KeyboardVsc)


async def test_a_vsc_handshake_with_a_garbled_answer_fails() -> None:
    vsp = ScriptedVsp()  # answers NVSP INIT with a completion that is not INIT_COMPLETE
    with pytest.raises(DeviceProtocolError, match="INIT_COMPLETE"):
        await attach(vsp, NetworkVsc)
    assert vsp.flushed == [1]
