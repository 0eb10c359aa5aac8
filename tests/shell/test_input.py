"""Tier 2: the keyboard and mouse VSPs' API to the guest's InputService over an in-memory channel pair (real ring
accounting, no sockets): typed text, chords, unicode and mouse reports arrive; input to a partition without a
channel or before the handshake is refused with a clear error; LED state comes back; sessions go on close."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from child_partition.devices.input.service import InputService
from child_partition.devices.input.vsc import KeyboardVsc, MouseVsc
from child_partition.vsc import GuestContext
from parent_partition.devices.input.vsp import InputNotReady, KeyboardVsp, MouseVsp, to_absolute
from vmbus_proto.aio import logs
from vmbus_proto.devices.base import Incoming, Outgoing
from vmbus_proto.devices.input import mouse
from vmbus_proto.devices.input.keyboard import LedFlags

from .adapters import DevicePair, attach
from .waits import until

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


pytestmark = pytest.mark.usefixtures("memory_mode")  # each test in both memory modes (conftest)

@pytest.fixture
async def service() -> InputService:
    return InputService(GuestContext("vm", logs.get(partition="vm")))


@pytest.fixture
async def kbd(service: InputService) -> AsyncIterator[DevicePair]:
    devices = await attach(KeyboardVsp(), KeyboardVsc)
    await service.on_ready(devices.vsc)
    yield devices
    await devices.close()


async def test_typed_text_reaches_the_guest_exactly(kbd: DevicePair, service: InputService) -> None:
    vsp = kbd.vsp
    assert isinstance(vsp, KeyboardVsp)
    partition = kbd.link.partition
    text = PRINTABLE + "\tünïcödé ✓ 😀"
    sent = await vsp.type_text(partition, text + "\n")
    await until(lambda: len(service.lines) == 1, "the guest's line reader completed the typed line")
    assert service.lines[0] == text, f"typed {text!r}, guest read {service.lines[0]!r}"
    assert vsp.sent_total == sent and vsp.states()[0]["events_sent"] == sent
    await vsp.send_keys(partition, "a b Backspace Enter")
    await until(lambda: len(service.lines) == 2, "the second line arrived")
    assert service.lines[1] == "a"
    await vsp.send_key(partition, 0x48, e0=True)
    await vsp.send_key(partition, 0x48, e0=True, release=True)
    strokes = []
    async for stroke in service.keys():
        strokes.append(stroke)
        if stroke.key == "Up" and not stroke.pressed:
            break
    assert strokes[-2].key == "Up" and strokes[-2].pressed
    await vsp.send_unicode(partition, "é")
    await until(lambda: service.line == "é", "the unicode event was typed")


async def test_caps_lock_goes_to_the_host_as_leds_and_typing_allows_for_it(kbd: DevicePair,
                                                                         service: InputService) -> None:
    vsp = kbd.vsp
    assert isinstance(vsp, KeyboardVsp)
    partition = kbd.link.partition
    await vsp.send_keys(partition, "CapsLock")
    await until(lambda: vsp.led_flags(partition) == LedFlags.CAPS_LOCK, "the guest reported Caps Lock on")
    await vsp.type_text(partition, "Hello\n")
    await until(lambda: bool(service.lines), "the line arrived")
    assert service.lines[0] == "Hello"


async def test_input_without_a_channel_or_before_the_handshake_is_refused(kbd: DevicePair) -> None:
    vsp = kbd.vsp
    assert isinstance(vsp, KeyboardVsp)
    with pytest.raises(InputNotReady, match="'nobody' has no open keyboard channel"):
        await vsp.type_text("nobody", "x")
    with pytest.raises(InputNotReady, match="no open mouse channel"):
        await MouseVsp().send_mouse("nobody", 0, 0)
    partition = kbd.link.partition
    await kbd.close()
    await until(lambda: partition not in vsp.sessions, "the closed channel's session went")
    with pytest.raises(InputNotReady, match="no open keyboard channel"):
        await vsp.send_keys(partition, "Enter")


async def test_mouse_reports_arrive_with_their_coordinates_and_buttons(service: InputService) -> None:
    vsp = MouseVsp()
    devices = await attach(vsp, MouseVsc)
    try:
        await service.on_ready(devices.vsc)
        partition = devices.link.partition
        await until(lambda: partition in vsp.sessions and vsp.sessions[partition].host.active,
                    "the mouse VSP saw the device-info ACK")
        moves = [(0, 0, 0, 0), (to_absolute(511, 1024), to_absolute(767, 768), 1, 0), (32767, 32767, 0x1F, -2)]
        for x, y, buttons, wheel in moves:
            await vsp.send_mouse(partition, x, y, buttons, wheel)
        got = []
        async for report in service.reports():
            got.append((report.x, report.y, report.buttons, report.wheel))
            if len(got) == len(moves):
                break
        assert got == moves
        assert moves[1][:2] == (16367, 32767)
        with pytest.raises(ValueError, match="position"):
            await vsp.send_mouse(partition, 40000, 0)
    finally:
        await devices.close()
    assert vsp.sessions == {}


class _NeverAcks(mouse.VscHandshake):
    """A guest that takes the device info but never acknowledges it."""

    def receive(self, packet: Incoming) -> list[Outgoing]:
        super().receive(packet)
        return []


class _NeverAcksVsc(MouseVsc):
    def new_handshake(self) -> mouse.VscHandshake:
        return _NeverAcks()


async def test_a_guest_that_never_acks_gets_no_reports_and_a_clear_error() -> None:
    vsp = MouseVsp()
    devices = await attach(vsp, _NeverAcksVsc)
    try:
        partition = devices.link.partition
        await until(lambda: partition in vsp.sessions and vsp.sessions[partition].host.handshake.negotiated_version,
                    "the mouse VSP approved the version")
        with pytest.raises(InputNotReady, match=r"handshake not finished \(waiting for INITIAL_DEVICE_INFO_ACK\)"):
            await vsp.send_mouse(partition, 1, 1)
        assert vsp.errors == 0 and vsp.sent_total == 0
    finally:
        await devices.close()
