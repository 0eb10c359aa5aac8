"""Tier 1: the synthetic keyboard and SynthHID mouse, sans-IO: every message, the descriptor bytes, the host and
guest state machines (handshakes, bad input, input before Active), and text -> set-1 events -> text."""

from __future__ import annotations

import struct

import pytest

from vmbus_proto.devices.base import Incoming, Outgoing
from vmbus_proto.devices.input import keyboard, keymap, mouse
from vmbus_proto.devices.input.guest import KeyboardGuest, MouseGuest
from vmbus_proto.devices.input.host import InputNotReady, KeyboardHost, MouseHost
from vmbus_proto.devices.input.keyboard import KeyEvent, KeystrokeFlags, LedFlags
from vmbus_proto.devices.input.keymap import KeyDecoder, typed_text
from vmbus_proto.errors import DeviceProtocolError, LocalProtocolError
from vmbus_proto.packets import PacketType
from vmbus_proto.pipe import pipe_wrap

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def inband(payload: bytes) -> Incoming:
    return Incoming(PacketType.DATA_INBAND, 1, True, payload)


def deliver(outs: list[Outgoing]) -> list[Incoming]:
    return [Incoming(o.type, o.trans_id, o.completion_requested, o.payload) for o in outs]


def kbd(msg_type: int, body: bytes) -> Incoming:
    return inband(keyboard.pack_message(msg_type, body))


def hid(msg_type: int, body: bytes) -> Incoming:
    return inband(mouse.pack_message(msg_type, body))


def roundtrip(text: str, *, caps_lock: bool = False) -> str:
    decoder = KeyDecoder()
    if caps_lock:
        decoder.leds = LedFlags.CAPS_LOCK
    strokes = [s for ev in keymap.text_events(text, caps_lock=caps_lock) if (s := decoder.feed(ev)) is not None]
    return typed_text(strokes)


# ---- codecs and golden bytes ------------------------------------------------------------------------------


def test_report_descriptor_and_device_info_bytes_are_openvmms() -> None:
    desc = mouse.REPORT_DESCRIPTOR
    assert len(desc) == 67 and desc[:4] == bytes.fromhex("05010902") and desc[-2:] == b"\xc0\xc0"
    assert desc[14] == 0x29, "byte 14 is the Usage Maximum tag (Linux's SA-167 workaround looks at it)"
    info = mouse.DEFAULT_DEVICE_INFO
    body = info.pack()
    assert len(body) == 32 + 9 + 128 and info.size == 108
    assert struct.unpack_from("<IHHH", body) == (32, 0x045E, 0x0621, 0x0001)
    assert body[32:41] == bytes.fromhex("09 21 0101 00 01 22 4300")
    assert body[41:108] == desc and body[108:] == bytes(128 - 67)
    assert mouse.InitialDeviceInfo.unpack(body) == info
    wire = mouse.pack_message(mouse.MessageType.INITIAL_DEVICE_INFO, body, info.size)
    assert wire[:16] == struct.pack("<IIII", 1, 8 + 169, 2, 108)


@pytest.mark.parametrize("message", [
    mouse.ProtocolRequest(0x00020000), mouse.ProtocolResponse(0x00020000, 1), mouse.DeviceInfoAck(),
    mouse.MouseReport(0x1F, 0x7FFF, 123, -5)], ids=lambda m: type(m).__name__)
def test_mouse_messages_round_trip(message: object) -> None:
    assert type(message).unpack(message.pack()) == message  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", [
    keyboard.ProtocolRequest(0x00010000), keyboard.ProtocolResponse(1),
    KeyEvent(0x48, KeystrokeFlags.IS_E0 | KeystrokeFlags.IS_BREAK), keyboard.LedIndicators(LedFlags.CAPS_LOCK)],
    ids=lambda m: type(m).__name__)
def test_keyboard_messages_round_trip(message: object) -> None:
    assert type(message).unpack(message.pack()) == message  # type: ignore[attr-defined]


def test_mouse_input_report_golden_bytes() -> None:
    out = MouseHost(_active_mouse_handshake()).report(mouse.MouseButton.LEFT | mouse.MouseButton.MIDDLE, 16384, 1, -1)
    assert out.payload == struct.pack("<II", 1, 15) + struct.pack("<II", 4, 7) + bytes.fromhex("05 0040 0100 ffff")
    assert (out.type, out.completion_requested) == (PacketType.DATA_INBAND, False)


