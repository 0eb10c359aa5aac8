"""What the fuzzers found, one test each (the input also stays in tests/fuzz/corpus/<target>/crash-*)."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz.targets import TARGETS
from vmbus_proto.devices.network import offload, rndis

CORPUS = Path(__file__).parents[1] / "fuzz" / "corpus"
TCP = bytes.fromhex("ffffffffffff00155d0000010800" "450000280001000040060000c0a80001c0a80002"
                    "0050005000000001000000005010ffff00000000")


def test_lso_mss_beyond_16_bits_still_makes_a_virtio_net_header() -> None:
    """atheris, rndis target: a guest's LSOv2 PPI carries a 20-bit MSS; virtio-net's gso_size is 16 bits, so
    the TAP uplink's ``VnetHdr.pack`` raised struct.error for an MSS above 65535."""
    info = rndis.PacketInfo(lso=rndis.LsoV2(mss=0xFFFFF, tcp_header_offset=34))
    hdr = offload.from_tx_info(TCP, info)
    assert hdr is not None and hdr.gso_size == 0xFFFF
    assert len(hdr.pack()) == 12
    TARGETS["rndis"]((CORPUS / "rndis" / "crash-8624b5862cc476ee").read_bytes())
