"""The synthetic keyboard and mouse (SynthHID) VSPs, and the parent's API for typing into a partition.

Mirrors OpenVMM vm/devices/uidevices/src/keyboard/mod.rs and mouse/mod.rs (Linux's halves:
drivers/input/serio/hyperv-keyboard.c, drivers/hid/hid-hyperv.c). The protocol is
``vmbus_proto.devices.input.host`` (sans-IO); these devices move its packets and keep one session per
partition's open channel, which is what the web console, the JSON API and ``send-keys`` reach through
``ParentDaemon.device("keyboard")`` / ``device("mouse")``:

- ``KeyboardVsp.send_key(partition, make_code, release=, e0=, e1=)``, ``type_text(partition, text)``,
  ``send_keys(partition, "ctrl+alt+del")``, ``send_unicode(partition, text)``;
- ``MouseVsp.send_mouse(partition, x, y, buttons=0, wheel=0)`` (absolute 0..32767; ``to_absolute`` scales
  pixels).

Each raises :class:`InputNotReady` (one line: which partition, which device, why) when that partition has no
open channel or its handshake is not finished, ValueError for a value out of range, and LocalProtocolError
for an unknown key name. Input is never queued for a device that cannot take it, as OpenVMM routes input
only to an active device. A guest that stops reading its ring holds a sender back (ring backpressure) for
at most ``send_timeout`` seconds; then InputNotReady says so. A session goes when its channel closes, with
its counters logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.base import HandshakeTrace, Outgoing
from vmbus_proto.devices.input import keyboard, keymap, mouse
from vmbus_proto.devices.input.host import InputNotReady, KeyboardHost, MouseHost
from vmbus_proto.devices.input.keyboard import KeyEvent, KeystrokeFlags

from ...counters import Sample
from ...vsp import ChannelResources, HandshakeVsp, incoming

__all__ = ["InputNotReady", "KeyboardVsp", "MouseVsp", "to_absolute"]

SEND_TIMEOUT = 10.0  # seconds a sender waits for ring space before the guest counts as not reading


def to_absolute(pixel: int, size: int) -> int:
    """A pixel coordinate on a screen ``size`` pixels wide (or high) as the mouse's absolute 0..32767."""
    if size <= 1:
        return 0
    return max(0, min(0x7FFF, round(pixel * 0x7FFF / (size - 1))))


@dataclass(slots=True)
class InputSession:
    """One partition's open input channel."""

    partition: str
    relid: int
    channel: Channel
    host: Any  # KeyboardHost or MouseHost
    log: Any
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # keeps concurrent senders' packets in order


class _InputVsp(HandshakeVsp):
    """What the keyboard and mouse VSPs share: sessions by partition, the packet loop, ordered sends."""

    what: ClassVar[str]  # "keyboard" / "mouse" in messages

    def __init__(self, *, send_timeout: float = SEND_TIMEOUT, **handshake_args: Any) -> None:
        super().__init__(**handshake_args)
        self.send_timeout = send_timeout
        self.sessions: dict[str, InputSession] = {}
        self.sent_total = 0  # events (keyboard) or reports (mouse) sent, every partition, since start

    def _new_host(self) -> Any:
        raise NotImplementedError

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        host = self._new_host()
        session = InputSession(res.partition, channel.relid, channel, host, res.log)
        self.sessions[res.partition] = session
        trace = HandshakeTrace(self.module.describe) if res.trace else None
        try:
            while True:
                pkt = incoming(await channel.recv())
                was_active, refused = host.active, host.refused
                if trace is not None and not was_active:
                    res.log.info(trace.received("G>H", pkt))
                outs: list[Outgoing] = host.receive(pkt)
                if trace is not None and not was_active:
                    for o in outs:
                        res.log.info(trace.sent("H>G", o))
                if outs:
                    async with session.lock:
                        await self._send(channel, outs)
                if not was_active and host.active:
                    self.handshakes += 1
                    version = host.handshake.negotiated_version
                    res.log.info("device protocol negotiated", device=self.name,
                                 version=self.spec.version_text(version) if version is not None else None)
                elif host.refused != refused:
                    res.log.warning(f"{self.what} version refused; waiting for a new request", refused=host.refused)
        finally:
            if self.sessions.get(res.partition) is session:
                del self.sessions[res.partition]
            res.log.info(f"{self.what} channel closed", **self.counters_of(host))

    @staticmethod
    async def _send(channel: Channel, outs: list[Outgoing]) -> None:
        for o in outs:
            pkt = o.to_packet()
            if not channel.try_send(pkt):
                await channel.send(pkt)

    def counters_of(self, host: Any) -> dict[str, Any]:
        raise NotImplementedError

    def session(self, partition: str) -> InputSession:
        """The partition's session if its device is active, else InputNotReady saying why not."""
        session = self.sessions.get(partition)
        if session is None:
            raise InputNotReady(f"partition {partition!r} has no open {self.what} channel")
        if not session.host.active:
            raise InputNotReady(f"partition {partition!r}: {self.what} handshake not finished "
                                f"({session.host.state})")
        return session

    async def _deliver(self, session: InputSession, outs: list[Outgoing]) -> int:
        if not outs:
            return 0
        try:
            async with asyncio.timeout(self.send_timeout):
                async with session.lock:
                    await self._send(session.channel, outs)
        except TimeoutError:
            raise InputNotReady(f"partition {session.partition!r} is not reading its {self.what} ring "
                                f"(no room for {self.send_timeout:g}s)") from None
        self.sent_total += len(outs)
        return len(outs)

    def samples(self) -> list[Sample]:
        unit = "events" if self.what == "keyboard" else "reports"
        return [*super().samples(),
                Sample(f"{unit}_sent_total", self.sent_total, f"{self.what} {unit} sent to guests through this API"),
                Sample("sessions_active", sum(1 for s in self.sessions.values() if s.host.active),
                       f"partitions whose {self.what} handshake is done", "gauge")]

    def states(self) -> list[dict[str, Any]]:
        """Every open session, for the JSON API."""
        return [{"partition": s.partition, "relid": s.relid, "state": s.host.state, **self.counters_of(s.host)}
                for s in self.sessions.values()]