def test_keyboard_event_golden_bytes_and_the_bytes_linux_injects() -> None:
    host = _active_keyboard()
    (out,) = host.events([KeyEvent(0x4B, KeystrokeFlags.IS_E0 | KeystrokeFlags.IS_BREAK)])
    assert out.payload == struct.pack("<IHHI", 3, 0x4B, 0, 6)  # no pipe header on the keyboard
    assert KeyEvent.unpack(out.payload[4:]).scancodes() == b"\xe0\xcb"


# ---- keyboard host ----------------------------------------------------------------------------------------


def _active_keyboard() -> KeyboardHost:
    host = KeyboardHost()
    host.receive(kbd(keyboard.MessageType.PROTOCOL_REQUEST, struct.pack("<I", 0x00010000)))
    return host


def test_keyboard_handshake_refuses_a_wrong_version_and_waits_for_a_new_request() -> None:
    host = KeyboardHost()
    with pytest.raises(InputNotReady, match="handshake not finished"):
        host.events(keymap.text_events("a"))
    (refusal,) = host.receive(kbd(keyboard.MessageType.PROTOCOL_REQUEST, struct.pack("<I", 0x00020000)))
    assert refusal.payload == struct.pack("<II", 2, 0) and not host.active and host.refused == 1
    (accept,) = host.receive(kbd(keyboard.MessageType.PROTOCOL_REQUEST, struct.pack("<I", 0x00010000)))
    assert accept.payload == struct.pack("<II", 2, 1) and host.active
    assert len(host.events(keymap.text_events("A"))) == 4 and host.events_sent == 4


def test_keyboard_host_keeps_the_led_state_and_types_around_caps_lock() -> None:
    host = _active_keyboard()
    assert host.receive(kbd(keyboard.MessageType.LED_INDICATORS, struct.pack("<HH", LedFlags.CAPS_LOCK, 0))) == []
    assert host.led_flags == LedFlags.CAPS_LOCK and host.caps_lock and host.leds_received == 1
    assert roundtrip("Hello World", caps_lock=True) == "Hello World"


@pytest.mark.parametrize(("payload", "error"), [
    (b"\x01\x00", "shorter than its header"),
    (struct.pack("<I", 4) + b"\x01", "LED_INDICATORS body of 1 bytes"),
    (struct.pack("<I", 9), "UNKNOWN"),
    (struct.pack("<II", 1, 0x00010000), "PROTOCOL_REQUEST"),
    (struct.pack("<IHHI", 3, 0x1E, 0, 0), "EVENT"),
], ids=["short", "short-led", "unknown-type", "second-request", "event-from-guest"])
def test_keyboard_host_rejects_bad_packets_while_active(payload: bytes, error: str) -> None:
    with pytest.raises(DeviceProtocolError, match=error):
        _active_keyboard().receive(inband(payload))


@pytest.mark.parametrize(("payload", "error"), [
    (b"\x01", "shorter than its header"),
    (struct.pack("<I", 1) + b"\x00", "PROTOCOL_REQUEST body"),
    (struct.pack("<I", 4) + bytes(4), "before PROTOCOL_REQUEST"),
], ids=["short", "short-request", "led-first"])
def test_keyboard_host_rejects_bad_packets_in_its_handshake(payload: bytes, error: str) -> None:
    with pytest.raises(DeviceProtocolError, match=error):
        KeyboardHost().receive(inband(payload))


def test_keyboard_host_refuses_make_codes_beyond_seven_bits() -> None:
    with pytest.raises(ValueError, match="7-bit"):
        _active_keyboard().events([KeyEvent(0x80)])
    assert len(_active_keyboard().events([KeyEvent(0x20AC, KeystrokeFlags.IS_UNICODE)])) == 1


# ---- mouse host -------------------------------------------------------------------------------------------


def _active_mouse_handshake() -> mouse.VspHandshake:
    hs = mouse.VspHandshake()
    hs.receive(hid(mouse.MessageType.PROTOCOL_REQUEST, struct.pack("<I", 0x00020000)))
    hs.receive(hid(mouse.MessageType.INITIAL_DEVICE_INFO_ACK, b"\0"))
    return hs


