"""NetVSC: the guest half of the synthetic network adapter (Linux drivers/net/hyperv/netvsc.c). Today
it runs the NVSP version handshake only."""

from __future__ import annotations

from vmbus_proto.devices.network import nvsp

from ...vsc import HandshakeVsc


class NetworkVsc(HandshakeVsc):
    module = nvsp
