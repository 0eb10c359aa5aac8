"""The synthetic keyboard and mouse VSCs (Linux drivers/input/serio/hyperv-keyboard.c, drivers/hid/hid-hyperv.c).

After the handshake (``VscHandshake`` in ``vmbus_proto.devices.input.keyboard`` / ``mouse``) each runs the
sans-IO ``KeyboardGuest`` / ``MouseGuest`` of ``vmbus_proto.devices.input.guest``: keys decoded from set-1
events (and LED_INDICATORS sent back when a lock key toggles), mouse reports from INPUT_REPORTs. What they
decode goes to the guest's :class:`~.service.InputService`.
"""

from __future__ import annotations

from typing import Any

from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.input import keyboard, mouse
from vmbus_proto.devices.input.guest import GuestCounters, KeyboardGuest, MouseGuest

from ...vsc import HandshakeVsc
from .service import InputService, InputSink, counters_text


class _InputVsc(HandshakeVsc):
    Service = InputService

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sink: InputSink | None = None  # the InputService, once it took this driver
        self.counters = GuestCounters()  # the sans-IO guest's, once it is made

    def forget(self) -> None:
        if self.version is not None:
            self.log.info(f"{self.spec.name} closed", **counters_text(self.counters))
            self.version = None
        super().forget()


class KeyboardVsc(_InputVsc):
    module = keyboard

    async def run(self, channel: Channel) -> None:
        self.guest = guest = KeyboardGuest(self.counters)
        while True:
            pkt = await channel.recv()
            strokes, outs = guest.receive(self._incoming(pkt))
            for out in outs:
                await channel.send(out.to_packet())
            sink = self.sink
            if sink is not None:
                for stroke in strokes:
                    sink.key(stroke)


class MouseVsc(_InputVsc):
    module = mouse

    async def run(self, channel: Channel) -> None:
        self.guest = guest = MouseGuest(self.counters)
        while True:
            report = guest.receive(self._incoming(await channel.recv()))
            sink = self.sink
            if report is not None and sink is not None:
                sink.report(report)
