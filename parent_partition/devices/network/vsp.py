"""NetVSP: the host half of the synthetic network adapter (Linux drivers/net/hyperv, OpenVMM netvsp).
Today it runs the NVSP version handshake only."""

from __future__ import annotations

from vmbus_proto.devices.network import nvsp

from ...vsp import HandshakeVsp


class NetworkVsp(HandshakeVsp):
    module = nvsp
