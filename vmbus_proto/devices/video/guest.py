"""The framebuffer VSC's side of one synthvid channel after the version handshake, sans-IO.

Mirrors Linux drivers/video/fbdev/hyperv_fb.c: ``synthvid_connect_vsp`` (RESOLUTION_REQUEST for up to 64 modes
from 3.5 on, the default mode taken, 1152x864 when the list is empty or its index invalid), ``hvfb_getmem``
and ``synthvid_send_config`` (VRAM_LOCATION with the GPA as ``user_ctx``, the ACK's echo checked, then
POINTER_POSITION, the hidden 1x1 ARGB POINTER_SHAPE and SITUATION_UPDATE), ``synthvid_recv_sub`` (FEATURE_CHANGE
turns DIRT on or off; the pointer and the situation are sent again so the host is up to date),
``hvfb_set_par`` (a new mode re-sends SITUATION_UPDATE) and ``hvfb_update_work`` (damage is merged and sent
at most once per throttle period, 50 ms = HZ/20, and only while the host wants DIRT).

The VRAM is guest memory shared by GPADL; this machine reads it (``vram``, a buffer of its bytes) to attach
each dirty rectangle's pixels to its DIRT, as the stream carries them (docs/protocol.md §10.3). Time is
passed in: ``get_timer()`` says when ``handle_timer(now)`` wants to run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ...errors import DeviceProtocolError
from ...packets import Buffer, Packet, PacketType
from . import synthvid as sv
from .synthvid import Rect

MIN_WIDTH, MIN_HEIGHT = 640, 480  # HVFB_WIDTH_MIN, HVFB_HEIGHT_MIN
FALLBACK_MODE = (1152, 864)  # hyperv_fb's WIN8 default and its fallback for an unusable mode list
THROTTLE = 0.05  # hvfb_update_work runs at most every HZ/20
MAX_DIRT_DATA = 1 << 20  # pixels riding with one DIRT: fits the smallest data window a parent may announce
MAX_PENDING_RECTS = 32  # more separate damage rectangles than this merge into their bounding box
HIDDEN_POINTER = bytes([0, 1, 1, 1])  # hyperv_fb synthvid_send_ptr: a 1x1 ARGB pointer with alpha 1


@dataclass(frozen=True, slots=True)
class ModesOffered:
    """RESOLUTION_RESPONSE: the host's modes, its default, and its EDID."""

    modes: tuple[tuple[int, int], ...]
    default_index: int
    edid: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """The VRAM is acknowledged and the screen set: drawing into the VRAM shows."""

    width: int
    height: int
    pitch: int


@dataclass(frozen=True, slots=True)
class DirtChanged:
    """FEATURE_CHANGE: whether the host wants DIRT now."""

    enabled: bool


@dataclass(frozen=True, slots=True)
class BiosInfo:
    """BIOS_INFO_RESPONSE: the answer to ``query_bios_info`` (the host handled everything sent before it)."""

    stop_device_supported: bool


Event = ModesOffered | Ready | DirtChanged | BiosInfo


def _overlap_or_touch(a: Rect, b: Rect) -> bool:
    return a.x1 <= b.x2 and b.x1 <= a.x2 and a.y1 <= b.y2 and b.y1 <= a.y2


def _union(a: Rect, b: Rect) -> Rect:
    return Rect(min(a.x1, b.x1), min(a.y1, b.y1), max(a.x2, b.x2), max(a.y2, b.y2))


def merge_rects(rects: list[Rect], new: Rect, limit: int = MAX_PENDING_RECTS) -> list[Rect]:
    """``rects`` with ``new`` added: rectangles that overlap or touch become their union; past ``limit``
    rectangles, all of them become one bounding box (what hvfb keeps: one rectangle)."""
    while True:
        for i, r in enumerate(rects):
            if _overlap_or_touch(r, new):
                new = _union(r, new)
                del rects[i]
                break
        else:
            break
    rects.append(new)
    if len(rects) > limit:
        box = rects[0]
        for r in rects[1:]:
            box = _union(box, r)
        rects[:] = [box]
    return rects