class KeyboardVsp(_InputVsp):
    module = keyboard
    what = "keyboard"

    def _new_host(self) -> KeyboardHost:
        return KeyboardHost(self.make_handshake())  # type: ignore[arg-type]

    def counters_of(self, host: Any) -> dict[str, Any]:
        kb: KeyboardHost = host
        return {"events_sent": kb.events_sent, "led_flags": kb.led_flags, "leds_received": kb.leds_received,
                "refused": kb.refused}

    def led_flags(self, partition: str) -> int:
        """The guest's lock LEDs (``keyboard.LedFlags``) as its last LED_INDICATORS said."""
        host: KeyboardHost = self.session(partition).host
        return host.led_flags

    async def send_events(self, partition: str, events: Iterable[KeyEvent]) -> int:
        """EVENT packets for ``events``, in order; returns how many were sent."""
        session = self.session(partition)
        host: KeyboardHost = session.host
        return await self._deliver(session, host.events(events))

    async def send_key(self, partition: str, make_code: int, *, release: bool = False, e0: bool = False,
                       e1: bool = False) -> int:
        """One set-1 key event: ``make_code`` 0..0x7F, a break when ``release``, with the E0 or E1 prefix."""
        info = ((KeystrokeFlags.IS_BREAK if release else 0) | (KeystrokeFlags.IS_E0 if e0 else 0)
                | (KeystrokeFlags.IS_E1 if e1 else 0))
        return await self.send_events(partition, [KeyEvent(make_code, info)])

    async def type_text(self, partition: str, text: str) -> int:
        """``text`` typed on a US keyboard (Shift where needed, the guest's Caps Lock allowed for, IS_UNICODE
        events for characters outside the layout). Returns the number of events sent."""
        session = self.session(partition)
        host: KeyboardHost = session.host
        return await self.send_events(partition, keymap.text_events(text, caps_lock=host.caps_lock))

    async def send_keys(self, partition: str, keys: str) -> int:
        """Named keys and chords, whitespace-separated: "ctrl+alt+del", "Escape", "shift+Tab F5"."""
        events = keymap.keys_events(keys)
        return await self.send_events(partition, events)

    async def send_unicode(self, partition: str, text: str) -> int:
        """Every character of ``text`` as IS_UNICODE events (Hyper-V's way for text outside the layout)."""
        return await self.send_events(partition, [ev for ch in text for ev in keymap.unicode_events(ch)])


class MouseVsp(_InputVsp):
    module = mouse
    what = "mouse"

    def _new_host(self) -> MouseHost:
        return MouseHost(self.make_handshake())  # type: ignore[arg-type]

    def counters_of(self, host: Any) -> dict[str, Any]:
        m: MouseHost = host
        return {"reports_sent": m.reports_sent, "refused": m.refused}

    async def send_mouse(self, partition: str, x: int, y: int, buttons: int = 0, wheel: int = 0) -> int:
        """One INPUT_REPORT: absolute ``x``, ``y`` in 0..32767, ``buttons`` (``mouse.MouseButton`` bits), a
        relative ``wheel`` step."""
        session = self.session(partition)
        host: MouseHost = session.host
        return await self._deliver(session, [host.report(buttons, x, y, wheel)])