def test_mouse_handshake_then_reports_only_after_the_ack() -> None:
    host = MouseHost()
    assert host.state == "waiting for PROTOCOL_REQUEST"
    (refusal,) = host.receive(hid(mouse.MessageType.PROTOCOL_REQUEST, struct.pack("<I", 0x00010000)))
    assert mouse.ProtocolResponse.unpack(mouse.unpack_message(refusal.payload)[1]) == mouse.ProtocolResponse(
        0x00010000, 0)
    assert host.refused == 1
    response, info = host.receive(hid(mouse.MessageType.PROTOCOL_REQUEST, struct.pack("<I", 0x00020000)))
    assert mouse.unpack_message(response.payload)[0] == mouse.MessageType.PROTOCOL_RESPONSE
    msg_type, body = mouse.unpack_message(info.payload)
    assert msg_type == mouse.MessageType.INITIAL_DEVICE_INFO and len(body) == 108
    # A guest that has not acknowledged (or never does) gets no reports: the sender is told why.
    assert host.state == "waiting for INITIAL_DEVICE_INFO_ACK"
    with pytest.raises(InputNotReady, match="INITIAL_DEVICE_INFO_ACK"):
        host.report(0, 10, 10)
    assert host.receive(hid(mouse.MessageType.INITIAL_DEVICE_INFO_ACK, b"\0")) == [] and host.active
    host.report(mouse.MouseButton.RIGHT, 32767, 0, 3)
    assert host.reports_sent == 1 and host.last == mouse.MouseReport(2, 32767, 0, 3)


@pytest.mark.parametrize(("values", "error"), [
    ((0, -1, 0, 0), "position"), ((0, 0, 0x8000, 0), "position"), ((0x20, 0, 0, 0), "buttons"),
    ((0, 0, 0, -32768), "wheel")])
