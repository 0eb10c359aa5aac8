"""Server core wired to client core in memory: every message goes through the real codec."""

from __future__ import annotations

import uuid
from typing import assert_never

from vmbus_proto import client as c
from vmbus_proto import messages as m
from vmbus_proto import server as s
from vmbus_proto.guids import NETWORK, SCSI, SYNTHVID

GUEST_PAGES = c.ConnectionPages.from_pfns(0x100, 0x101, 0x102)  # interrupt page, two monitor pages
OFFERS = [
    s.OfferSpec("storage", SCSI, uuid.UUID(int=1)),
    s.OfferSpec("network", NETWORK, uuid.UUID(int=2)),
    s.OfferSpec("video", SYNTHVID, uuid.UUID(int=3), pipe_mode=True, mmio_megabytes=8),
]


class Bus:
    def __init__(self, offers: list[s.OfferSpec] | None = None, host_versions: object = None,
                 guest_versions: object = None, auto_device: bool = True) -> None:
        kw = {} if host_versions is None else {"supported": host_versions}
        self.host = s.HostConnection(OFFERS if offers is None else offers, **kw)  # type: ignore[arg-type]
        gkw = {} if guest_versions is None else {"versions": guest_versions}
        self.guest = c.GuestConnection(GUEST_PAGES, **gkw)  # type: ignore[arg-type]
        self.auto_device = auto_device
        self.events: list[c.Event] = []
        self.dropped: list[s.Dropped] = []
        self.device_ops: list[s.DeviceOpen | s.DeviceClose | s.TeardownGpadl] = []
        self.trace: list[str] = []

    def pump(self) -> None:
        while True:
            moved = False
            for msg in self.guest.messages():
                moved = True
                wire = m.decode(msg.encode())
                assert wire == msg
                self.trace.append("G>H " + wire.describe())
                self.host.receive(wire)
            for act in self.host.actions():
                moved = True
                match act:
                    case s.Send():
                        wire = m.decode(act.message.encode())
                        assert wire == act.message
                        self.trace.append("H>G " + wire.describe())
                        self.guest.receive(wire)
                    case s.Dropped():
                        self.dropped.append(act)
                    case s.DeviceOpen() | s.DeviceClose() | s.TeardownGpadl():
                        self.device_ops.append(act)
                        if self.auto_device:
                            self.complete(act)
                    case s.Connected() | s.Disconnected() | s.ChannelFreed():
                        pass
                    case _:
                        assert_never(act)
            self.events.extend(self.guest.events())
            if not moved:
                return

    def complete(self, act: s.DeviceOpen | s.DeviceClose | s.TeardownGpadl, ok: bool = True) -> None:
        """The device answers a request (a GPADL teardown always succeeds)."""
        match act:
            case s.DeviceOpen():
                self.host.open_complete(act.params.relid, act.seq, ok)
            case s.DeviceClose():
                self.host.close_complete(act.relid, act.seq)
            case s.TeardownGpadl():
                self.host.gpadl_released(act.relid, act.gpadl)

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]

    def connect(self) -> None:
        self.guest.connect()
        self.pump()

    def open(self, relid: int, pages: int = 8, offset: int = 4) -> int:
        gid = self.guest.create_gpadl(relid, list(range(0x1000 + relid * 100, 0x1000 + relid * 100 + pages)))
        self.pump()
        self.guest.open_channel(relid, gid, offset)
        self.pump()
        return gid
