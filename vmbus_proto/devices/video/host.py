"""The video VSP's side of one synthvid channel, sans-IO: the version, the modes, the VRAM, the screen layout,
the pointer and the dirty rectangles with their pixels.

Mirrors OpenVMM vm/devices/uidevices/src/video/mod.rs ``process_channel`` (VERSION_REQUEST, then the
VRAM_LOCATION ACK, SITUATION_UPDATE and its ACK, RESOLUTION_REQUEST answered with a non-empty list when the
guest asks for up to 64 modes, BIOS_INFO and CAPABILITY answered, a second VERSION_REQUEST while active an
error) and what Linux drivers/video/fbdev/hyperv_fb.c waits for (``synthvid_connect_vsp``,
``synthvid_send_config``, ``synthvid_recv_sub``). Unlike OpenVMM, and as Hyper-V does, the host sends
FEATURE_CHANGE ``is_dirt_needed = 1`` once the guest has set its screen, so the guest reports what it draws.

Over a stream the VRAM's bytes are not shared: each DIRT carries the pixels of its rectangles as the packet's
trailing data, row by row, rectangle after rectangle, 4 bytes a pixel (docs/protocol.md §10.3). A
rectangle outside the screen, an empty or inverted one, pixel data of the wrong size, a screen bigger than the
VRAM or not 32 bpp, a VRAM bigger than the offer's 8 MiB, and an unknown message are DeviceProtocolErrors.

Inputs: ``receive(packet)`` returns events; ``map_vram(size)`` / ``unmap_vram()`` after a
``VramRequested`` event (the device looks the GPA up among the channel's GPADLs). Output: ``data_to_send()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import DeviceProtocolError
from ...packets import Buffer, Packet, PacketType
from ..base import Incoming
from . import synthvid as sv
from .synthvid import Rect

DEFAULT_RESOLUTIONS: tuple[tuple[int, int], ...] = ((1024, 768), (1280, 1024), (1600, 1200), (1920, 1080))
MAX_POINTER_BYTES = sv.CURSOR_MAX_XY * sv.CURSOR_MAX_XY * 4


# ---- events ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionAccepted:
    version: int


@dataclass(frozen=True, slots=True)
class VramRequested:
    """VRAM_LOCATION: back ``gpa`` with the framebuffer, then call ``map_vram`` (which sends the ACK)."""

    gpa: int
    user_ctx: int


@dataclass(frozen=True, slots=True)
class SituationChanged:
    """The guest's screen: ``active`` 0 blanks it; XRGB8888, ``pitch`` bytes a row, at VRAM offset 0."""

    active: bool
    width: int
    height: int
    pitch: int


@dataclass(frozen=True, slots=True)
class PointerMoved:
    visible: bool
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class PointerShapeChanged:
    """A whole pointer shape (its parts assembled): ``argb`` w*h*4 bytes, or a monochrome AND+XOR mask."""

    argb: bool
    width: int
    height: int
    hot_x: int
    hot_y: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Dirty:
    """DIRT: these rectangles changed; ``pixels`` are theirs, row by row, rectangle after rectangle."""

    rects: tuple[Rect, ...]
    pixels: Buffer


Event = VersionAccepted | VramRequested | SituationChanged | PointerMoved | PointerShapeChanged | Dirty


def pixel_bytes(rects: Sequence[Rect]) -> int:
    """The bytes of pixel data that travel with a DIRT of ``rects``."""
    return sum((r.x2 - r.x1) * (r.y2 - r.y1) for r in rects) * 4


