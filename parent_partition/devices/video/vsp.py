"""The synthetic video VSP: the host half of Hyper-V's framebuffer device, one screen per partition.

Mirrors OpenVMM vm/devices/uidevices/src/video/mod.rs (``process_channel``: the VRAM mapped at the GPA the
guest names, the situation kept, DIRT forwarded to the console) with the synthvid state machine of
``vmbus_proto.devices.video.host``. The VRAM is guest memory the guest shared by GPADL; VRAM_LOCATION names its
GPA, which this device finds among the channel's GPADLs and holds until the channel closes or the guest tears
the GPADL down (then the last picture stays and DIRT is refused). Over a stream the pixels of each dirty
rectangle ride with its DIRT (docs/protocol.md §10.3) into the partition's :class:`~.screen.Screen`.

Consoles find screens in ``VideoVsp.screens`` by partition name (``ParentDaemon.device("video")``).
"""

from __future__ import annotations

from vmbus_proto.aio.channel import Channel
from vmbus_proto.devices.base import HandshakeTrace
from vmbus_proto.devices.video import host as vhost
from vmbus_proto.devices.video import synthvid
from vmbus_proto.devices.video.synthvid import Rect
from vmbus_proto.errors import DeviceProtocolError

from ...memory import GpadlBuffer, GpadlHold, MappedMemory
from ...vsp import ChannelResources, HostContext, Vsp
from .screen import Screen
from .settings import VideoSettings


class VideoVsp(Vsp):
    spec = synthvid.SPEC
    module = synthvid
    Settings = VideoSettings

    def __init__(self, settings: VideoSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or VideoSettings()
        self.default_index = self.settings.default_index()
        self.screens: dict[str, Screen] = {}  # by partition, while its video channel is open
        self.hosts: dict[str, vhost.SynthvidHost] = {}  # by partition: the protocol state and its counters
        self.handshakes = 0

    @classmethod
    def create(cls, settings: VideoSettings, host: HostContext) -> VideoVsp:
        return cls(settings)

    @classmethod
    def check(cls, settings: VideoSettings, host: HostContext) -> None:
        settings.default_index()

    async def serve(self, channel: Channel, res: ChannelResources) -> None:
        if res.sub_channel_index:
            raise DeviceProtocolError("the video VSP offers no sub-channels")
        host = vhost.SynthvidHost(self.settings.resolutions, self.default_index, in_memory=channel.shared)
        screen = Screen(res.partition)
        self.screens[res.partition] = screen
        self.hosts[res.partition] = host
        vram = _Vram(res, host, screen)
        trace = HandshakeTrace(synthvid.describe) if res.trace else None
        try:
            while True:
                pkt = await channel.recv()
                if trace is not None and synthvid.traced(pkt.payload):
                    res.log.info(trace.line("G>H", pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload))
                for event in host.receive(pkt):
                    self._event(event, res, screen, vram)
                for out in host.data_to_send():
                    if trace is not None and synthvid.traced(out.payload):
                        res.log.info(trace.line("H>G", out.type, out.trans_id, out.completion_requested, out.payload))
                    if not channel.try_send(out):
                        await channel.send(out)
        finally:
            vram.release()
            screen.close()
            if self.screens.get(res.partition) is screen:
                del self.screens[res.partition]
            if self.hosts.get(res.partition) is host:
                del self.hosts[res.partition]
            res.log.info("screen closed", dirt=host.dirt_messages, rects=host.dirt_rects)

    def _event(self, event: vhost.Event, res: ChannelResources, screen: Screen, vram: _Vram) -> None:
        match event:
            case vhost.Dirty(rects=rects, pixels=pixels):
                screen.apply(rects, pixels if pixels or vram.view is not None else vram.pixels(rects, screen.pitch))
            case vhost.PointerMoved(visible=visible, x=x, y=y):
                screen.move_pointer(x, y, visible)
            case vhost.PointerShapeChanged():
                screen.set_pointer_shape(event)
            case vhost.SituationChanged(active=active, width=w, height=h, pitch=pitch):
                screen.set_mode(active, w, h, pitch)
                res.log.info("screen mode", active=active, width=w, height=h, pitch=pitch)
            case vhost.VramRequested(gpa=gpa):
                vram.map(gpa)
            case vhost.VersionAccepted(version=version):
                self.handshakes += 1
                res.log.info("device protocol negotiated", device=self.name, version=synthvid.version_text(version))


class _Vram:
    """The partition's VRAM: the GPADL holding the GPA the guest named, held while the screen uses it."""

    def __init__(self, res: ChannelResources, host: vhost.SynthvidHost, screen: Screen) -> None:
        self.res, self.host, self.screen = res, host, screen
        self.hold: GpadlHold | None = None
        self.view: memoryview | None = None  # the guest's VRAM, mapped (shared memory, consecutive pages)
        self.buffer: GpadlBuffer | None = None  # the VRAM's bytes in its GPADL (shared memory)
        self.offset = 0

    def map(self, gpa: int) -> None:
        self.release()
        found = self.res.gpadls.containing(gpa)
        if found is None:
            raise DeviceProtocolError(f"VRAM_LOCATION GPA {gpa:#x} is in no GPADL of this channel")
        gpadl, offset = found
        hold = self.res.gpadls.hold(gpadl.gpadl, on_teardown=self._torn_down)
        size = sum(count for count, _ in gpadl.ranges) - offset
        try:
            self.host.map_vram(size)  # the offer's 8 MiB at most
        except DeviceProtocolError:
            hold.release()
            raise
        self.hold = hold
        self.view, self.buffer, self.offset = None, None, offset
        memory = self.res.memory
        if isinstance(memory, MappedMemory):  # shared memory: the screen shows the guest's VRAM itself
            self.buffer = self.res.gpadls.buffer(hold)
            ranges = self.buffer.ranges(offset, size)
            self.view = memory.pages.slice(ranges[0]) if len(ranges) == 1 else None
        self.screen.attach_vram(size, self.view)
        self.res.log.info("VRAM mapped", gpa=f"{gpa:#x}", gpadl=f"{gpadl.gpadl:#x}", bytes=size)

    def _torn_down(self) -> None:
        """The guest tore the VRAM's GPADL down while its screen is set (Linux never does): keep the last
        picture, refuse further DIRT, let go."""
        self.res.log.warning("VRAM GPADL torn down while the screen uses it")
        self.host.unmap_vram()
        self.release()

    def pixels(self, rects: tuple[Rect, ...], pitch: int) -> bytes:
        """A DIRT's pixels read from the mapped VRAM when its pages are not consecutive (shared memory)."""
        if self.buffer is None:
            return b""
        rows = []
        for x1, y1, x2, y2 in rects:
            for y in range(y1, y2):
                rows.append(self.buffer.read(self.offset + y * pitch + x1 * 4, (x2 - x1) * 4))
        return b"".join(rows)

    def release(self) -> None:
        hold, self.hold = self.hold, None
        if self.view is not None:
            self.screen.detach_vram()
        self.view, self.buffer = None, None
        if hold is not None:
            hold.release()


