"""The synthetic video VSC (Linux drivers/video/fbdev/hyperv_fb.c). Today it runs the SYNTHVID
version handshake only, offering the versions ``synthvid_connect_vsp`` picks for the negotiated VMBus version."""

from __future__ import annotations

from vmbus_proto.devices.base import Handshake
from vmbus_proto.devices.video import synthvid

from ...vsc import HandshakeVsc


class VideoVsc(HandshakeVsc):
    module = synthvid

    def new_handshake(self) -> Handshake:
        return synthvid.VscHandshake.for_vmbus(self.bus.core.version)
