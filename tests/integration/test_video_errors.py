"""A misbehaving guest on the video channel, over a real socket to a real parent process: each broken SYNTHVID
message costs only that guest's connection, with the reason in its CLOSE; a bystander child with its own
screen never notices, and the daemon serves a newcomer afterwards."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vmbus_proto.devices.video import synthvid as sv
from vmbus_proto.gpadl import split
from vmbus_proto.guids import SYNTHVID
from vmbus_proto.messages import GpadlCreated, GpadlTeardown, GpadlTorndown
from vmbus_proto.packets import Packet, PacketType

from .conftest import Parent
from .rawclient import RawClient

pytestmark = pytest.mark.integration
RING_PAGES = 64
VRAM_GPADL, VRAM_PFN = 0xE1E20, 0x8000
VRAM_PAGES = sv.VRAM_SIZE // 4096


@pytest.fixture
def p(survived_parent: Parent) -> Parent:
    return survived_parent


class VideoGuest:
    """A hand-driven synthvid guest on a raw connection."""

    def __init__(self, p: Parent, name: str) -> None:
        self.c = RawClient(p.tcp)
        offers = self.c.negotiate(name)
        self.relid = next(r for r, o in offers.items() if o.if_type == SYNTHVID)
        self.c.open(self.relid, RING_PAGES, gpadl=0xE1E10)
        self.trans_id = 0

    def send(self, msg: sv.Message | bytes, data: bytes = b"") -> None:
        payload = msg if isinstance(msg, bytes) else sv.encode(msg, guest=True)
        self.trans_id += 1
        self.c.send_packet(self.relid, Packet(PacketType.DATA_INBAND, 0, self.trans_id, payload, data=data))

    def expect(self, cls: type) -> sv.Message:
        msg = sv.decode(self.c.recv_packet(self.relid).payload)
        assert isinstance(msg, cls), f"expected {cls.__name__}, got {msg}"
        return msg

    def version(self) -> None:
        self.send(sv.VersionRequest(sv.Version.WIN10))
        self.expect(sv.VersionResponse)

    def screen(self, width: int = 1024, height: int = 768) -> None:
        """VRAM shared by GPADL and located, a screen set; the host asks for DIRT."""
        self.version()
        header, bodies = split(self.relid, VRAM_GPADL, list(range(VRAM_PFN, VRAM_PFN + VRAM_PAGES)))
        for m in [header, *bodies]:
            self.c.send(m)
        assert self.c.expect(GpadlCreated).creation_status == 0
        gpa = VRAM_PFN * 4096
        self.send(sv.VramLocation(gpa, 1, gpa))
        assert self.expect(sv.VramLocationAck) == sv.VramLocationAck(gpa)
        self.send(sv.SituationUpdate(0, 1, width, height, width * 4))
        self.expect(sv.SituationUpdateAck)
        assert isinstance(self.expect(sv.FeatureChange), sv.FeatureChange)

    def closed_with(self, needle: str) -> None:
        reason = self.c.wait_closed()
        assert reason is not None and needle in reason, f"closed with {reason!r}, expected {needle!r}"


def _unknown_type(g: VideoGuest) -> None:
    g.version()
    g.send(sv.pack_message(99, b"\0" * 4))


def _second_version(g: VideoGuest) -> None:
    g.version()
    g.send(sv.VersionRequest(sv.Version.WIN10))


def _dirt_outside(g: VideoGuest) -> None:
    g.screen()
    g.send(sv.Dirt((sv.Rect(1000, 0, 1100, 10),)), bytes(100 * 10 * 4))


def _dirt_inverted(g: VideoGuest) -> None:
    g.screen()
    g.send(sv.Dirt((sv.Rect(10, 0, 10, 10),)))


def _wrong_pixel_bytes(g: VideoGuest) -> None:
    g.screen()
    g.send(sv.Dirt((sv.Rect(0, 0, 10, 10),)), bytes(10 * 10 * 4 - 4))


def _depth_16(g: VideoGuest) -> None:
    g.screen()
    g.send(sv.SituationUpdate(0, 1, 1024, 768, 2048, depth_bits=16))


def _screen_beyond_vram(g: VideoGuest) -> None:
    g.screen()
    g.send(sv.SituationUpdate(0, 1, 2048, 1536, 2048 * 4))


CASES: list[tuple[str, Callable[[VideoGuest], None], str]] = [
    ("unknown-type", _unknown_type, "synthvid message type 99 is unknown"),
    ("second-version", _second_version, "second synthvid VERSION_REQUEST"),
    ("dirt-outside", _dirt_outside, "is empty or outside the 1024x768 screen"),
    ("dirt-inverted", _dirt_inverted, "is empty or outside"),
    ("pixel-bytes", _wrong_pixel_bytes, "came with 396 bytes of pixels; they hold 400"),
    ("depth-16", _depth_16, "depth of 16 bits"),
    ("beyond-vram", _screen_beyond_vram, "the VRAM has 8388608"),
]


@pytest.mark.parametrize(("case", "misbehave", "needle"), CASES, ids=[c[0] for c in CASES])
def test_a_broken_synthvid_message_costs_only_that_guest(p: Parent, case: str, misbehave: Callable[[VideoGuest], None],
                                                         needle: str) -> None:
    mark = p.mark()
    g = VideoGuest(p, f"bad-video-{case}")
    misbehave(g)
    g.closed_with(needle)
    p.wait_for(lambda r: r.get("event") == "device protocol error; closing the partition's connection"
               and needle in str(r.get("error")), timeout=30, start=mark)


def test_vram_gpadl_torn_down_while_in_use_keeps_the_connection(p: Parent) -> None:
    """The guest tears its VRAM's GPADL down while the screen uses it: the VSP lets go (GPADL_TORNDOWN comes),
    and a later DIRT, which has no VRAM to land in, is the protocol error."""
    g = VideoGuest(p, "vram-teardown")
    g.screen()
    g.send(sv.Dirt((sv.Rect(0, 0, 4, 4),)), bytes(64))
    g.c.send(GpadlTeardown(child_relid=g.relid, gpadl=VRAM_GPADL))
    assert g.c.expect(GpadlTorndown).gpadl == VRAM_GPADL
    g.send(sv.Dirt((sv.Rect(0, 0, 4, 4),)), bytes(64))
    g.closed_with("DIRT while no VRAM is mapped")
