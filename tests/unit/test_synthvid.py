"""SYNTHVID sans-IO: every message's codec, the host and guest state machines wired in memory in hyperv_fb's
order, damage merging and the DIRT throttle, and every malformed or out-of-order input as a protocol error."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from vmbus_proto.devices.base import Incoming
from vmbus_proto.devices.video import guest as G
from vmbus_proto.devices.video import host as H
from vmbus_proto.devices.video import synthvid as sv
from vmbus_proto.devices.video.synthvid import Rect
from vmbus_proto.errors import DeviceProtocolError, LocalProtocolError
from vmbus_proto.packets import Packet, PacketType

GPA = 0x100000

MESSAGES: list[sv.Message] = [
    sv.VersionRequest(sv.Version.WIN10),
    sv.VersionResponse(sv.Version.WIN10, 2, 1),
    sv.VramLocation(GPA, 1, GPA),
    sv.VramLocationAck(GPA),
    sv.SituationUpdate(7, 1, 1024, 768, 4096),
    sv.SituationUpdateAck(7),
    sv.PointerPosition(1, -3, 20),
    sv.PointerShape(sv.CURSOR_COMPLETE, 1, 2, 2, 1, 0, bytes(range(16))),
    sv.FeatureChange(1, 0, 1, 0),
    sv.FeatureChange(1, 1, 1, 1, sv.EDID),
    sv.Dirt((Rect(0, 0, 10, 10), Rect(5, 6, 7, 8))),
    sv.Dirt(()),
    sv.BiosInfoRequest(),
    sv.BiosInfoResponse(1),
    sv.ResolutionRequest(64),
    sv.ResolutionResponse(sv.EDID, ((1024, 768), (1920, 1080)), 1),
    sv.CapabilityRequest(),
    sv.CapabilityResponse(0),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_with_its_pipe_and_synthvid_headers(msg: sv.Message) -> None:
    for guest in (False, True):
        wire = sv.encode(msg, guest=guest)
        kind, size = struct.unpack_from("<II", wire)
        body = len(wire) - 16
        assert (kind, size) == (1, len(wire) - 8), "pipe header {1, bytes that follow}"
        assert struct.unpack_from("<I", wire, 12)[0] == body + (8 if guest else 0), "synthvid size field"
        assert sv.decode(wire) == msg
        assert sv.describe(wire).startswith("SYNTHVID_")


def test_golden_bytes_of_the_fixed_size_messages() -> None:
    assert sv.encode(sv.VramLocation(GPA, 1, GPA), guest=True).hex() == (
        "0100000019000000" "0300000019000000" "0000100000000000" "01" "0000100000000000")
    assert sv.SituationUpdate(0, 1, 1024, 768, 4096).pack().hex() == (
        "0000000000000000" "01" "01" "00000000" "20" "00040000" "00030000" "00100000")
    assert len(sv.PointerShape(0xFF, 1, 1, 1, 0, 0, b"").pack()) == 18
    assert sv.Dirt((Rect(1, 2, 3, 4),)).pack().hex() == "0001" "01000000" "02000000" "03000000" "04000000"


def test_the_edid_is_a_valid_block_naming_the_monitor() -> None:
    edid = sv.EDID
    assert len(edid) == 128 and sum(edid) % 256 == 0 and edid[:8] == bytes.fromhex("00ffffffffffff00")
    assert b"HyperVMonitor" in edid
    assert int.from_bytes(edid[54:56], "little") == 6500  # the preferred mode's 65 MHz pixel clock


@pytest.mark.parametrize(("wire", "needle"), [
    (sv.pack_message(99, b""), "type 99 is unknown"),
    (sv.pack_message(sv.MessageType.VRAM_LOCATION, bytes(16)), "VRAM_LOCATION body of 16 bytes, need 17"),
    (sv.pack_message(sv.MessageType.DIRT, bytes([0, 2]) + bytes(16)), "does not hold exactly its 2 rectangles"),
    (sv.pack_message(sv.MessageType.DIRT, bytes([0, 1]) + bytes(32)), "does not hold exactly its 1 rectangles"),
    (sv.pack_message(sv.MessageType.RESOLUTION_RESPONSE, bytes(128) + bytes([65, 0, 0])), "lists 65 modes"),
    (b"\x02\x00\x00\x00\x08\x00\x00\x00" + bytes(8), "pipe packet type 2 is not DATA"),
    (sv.pack_message(sv.MessageType.SITUATION_UPDATE, bytes(10)), "SITUATION_UPDATE body of 10 bytes"),
])
def test_malformed_messages_are_protocol_errors(wire: bytes, needle: str) -> None:
    with pytest.raises(DeviceProtocolError, match=needle):
        sv.decode(wire)


def test_a_dirt_of_more_than_255_rectangles_cannot_be_built() -> None:
    with pytest.raises(LocalProtocolError, match="at most 255"):
        sv.Dirt(tuple(Rect(0, 0, 1, 1) for _ in range(256))).pack()


# ---- the two state machines wired together -------------------------------------------------------------------


class Wire:
    """A SynthvidHost and a guest (VscHandshake, then SynthvidGuest) passing packets in memory."""

    def __init__(self, vram_size: int = sv.VRAM_SIZE, host: H.SynthvidHost | None = None,
                 vmbus_versions: tuple[int, ...] = sv.LINUX_VERSIONS, mode: tuple[int, int] | None = None) -> None:
        self.host = host or H.SynthvidHost()
        self.vram = bytearray(vram_size)
        self.host_events: list[H.Event] = []
        self.guest_events: list[G.Event] = []
        self.trace: list[str] = []
        hs = sv.VscHandshake(vmbus_versions)
        for out in hs.start():
            self._to_host(out.to_packet())
        while not hs.done:
            for pkt in self.host.data_to_send():
                self.trace.append("H>G " + sv.describe(pkt.payload))
                hs.receive(Incoming(pkt.type, pkt.trans_id, False, pkt.payload))
        assert hs.negotiated_version is not None
        self.guest = G.SynthvidGuest(hs.negotiated_version, GPA, self.vram, mode=mode)
        self.guest.start()
        self.pump()

    def _to_host(self, pkt: Packet) -> None:
        self.trace.append("G>H " + sv.describe(pkt.payload))
        for e in self.host.receive(pkt):
            self.host_events.append(e)
            if isinstance(e, H.VramRequested):
                self.host.map_vram(len(self.vram))

    def pump(self) -> None:
        while True:
            g, h = self.guest.data_to_send(), self.host.data_to_send()
            if not g and not h:
                return
            for pkt in g:
                self._to_host(pkt)
            for pkt in h:
                self.trace.append("H>G " + sv.describe(pkt.payload))
                self.guest_events += self.guest.receive(pkt)

    def dirty(self) -> list[H.Dirty]:
        return [e for e in self.host_events if isinstance(e, H.Dirty)]


def test_the_sequence_in_hyperv_fbs_order() -> None:
    w = Wire()
    names = [line.split("(")[0] for line in w.trace]
    assert names == [
        "G>H SYNTHVID_VERSION_REQUEST", "H>G SYNTHVID_VERSION_RESPONSE",
        "G>H SYNTHVID_RESOLUTION_REQUEST", "H>G SYNTHVID_RESOLUTION_RESPONSE",
        "G>H SYNTHVID_VRAM_LOCATION", "H>G SYNTHVID_VRAM_LOCATION_ACK",
        "G>H SYNTHVID_POINTER_POSITION", "G>H SYNTHVID_POINTER_SHAPE", "G>H SYNTHVID_SITUATION_UPDATE",
        "H>G SYNTHVID_SITUATION_UPDATE_ACK", "H>G SYNTHVID_FEATURE_CHANGE",
        # FEATURE_CHANGE turned features on: the guest brings the host up to date.
        "G>H SYNTHVID_POINTER_POSITION", "G>H SYNTHVID_POINTER_SHAPE", "G>H SYNTHVID_SITUATION_UPDATE",
        "H>G SYNTHVID_SITUATION_UPDATE_ACK",
    ], w.trace
    assert w.guest.ready and w.guest.dirt_enabled
    assert (w.guest.width, w.guest.height, w.guest.pitch) == (1024, 768, 4096)
    assert w.guest.modes == H.DEFAULT_RESOLUTIONS
    shape = next(e for e in w.host_events if isinstance(e, H.PointerShapeChanged))
    assert (shape.argb, shape.width, shape.height, shape.data) == (True, 1, 1, G.HIDDEN_POINTER)
    assert H.SituationChanged(True, 1024, 768, 4096) in w.host_events
    assert w.host.features_sent


def test_synthvid_3_2_skips_the_mode_list_and_takes_1152x864() -> None:
    w = Wire(vmbus_versions=(sv.Version.WIN8,))
    assert "RESOLUTION_REQUEST" not in "".join(w.trace)
    assert (w.guest.width, w.guest.height) == G.FALLBACK_MODE


def test_resolution_answers_follow_the_guests_maximum() -> None:
    host = H.SynthvidHost(default_index=2)
    w = Wire(host=host)
    assert (w.guest.width, w.guest.height) == (1600, 1200)
    assert host.receive(Packet(6, 0, 1, sv.encode(sv.ResolutionRequest(2)))) == []
    reply = sv.decode(host.data_to_send()[0].payload)
    assert isinstance(reply, sv.ResolutionResponse) and reply.resolutions == H.DEFAULT_RESOLUTIONS[:2]
    assert reply.default_index == 0  # the default is not among the two listed


def test_bios_info_and_capability_are_answered() -> None:
    w = Wire()
    for request, answer in ((sv.BiosInfoRequest(), sv.BiosInfoResponse(1)), (sv.CapabilityRequest(),
                                                                              sv.CapabilityResponse(0))):
        w.host.receive(Packet(6, 0, 1, sv.encode(request)))
        assert [sv.decode(p.payload) for p in w.host.data_to_send()] == [answer]


def test_dirt_carries_each_rectangles_pixels_row_by_row() -> None:
    w = Wire()
    pitch = w.guest.pitch
    for y in range(768):
        w.vram[y * pitch:(y + 1) * pitch] = bytes([y & 0xFF]) * pitch
    w.guest.add_damage([(2, 3, 4, 5), (100, 0, 1024, 2)])
    w.guest.flush(0.0)
    w.pump()
    (d,) = w.dirty()
    assert d.rects == (Rect(2, 3, 4, 5), Rect(100, 0, 1024, 2))
    assert bytes(d.pixels) == bytes([3]) * 8 + bytes([4]) * 8 + bytes([0]) * 924 * 4 + bytes([1]) * 924 * 4


def test_a_full_screen_is_cut_into_dirt_messages_that_fit_the_data_limit() -> None:
    w = Wire(mode=(1920, 1080))
    w.guest.add_damage([(0, 0, 1920, 1080)])
    w.guest.flush(0.0)
    w.pump()
    dirt = w.dirty()
    assert all(len(d.pixels) <= G.MAX_DIRT_DATA for d in dirt)
    assert sum(len(d.pixels) for d in dirt) == 1920 * 1080 * 4 and len(dirt) == 8


def test_damage_merges_and_dirt_is_throttled_to_one_per_period() -> None:
    w = Wire()
    g = w.guest
    g.add_damage([(0, 0, 10, 10), (5, 5, 20, 20), (100, 100, 110, 110), (2000, 0, 3000, 10)])
    assert g.damage == [Rect(0, 0, 20, 20), Rect(100, 100, 110, 110)], "overlaps merged, off-screen clipped away"
    assert g.get_timer() == float("-inf")
    g.handle_timer(10.0)
    w.pump()
    assert len(w.dirty()) == 1
    g.add_damage([(0, 0, 1, 1)])
    assert g.get_timer() == pytest.approx(10.0 + G.THROTTLE)
    g.handle_timer(10.01)
    assert not g.data_to_send(), "DIRT again within 50 ms"
    g.handle_timer(10.06)
    w.pump()
    assert len(w.dirty()) == 2
    for i in range(G.MAX_PENDING_RECTS + 1):
        g.add_damage([(i * 20, 300, i * 20 + 5, 305)])
    assert g.damage == [Rect(0, 300, G.MAX_PENDING_RECTS * 20 + 5, 305)], "too many rectangles: one box"


def test_no_dirt_until_the_host_asks_for_it() -> None:
    host = H.SynthvidHost()
    host.receive(Packet(6, 0, 1, sv.encode(sv.VersionRequest(sv.Version.WIN10))))
    host.data_to_send()
    g = G.SynthvidGuest(sv.Version.WIN10, GPA, bytearray(sv.VRAM_SIZE))
    g.start()
    for pkt in g.data_to_send():
        host.receive(pkt)
    g.receive(host.data_to_send()[0])  # the modes
    g.add_damage([(0, 0, 5, 5)])
    assert g.get_timer() is None
    g.flush(0.0)
    assert all(sv.decode(p.payload).__class__ is not sv.Dirt for p in g.data_to_send())


def test_a_new_mode_resizes_and_damages_the_whole_screen() -> None:
    w = Wire()
    w.guest.set_mode(800, 600)
    w.guest.flush(0.0)
    w.pump()
    assert H.SituationChanged(True, 800, 600, 3200) in w.host_events
    bands = [r for d in w.dirty() for r in d.rects]  # cut into bands of at most 1 MiB of pixels
    assert bands[0] == Rect(0, 0, 800, 327) and bands[-1] == Rect(0, 327, 800, 600)
    with pytest.raises(ValueError, match="does not fit"):
        w.guest.set_mode(2560, 1600)
    with pytest.raises(ValueError, match="smaller than 640x480"):
        w.guest.set_mode(320, 200)


def test_a_real_pointer_shape_travels_in_8_kib_parts() -> None:
    w = Wire()
    argb = bytes(range(256)) * (64 * 64 * 4 // 256)
    w.guest.set_pointer_shape(64, 64, 3, 4, argb)
    w.guest.set_pointer(50, 60)
    w.pump()
    parts = [line for line in w.trace if "POINTER_SHAPE" in line][-2:]
    assert "part=0x0" in parts[0] and "part=0xff" in parts[1], parts
    assert H.PointerShapeChanged(True, 64, 64, 3, 4, argb) in w.host_events
    assert w.host_events[-1] == H.PointerMoved(True, 50, 60)


# ---- the host refuses what breaks the protocol -------------------------------------------------------------


def _send(w: Wire, msg: sv.Message | bytes, data: bytes = b"") -> None:
    payload = msg if isinstance(msg, bytes) else sv.encode(msg, guest=True)
    w.host.receive(Packet(PacketType.DATA_INBAND, 0, 99, payload, data=data))


ERRORS: list[tuple[str, Callable[[Wire], None], str]] = [
    ("dirt-outside", lambda w: _send(w, sv.Dirt((Rect(1020, 0, 1030, 1),)), bytes(40)), "outside the 1024x768"),
    ("dirt-negative", lambda w: _send(w, sv.Dirt((Rect(-1, 0, 3, 1),)), bytes(16)), "outside"),
    ("dirt-x2-le-x1", lambda w: _send(w, sv.Dirt((Rect(5, 0, 5, 1),))), "is empty"),
    ("dirt-y2-le-y1", lambda w: _send(w, sv.Dirt((Rect(0, 9, 5, 3),))), "is empty"),
    ("dirt-256", lambda w: _send(w, sv.pack_message(10, bytes([0, 255]) + bytes(256 * 16))), "exactly its 255"),
    ("dirt-short-pixels", lambda w: _send(w, sv.Dirt((Rect(0, 0, 2, 2),)), bytes(15)), "came with 15 bytes"),
    ("dirt-no-pixels", lambda w: _send(w, sv.Dirt((Rect(0, 0, 2, 2),))), "came with 0 bytes"),
    ("dirt-output-1", lambda w: _send(w, sv.Dirt((), video_output=1)), "video output 1"),
    ("depth-24", lambda w: _send(w, sv.SituationUpdate(0, 1, 1024, 768, 4096, depth_bits=24)), "depth of 24"),
    ("offset", lambda w: _send(w, sv.SituationUpdate(0, 1, 1024, 768, 4096, vram_offset=4096)), "vram_offset"),
    ("beyond-vram", lambda w: _send(w, sv.SituationUpdate(0, 1, 1920, 1200, 1920 * 4)), "the VRAM has"),
    ("short-pitch", lambda w: _send(w, sv.SituationUpdate(0, 1, 1024, 768, 1024)), "pitch shorter"),
    ("two-outputs", lambda w: _send(w, sv.SituationUpdate(0, 1, 1024, 768, 4096, video_output_count=2)), "2 outputs"),
    ("second-version", lambda w: _send(w, sv.VersionRequest(sv.Version.WIN10)), "second synthvid VERSION_REQUEST"),
    ("unknown", lambda w: _send(w, sv.pack_message(42, b"")), "type 42 is unknown"),
    ("host-message", lambda w: _send(w, sv.FeatureChange(1)), "is a host message"),
    ("data-on-pointer", lambda w: _send(w, sv.PointerPosition(1, 0, 0), b"xx"), "came with 2 bytes of data"),
    ("big-pointer", lambda w: _send(w, sv.PointerShape(0xFF, 1, 97, 1, 0, 0, b"")), "97x1"),
    ("hot-spot", lambda w: _send(w, sv.PointerShape(0xFF, 1, 2, 2, 2, 0, bytes(16))), "hot spot"),
    ("short-shape", lambda w: _send(w, sv.PointerShape(0xFF, 1, 2, 2, 0, 0, bytes(15))), "needs 16 bytes"),
    ("shape-part-order", lambda w: _send(w, sv.PointerShape(3, 1, 2, 2, 0, 0, bytes(4))), "part 3 after 0"),
    ("no-gpa", lambda w: _send(w, sv.VramLocation(0, 0, 0)), "without a GPA"),
    ("gpa-unaligned", lambda w: _send(w, sv.VramLocation(1, 1, GPA + 8)), "not page-aligned"),
    ("completion", lambda w: w.host.receive(Packet(PacketType.COMP, 0, 1, b"")), "packet type 0xb"),
]


@pytest.mark.parametrize(("case", "act", "needle"), ERRORS, ids=[e[0] for e in ERRORS])
def test_the_host_refuses_broken_input(case: str, act: Callable[[Wire], None], needle: str) -> None:
    w = Wire()
    with pytest.raises(DeviceProtocolError, match=needle):
        act(w)


def test_vram_beyond_the_offer_and_dirt_without_vram_or_screen() -> None:
    host = H.SynthvidHost()
    host.receive(Packet(6, 0, 1, sv.encode(sv.VersionRequest(sv.Version.WIN10))))
    with pytest.raises(DeviceProtocolError, match="DIRT before the guest set its screen"):
        host.receive(Packet(6, 0, 2, sv.encode(sv.Dirt(()))))
    with pytest.raises(DeviceProtocolError, match="before the VRAM_LOCATION was acknowledged"):
        host.receive(Packet(6, 0, 2, sv.encode(sv.SituationUpdate(0, 1, 1024, 768, 4096))))
    assert host.receive(Packet(6, 0, 3, sv.encode(sv.VramLocation(GPA, 1, GPA)))) == [H.VramRequested(GPA, GPA)]
    with pytest.raises(DeviceProtocolError, match="bigger than the offer's 8388608"):
        host.map_vram(sv.VRAM_SIZE + 4096)
    w = Wire()
    w.host.unmap_vram()
    with pytest.raises(DeviceProtocolError, match="no VRAM is mapped"):
        _send(w, sv.Dirt((Rect(0, 0, 1, 1),)), bytes(4))


def test_the_guest_refuses_a_wrong_vram_ack_and_guest_messages() -> None:
    g = G.SynthvidGuest(sv.Version.WIN8, GPA, bytearray(sv.VRAM_SIZE))
    g.start()
    with pytest.raises(DeviceProtocolError, match="echoes 0x5, not the GPA"):
        g.receive(Packet(6, 0, 0, sv.encode(sv.VramLocationAck(5))))
    with pytest.raises(DeviceProtocolError, match="while waiting for VramLocationAck"):
        g.receive(Packet(6, 0, 0, sv.encode(sv.SituationUpdateAck(0))))
    g.receive(Packet(6, 0, 0, sv.encode(sv.VramLocationAck(GPA))))
    with pytest.raises(DeviceProtocolError, match="is a guest message"):
        g.receive(Packet(6, 0, 0, sv.encode(sv.Dirt(()))))
    with pytest.raises(DeviceProtocolError, match="a VRAM of 4096 bytes holds no usable mode"):
        G.SynthvidGuest(sv.Version.WIN8, GPA, bytearray(4096)).start()