def test_mouse_reports_out_of_range_are_refused(values: tuple[int, int, int, int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        MouseHost(_active_mouse_handshake()).report(*values)


@pytest.mark.parametrize(("packet", "error"), [
    (hid(mouse.MessageType.INITIAL_DEVICE_INFO_ACK, b"\0"), "before PROTOCOL_REQUEST"),
    (hid(7, b""), "before PROTOCOL_REQUEST"),
    (inband(b"\x01\x00\x00\x00"), "shorter than its header"),
    (inband(pipe_wrap(b"\0\0\0\0")), "shorter than its header"),
    (inband(struct.pack("<II", 2, 8) + struct.pack("<II", 0, 4)), "pipe packet type 2"),
    (hid(mouse.MessageType.PROTOCOL_REQUEST, b"\x00\x00"), "PROTOCOL_REQUEST body of 2 bytes"),
    (Incoming(PacketType.COMP, 1, False, b""), "packet type 0xb"),
], ids=["ack-before-info", "unknown-type", "no-pipe-header", "short-header", "partial-pipe", "short-request",
        "completion"])
def test_mouse_host_rejects_bad_packets_in_its_handshake(packet: Incoming, error: str) -> None:
    with pytest.raises(DeviceProtocolError, match=error):
        MouseHost().receive(packet)


def test_mouse_host_takes_nothing_once_active() -> None:
    host = MouseHost(_active_mouse_handshake())
    with pytest.raises(DeviceProtocolError, match="while active"):
        host.receive(hid(mouse.MessageType.PROTOCOL_REQUEST, struct.pack("<I", 0x00020000)))
    with pytest.raises(DeviceProtocolError, match="while active"):
        host.receive(inband(b"\x00"))


# ---- VSC handshakes against the hosts, and the guests after them ---------------------------------------


def test_keyboard_vsc_and_host_in_memory_then_text_round_trips() -> None:
    host, vsc = KeyboardHost(), keyboard.VscHandshake()
    for pkt in deliver(vsc.start()):
        for reply in deliver(host.receive(pkt)):
            vsc.receive(reply)
    assert vsc.done and host.active
    guest = KeyboardGuest()
    strokes = [s for pkt in deliver(host.events(keymap.text_events(PRINTABLE + "\n\t")))
               for s in guest.receive(pkt)[0]]
    assert typed_text(strokes) == PRINTABLE + "\n\t"
    assert guest.counters.received == len(strokes) and guest.counters.dropped_malformed == 0


def test_mouse_vsc_and_host_in_memory_then_reports_arrive() -> None:
    host, vsc = MouseHost(), mouse.VscHandshake()
    for pkt in deliver(vsc.start()):
        for reply in deliver(host.receive(pkt)):
            for ack in deliver(vsc.receive(reply)):
                host.receive(ack)
    assert vsc.done and host.active and vsc.report_descriptor == mouse.REPORT_DESCRIPTOR
    guest = MouseGuest()
    (pkt,) = deliver([host.report(mouse.MouseButton.LEFT, 100, 200, 1)])
    assert guest.receive(pkt) == mouse.MouseReport(1, 100, 200, 1)


def test_keyboard_guest_drops_what_linux_drops_and_sends_leds_on_lock_keys() -> None:
    guest = KeyboardGuest()
    assert guest.receive(inband(struct.pack("<I", 3))) == ([], [])  # payload of 4 bytes: dropped
    assert guest.receive(inband(struct.pack("<IHH", 3, 0x1E, 0))) == ([], [])  # EVENT shorter than 12 bytes
    assert guest.receive(kbd(9, b"\0" * 4)) == ([], [])  # unknown type
    assert guest.receive(kbd(keyboard.MessageType.PROTOCOL_RESPONSE, struct.pack("<I", 1))) == ([], [])
    c = guest.counters
    assert (c.dropped_malformed, c.dropped_unknown, c.unknown_types, c.received) == (2, 1, [9], 0)
    strokes, outs = guest.receive(kbd(keyboard.MessageType.EVENT, KeyEvent(0x3A).pack()))
    assert [s.key for s in strokes] == ["CapsLock"]
    assert [o.payload for o in outs] == [struct.pack("<IHH", 4, LedFlags.CAPS_LOCK, 0)]
    assert guest.receive(kbd(keyboard.MessageType.EVENT, KeyEvent(0x3A).pack()))[1] == []  # auto-repeat


def test_mouse_guest_drops_malformed_and_unknown_packets() -> None:
    guest = MouseGuest()
    for pkt in (hid(mouse.MessageType.INPUT_REPORT, b"\x01\x02"), inband(b"\x02\x00"),
                inband(struct.pack("<II", 2, 0))):
        assert guest.receive(pkt) is None
    assert guest.receive(hid(mouse.MessageType.INITIAL_DEVICE_INFO, b"")) is None
    assert (guest.counters.dropped_malformed, guest.counters.dropped_unknown) == (3, 1)


# ---- the keymap -------------------------------------------------------------------------------------------


def test_every_printable_ascii_character_round_trips_through_set_1() -> None:
    for char in PRINTABLE:
        assert roundtrip(char) == char, f"{char!r} did not come back"
    assert roundtrip(PRINTABLE) == PRINTABLE
    assert roundtrip("a\r\nb\rc\n") == "a\nb\nc\n"


def test_characters_outside_the_layout_travel_as_unicode_events() -> None:
    text = "héllo — ✓ 😀 ß"
    assert roundtrip(text) == text
    events = keymap.text_events("😀")
    assert [(e.make_code, e.info) for e in events] == [(0xD83D, 1), (0xD83D, 3), (0xDE00, 1), (0xDE00, 3)]
    lone = KeyDecoder().feed(KeyEvent(0xDE00, KeystrokeFlags.IS_UNICODE))
    assert lone is not None and lone.char == "\ufffd"


def test_shifted_characters_press_and_release_left_shift_around_the_key() -> None:
    assert b"".join(e.scancodes() for e in keymap.text_events("A!")) == bytes.fromhex("2a 1e 9e aa 2a 02 82 aa")
    assert b"".join(e.scancodes() for e in keymap.text_events("a1\n\t\b\x1b")) == bytes.fromhex(
        "1e 9e 02 82 1c 9c 0f 8f 0e 8e 01 81")


def test_named_keys_and_chords() -> None:
    seq = b"".join(e.scancodes() for e in keymap.keys_events("ctrl+alt+del"))
    assert seq == bytes.fromhex("1d 38 e053 e0d3 b8 9d")
    arrows = b"".join(e.scancodes() for e in keymap.keys_events("Up Down Left Right Home End Delete F1 F12 Escape"))
    assert arrows == bytes.fromhex("e048 e0c8 e050 e0d0 e04b e0cb e04d e0cd e047 e0c7 e04f e0cf e053 e0d3"
                                   " 3b bb 58 d8 01 81")
    assert b"".join(e.scancodes() for e in keymap.keys_events("Pause")) == bytes.fromhex("e11d 45 e19d c5")
    assert b"".join(e.scancodes() for e in keymap.keys_events("ctrl++")) == bytes.fromhex("1d 2a 0d 8d aa 9d")
    decoder = KeyDecoder()
    strokes = [s for e in keymap.keys_events("ctrl+c shift+Tab Pause") if (s := decoder.feed(e))]
    c = next(s for s in strokes if s.key == "c")
    assert c.ctrl and c.char is None, "ctrl+c types no character"
    assert [s.key for s in strokes if s.pressed][-1] == "Pause"
    for bad in ("", "ctrl+", "hyper+x", "NoSuchKey"):
        with pytest.raises(LocalProtocolError):
            keymap.keys_events(bad)
