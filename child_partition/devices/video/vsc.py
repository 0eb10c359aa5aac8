"""The synthetic video VSC (Linux drivers/video/fbdev/hyperv_fb.c). Today it runs the SYNTHVID
version handshake only."""

from __future__ import annotations

from vmbus_proto.devices.video import synthvid

from ...vsc import HandshakeVsc


class VideoVsc(HandshakeVsc):
    module = synthvid
