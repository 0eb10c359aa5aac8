"""The synthetic video VSP (Linux drivers/video/fbdev/hyperv_fb.c, OpenVMM synth_video).
Today it runs the SYNTHVID version handshake only."""

from __future__ import annotations

from vmbus_proto.devices.video import synthvid

from ...vsp import HandshakeVsp


class VideoVsp(HandshakeVsp):
    module = synthvid