class SynthvidGuest:
    """One framebuffer channel, guest side, from the accepted version on."""

    def __init__(self, version: int, vram_gpa: int, vram: Buffer, *, mode: tuple[int, int] | None = None,
                 throttle: float = THROTTLE, max_dirt_data: int = MAX_DIRT_DATA, first_trans_id: int = 1,
                 in_memory: bool = False) -> None:
        """``in_memory``: the host maps the VRAM (shared memory), so a DIRT names rectangles without pixels."""
        self.version = version
        self.in_memory = in_memory
        self.vram_gpa = vram_gpa
        self.vram = memoryview(vram).cast("B")
        self.vram_size = len(self.vram)
        self.wanted_mode = mode
        self.throttle = throttle
        self.max_dirt_data = max_dirt_data
        self._trans_id = first_trans_id
        self.modes: tuple[tuple[int, int], ...] = ()
        self.width = self.height = self.pitch = 0
        self.ready = False
        self.dirt_enabled = False
        self.pointer = sv.PointerPosition(1, 0, 0)
        self.shape: list[sv.PointerShape] = self._shape_parts(True, 1, 1, 0, 0, HIDDEN_POINTER)
        self.damage: list[Rect] = []
        self.last_flush = float("-inf")
        self._waiting: type | None = None
        self._out: list[Packet] = []
        self.dirt_sent = 0

    # ---- output --------------------------------------------------------------------------------------------

    def data_to_send(self) -> list[Packet]:
        out, self._out = self._out, []
        return out

    def _send(self, msg: sv.Message, data: Buffer = b"") -> None:
        trans_id, self._trans_id = self._trans_id, self._trans_id + 1
        self._out.append(Packet(PacketType.DATA_INBAND, 0, trans_id, sv.encode(msg, guest=True), data=data))

    # ---- the sequence --------------------------------------------------------------------------------------

    def start(self) -> None:
        """After VERSION_RESPONSE: the modes first from 3.5 on, else the VRAM."""
        if self.version >= sv.Version.WIN10:
            self._waiting = sv.ResolutionResponse
            self._send(sv.ResolutionRequest(sv.MAX_RESOLUTIONS))
        else:
            self._choose_mode(FALLBACK_MODE)
            self._send_vram()

    def _send_vram(self) -> None:
        self._waiting = sv.VramLocationAck
        self._send(sv.VramLocation(self.vram_gpa, 1, self.vram_gpa))

    def _fits(self, w: int, h: int) -> bool:
        return w >= MIN_WIDTH and h >= MIN_HEIGHT and w * h * 4 <= self.vram_size

    def _choose_mode(self, default: tuple[int, int]) -> None:
        wanted = (self.wanted_mode,) if self.wanted_mode is not None else ()
        for w, h in (*wanted, default, FALLBACK_MODE, (MIN_WIDTH, MIN_HEIGHT)):
            if self._fits(w, h):
                self.width, self.height, self.pitch = w, h, w * 4
                return
        raise DeviceProtocolError(f"a VRAM of {self.vram_size} bytes holds no usable mode")

    def receive(self, packet: Packet) -> list[Event]:
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"synthvid VSC got packet type {packet.type:#x}")
        msg = sv.decode(packet.payload)
        if self._waiting is not None and not isinstance(msg, (self._waiting, sv.FeatureChange)):
            raise DeviceProtocolError(f"synthvid {type(msg).__name__} while waiting for {self._waiting.__name__}")
        match msg:
            case sv.ResolutionResponse():
                self.modes = msg.resolutions
                ok = msg.resolutions and msg.default_index < len(msg.resolutions)
                self._choose_mode(msg.resolutions[msg.default_index] if ok else FALLBACK_MODE)
                self._send_vram()
                return [ModesOffered(msg.resolutions, msg.default_index, msg.edid)]
            case sv.VramLocationAck(user_ctx=ctx):
                if ctx != self.vram_gpa:
                    raise DeviceProtocolError(f"VRAM_LOCATION_ACK echoes {ctx:#x}, not the GPA {self.vram_gpa:#x}")
                self._waiting = None
                self.ready = True
                self._send_pointer()
                self._send_situation()
                return [Ready(self.width, self.height, self.pitch)]
            case sv.FeatureChange():
                self.dirt_enabled = bool(msg.is_dirt_needed)
                if self.ready:  # bring the host up to date (the protocol's rule for a feature turned on)
                    self._send_pointer()
                    self._send_situation()
                return [DirtChanged(self.dirt_enabled)]
            case sv.BiosInfoResponse(stop_device_supported=stop):
                return [BiosInfo(bool(stop))]
            case sv.SituationUpdateAck() | sv.CapabilityResponse():
                return []
        raise DeviceProtocolError(f"synthvid {type(msg).__name__} is a guest message; a host does not send it")

    # ---- what the guest's console does ---------------------------------------------------------------------

    def _send_pointer(self) -> None:
        self._send(self.pointer)
        for part in self.shape:
            self._send(part)

    def _send_situation(self) -> None:
        self._send(sv.SituationUpdate(0, 1, self.width, self.height, self.pitch))

    def set_mode(self, width: int, height: int) -> None:
        """hvfb_set_par: a new screen size (pitch width*4), sent at once; the whole screen is damaged."""
        if not self.ready:
            raise DeviceProtocolError("the screen is not set up yet")
        if not self._fits(width, height):
            raise ValueError(f"{width}x{height} is smaller than {MIN_WIDTH}x{MIN_HEIGHT} or does not fit the "
                             f"{self.vram_size}-byte VRAM")
        self.width, self.height, self.pitch = width, height, width * 4
        self.damage = []
        self._send_situation()
        self.add_damage([Rect(0, 0, width, height)])

    def query_bios_info(self) -> None:
        """BIOS_INFO_REQUEST (as Windows' driver sends it from 3.3 on); its answer comes after the host has
        handled everything this guest sent before it."""
        self._send(sv.BiosInfoRequest())

    def set_pointer(self, x: int, y: int, visible: bool = True) -> None:
        self.pointer = sv.PointerPosition(int(visible), x, y)
        if self.ready:
            self._send(self.pointer)

    def set_pointer_shape(self, width: int, height: int, hot_x: int, hot_y: int, argb: bytes) -> None:
        """A 32-bit ARGB pointer image (little-endian B, G, R, A), split in 8 KiB parts as Windows sends it."""
        if not (0 < width <= sv.CURSOR_MAX_XY and 0 < height <= sv.CURSOR_MAX_XY) or len(argb) != width * height * 4:
            raise ValueError(f"a pointer is 1..{sv.CURSOR_MAX_XY} pixels each way with w*h*4 bytes of ARGB")
        if not (0 <= hot_x < width and 0 <= hot_y < height):
            raise ValueError("the hot spot is inside the pointer image")
        self.shape = self._shape_parts(True, width, height, hot_x, hot_y, argb)
        if self.ready:
            for part in self.shape:
                self._send(part)

    @staticmethod
    def _shape_parts(argb: bool, w: int, h: int, hx: int, hy: int, data: bytes) -> list[sv.PointerShape]:
        step = sv.CURSOR_MAX_PAYLOAD
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        return [sv.PointerShape(sv.CURSOR_COMPLETE if i == len(chunks) - 1 else i, int(argb), w, h, hx, hy, c)
                for i, c in enumerate(chunks)]

    # ---- damage and DIRT -----------------------------------------------------------------------------------

    def add_damage(self, rects: Iterable[Rect | Sequence[int]]) -> None:
        """Rectangles (x1, y1, x2, y2; x2 and y2 exclusive) the guest drew into, clipped to the screen."""
        w, h = self.width, self.height
        for r in rects:
            x1, y1, x2, y2 = max(0, r[0]), max(0, r[1]), min(w, r[2]), min(h, r[3])
            if x1 < x2 and y1 < y2:
                merge_rects(self.damage, Rect(x1, y1, x2, y2))

    def get_timer(self) -> float | None:
        """When ``handle_timer`` next has DIRT to send, or None."""
        if not (self.damage and self.dirt_enabled and self.ready):
            return None
        return self.last_flush + self.throttle

    def handle_timer(self, now: float) -> None:
        when = self.get_timer()
        if when is not None and now >= when:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Send the merged damage now as DIRT (with its pixels), whatever the throttle; nothing while the
        host has not asked for DIRT."""
        if not (self.damage and self.dirt_enabled and self.ready):
            return
        rects, self.damage = self.damage, []
        self.last_flush = now
        batch: list[Rect] = []
        size = 0
        for rect in self._bands(rects):
            n = rect.width * rect.height * 4
            if batch and (len(batch) == sv.MAX_DIRT_RECTS or size + n > self.max_dirt_data):
                self._send_dirt(batch)
                batch, size = [], 0
            batch.append(rect)
            size += n
        if batch:
            self._send_dirt(batch)

    def _bands(self, rects: list[Rect]) -> Iterable[Rect]:
        """Each rectangle, cut into bands of rows whose pixels fit one DIRT's data."""
        for r in rects:
            rows = max(1, self.max_dirt_data // (r.width * 4))
            for y in range(r.y1, r.y2, rows):
                yield Rect(r.x1, y, r.x2, min(r.y2, y + rows))

    def pixels(self, rects: Sequence[Rect]) -> bytes:
        """The VRAM bytes of ``rects``, row by row, rectangle after rectangle (what rides with their DIRT)."""
        vram, pitch = self.vram, self.pitch
        parts: list[Buffer] = []
        for x1, y1, x2, y2 in rects:
            if x1 == 0 and x2 * 4 == pitch:
                parts.append(vram[y1 * pitch:y2 * pitch])  # whole rows are contiguous
            else:
                a, b = x1 * 4, x2 * 4
                parts += [vram[y * pitch + a:y * pitch + b] for y in range(y1, y2)]
        return b"".join(parts)

    def _send_dirt(self, rects: list[Rect]) -> None:
        self.dirt_sent += 1
        self._send(sv.Dirt(tuple(rects)), b"" if self.in_memory else self.pixels(rects))