class SynthvidHost:
    """One channel's synthvid state, host side."""

    def __init__(self, resolutions: Sequence[tuple[int, int]] = DEFAULT_RESOLUTIONS, default_index: int = 0,
                 supported: frozenset[int] = sv.DEFAULT_SUPPORTED, vram_limit: int = sv.VRAM_SIZE,
                 edid: bytes = sv.EDID, in_memory: bool = False) -> None:
        """``in_memory``: the host maps the VRAM (shared memory), so DIRT carries no pixels."""
        if not resolutions or not 0 <= default_index < len(resolutions):
            raise ValueError("a non-empty resolution list and a default index inside it")
        self.resolutions = tuple(resolutions)
        self.default_index = default_index
        self.vram_limit = vram_limit
        self.edid = edid
        self._version = sv.VspHandshake(supported)
        self.vram_size = 0  # 0: no VRAM mapped
        self._vram_ctx: int | None = None  # a VRAM_LOCATION waiting for map_vram
        self.situation: SituationChanged | None = None
        self.features_sent = False
        self._shape_parts: list[bytes] = []
        self._out: list[Packet] = []
        self.dirt_messages = 0
        self.dirt_rects = 0
        self.in_memory = in_memory

    @property
    def version(self) -> int | None:
        return self._version.negotiated_version

    def data_to_send(self) -> list[Packet]:
        out, self._out = self._out, []
        return out

    def _send(self, msg: sv.Message) -> None:
        self._out.append(Packet(PacketType.DATA_INBAND, 0, 0, sv.encode(msg)))

    # ---- the device's answers ---------------------------------------------------------------------------

    def map_vram(self, size: int) -> None:
        """The GPA of the pending VRAM_LOCATION is backed by ``size`` bytes of guest memory: ACK it."""
        if self._vram_ctx is None:
            raise DeviceProtocolError("no VRAM_LOCATION is waiting for its VRAM")
        if size > self.vram_limit:
            raise DeviceProtocolError(f"VRAM of {size} bytes is bigger than the offer's {self.vram_limit} bytes")
        ctx, self._vram_ctx = self._vram_ctx, None
        self.vram_size = size
        self._send(sv.VramLocationAck(ctx))

    def unmap_vram(self) -> None:
        """The VRAM's guest memory is gone (its GPADL was torn down): the last picture stays, DIRT cannot."""
        self.vram_size = 0

    # ---- the guest's messages ---------------------------------------------------------------------------

    def receive(self, packet: Packet | Incoming) -> list[Event]:
        if packet.type != PacketType.DATA_INBAND:
            raise DeviceProtocolError(f"synthvid VSP got packet type {packet.type:#x}")
        if not self._version.done:
            self._out += [o.to_packet() for o in self._version.receive(
                packet if isinstance(packet, Incoming) else Incoming(packet.type, packet.trans_id,
                                                                     packet.completion_requested, packet.payload))]
            version = self._version.negotiated_version
            return [VersionAccepted(version)] if version is not None else []
        msg = sv.decode(packet.payload)
        data = packet.data if isinstance(packet, Packet) else b""
        if not isinstance(msg, sv.Dirt) and data:
            raise DeviceProtocolError(f"synthvid {type(msg).__name__} came with {len(data)} bytes of data")
        match msg:
            case sv.Dirt():
                return [self._dirt(msg, data)]
            case sv.PointerPosition():
                return [PointerMoved(bool(msg.is_visible), msg.x, msg.y)]
            case sv.PointerShape():
                return self._pointer_shape(msg)
            case sv.SituationUpdate():
                return [self._situation(msg)]
            case sv.VramLocation():
                return [self._vram_location(msg)]
            case sv.ResolutionRequest(maximum_resolution_count=count):
                modes = self.resolutions[:min(count, sv.MAX_RESOLUTIONS)]
                default = self.default_index if self.default_index < len(modes) else 0
                self._send(sv.ResolutionResponse(self.edid, modes, default if modes else 0))
                return []
            case sv.BiosInfoRequest():
                self._send(sv.BiosInfoResponse())
                return []
            case sv.CapabilityRequest():
                self._send(sv.CapabilityResponse())
                return []
            case sv.VersionRequest():
                raise DeviceProtocolError("second synthvid VERSION_REQUEST after the version was accepted")
        raise DeviceProtocolError(f"synthvid {type(msg).__name__} is a host message; a guest does not send it")

    def _vram_location(self, msg: sv.VramLocation) -> VramRequested:
        if not msg.is_vram_gpa_specified:
            raise DeviceProtocolError("VRAM_LOCATION without a GPA: this host has no default VRAM, the guest "
                                      "names its own (as Linux does)")
        if msg.vram_gpa % 4096:
            raise DeviceProtocolError(f"VRAM GPA {msg.vram_gpa:#x} is not page-aligned")
        self.vram_size = 0  # the old VRAM is unmapped before the new one is (OpenVMM)
        self._vram_ctx = msg.user_ctx
        return VramRequested(msg.vram_gpa, msg.user_ctx)

    def _situation(self, msg: sv.SituationUpdate) -> SituationChanged:
        if msg.video_output_count != 1:
            raise DeviceProtocolError(f"SITUATION_UPDATE for {msg.video_output_count} outputs; the host has 1")
        if msg.active:
            if msg.depth_bits != 32:
                raise DeviceProtocolError(f"SITUATION_UPDATE depth of {msg.depth_bits} bits; only 32 is supported")
            if msg.vram_offset != 0:
                raise DeviceProtocolError(f"SITUATION_UPDATE vram_offset {msg.vram_offset}; it must be 0")
            if not (msg.width and msg.height) or msg.pitch < msg.width * 4:
                raise DeviceProtocolError(f"SITUATION_UPDATE {msg.width}x{msg.height} with pitch {msg.pitch}: "
                                          f"an empty screen or a pitch shorter than width*4")
            if not self.vram_size:
                raise DeviceProtocolError("SITUATION_UPDATE before the VRAM_LOCATION was acknowledged")
            if msg.pitch * msg.height > self.vram_size:
                raise DeviceProtocolError(f"SITUATION_UPDATE {msg.width}x{msg.height} pitch {msg.pitch} needs "
                                          f"{msg.pitch * msg.height} bytes; the VRAM has {self.vram_size}")
        situation = SituationChanged(bool(msg.active), msg.width, msg.height, msg.pitch)
        if msg.active:
            self.situation = situation
        self._send(sv.SituationUpdateAck(msg.user_ctx))
        if msg.active and not self.features_sent:  # Hyper-V asks for dirty rectangles once there is a screen
            self.features_sent = True
            self._send(sv.FeatureChange(is_dirt_needed=1, is_ptr_pos_needed=1, is_ptr_shape_needed=1,
                                        is_situ_needed=1))
        return situation

    def _pointer_shape(self, msg: sv.PointerShape) -> list[Event]:
        if not msg.width or not msg.height or msg.width > sv.CURSOR_MAX_XY or msg.height > sv.CURSOR_MAX_XY:
            raise DeviceProtocolError(f"POINTER_SHAPE of {msg.width}x{msg.height}; 1..{sv.CURSOR_MAX_XY} each way")
        if msg.hot_x >= msg.width or msg.hot_y >= msg.height:
            raise DeviceProtocolError(f"POINTER_SHAPE hot spot ({msg.hot_x},{msg.hot_y}) outside its "
                                      f"{msg.width}x{msg.height} image")
        if len(msg.data) > sv.CURSOR_MAX_PAYLOAD:
            raise DeviceProtocolError(f"POINTER_SHAPE part of {len(msg.data)} bytes; at most {sv.CURSOR_MAX_PAYLOAD}")
        if msg.part_idx != sv.CURSOR_COMPLETE:
            if msg.part_idx != len(self._shape_parts):
                raise DeviceProtocolError(f"POINTER_SHAPE part {msg.part_idx} after {len(self._shape_parts)} parts")
            self._shape_parts.append(msg.data)
            return []
        data = b"".join(self._shape_parts) + msg.data
        self._shape_parts = []
        if len(data) < msg.shape_bytes:
            raise DeviceProtocolError(f"POINTER_SHAPE {msg.width}x{msg.height} {'ARGB' if msg.is_argb else 'mono'} "
                                      f"needs {msg.shape_bytes} bytes, got {len(data)}")
        return [PointerShapeChanged(bool(msg.is_argb), msg.width, msg.height, msg.hot_x, msg.hot_y,
                                    data[:msg.shape_bytes])]

    def _dirt(self, msg: sv.Dirt, data: Buffer) -> Dirty:
        situation = self.situation
        if situation is None:
            raise DeviceProtocolError("DIRT before the guest set its screen with SITUATION_UPDATE")
        if not self.vram_size:
            raise DeviceProtocolError("DIRT while no VRAM is mapped (its GPADL was torn down)")
        if msg.video_output != 0:
            raise DeviceProtocolError(f"DIRT for video output {msg.video_output}; the host has output 0 only")
        w, h = situation.width, situation.height
        total = 0
        for r in msg.rects:
            x1, y1, x2, y2 = r
            if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                raise DeviceProtocolError(f"DIRT rectangle {tuple(r)} is empty or outside the {w}x{h} screen")
            total += (x2 - x1) * (y2 - y1)
        if len(data) != total * 4 and not (self.in_memory and not data):
            raise DeviceProtocolError(f"DIRT of {len(msg.rects)} rectangles came with {len(data)} bytes of pixels; "
                                      f"they hold {total * 4}")
        self.dirt_messages += 1
        self.dirt_rects += len(msg.rects)
        return Dirty(msg.rects, data)
