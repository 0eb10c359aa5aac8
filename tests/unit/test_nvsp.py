"""NVSP messages: golden bytes laid out by hand from Linux hyperv_net.h / OpenVMM protocol.rs, the codec's
round trip, ``describe`` for every type, and fuzzing (only NvspError may come out of a parser)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus_proto.devices.network import nvsp
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PacketType


def u32(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "little") for v in values)


def u16(v: int) -> bytes:
    return v.to_bytes(2, "little")


# (message, is a completion, the bytes after the 4-byte msg_type, hand-written)
GOLDEN: list[tuple[nvsp.NvspMessage, bool, bytes]] = [
    (nvsp.Init(0x60001, 0x60001), False, u32(0x60001, 0x60001)),
    (nvsp.InitComplete(0xFFFFFFFF, 34, 1), True, u32(0xFFFFFFFF, 34, 1)),
    (nvsp.SendNdisVersion(6, 30), False, u32(6, 30)),
    # mtu 1514, reserved, capabilities u64: ieee8021q (bit 3) | sriov (2) | teaming (5) | rsc (7) = 0xAC
    (nvsp.SendNdisConfig(1514, 0, 0xAC), False, u32(1514, 0) + (0xAC).to_bytes(8, "little")),
    (nvsp.SendReceiveBuffer(0x1234, 0xCAFE), False, u32(0x1234) + u16(0xCAFE)),  # packed: 6 bytes
    (nvsp.SendReceiveBufferComplete(1, (nvsp.ReceiveBufferSection(0, 1806, 9289, 1806 * 9289),)), True,
     u32(1, 1) + u32(0, 1806, 9289, 16775934)),
    (nvsp.RevokeReceiveBuffer(0xCAFE), False, u16(0xCAFE)),
    (nvsp.SendSendBuffer(0x99, 0), False, u32(0x99) + u16(0)),
    (nvsp.SendSendBufferComplete(1, 6144), True, u32(1, 6144)),
    (nvsp.RevokeSendBuffer(0), False, u16(0)),
    (nvsp.SendRndisPacket(1, 0xFFFFFFFF, 0), False, u32(1, 0xFFFFFFFF, 0)),
    (nvsp.SendRndisPacket(0, 7, 108), False, u32(0, 7, 108)),
    (nvsp.SendRndisPacketComplete(1), True, u32(1)),
    (nvsp.SendVfAssociation(1, 42), False, u32(1, 42)),
    (nvsp.SwitchDataPath(1), False, u32(1)),
    # NDIS object header {type 0x80, revision 1, size 8} then the OID
    (nvsp.OidQueryEx(0x80, 1, 8, 0x00010107), False, bytes([0x80, 1]) + u16(8) + u32(0x00010107)),
    (nvsp.OidQueryExComplete(0xC00000BB, 0), True, u32(0xC00000BB, 0)),
    (nvsp.SubchannelRequest(1, 7), False, u32(1, 7)),
    (nvsp.SubchannelComplete(1, 3), True, u32(1, 3)),
    # count 16, offset 12 (from the NVSP message start), then the table
    (nvsp.SendIndirectionTable(tuple(i % 4 for i in range(16))), False,
     u32(16, 12) + u32(*(i % 4 for i in range(16)))),
]
IDS = [type(m).__name__ + ("_comp" if c else "") for m, c, _ in GOLDEN]


@pytest.mark.parametrize(("message", "completion", "body"), GOLDEN, ids=IDS)
def test_golden_bytes(message: nvsp.NvspMessage, completion: bool, body: bytes) -> None:
    wire = nvsp.encode(message, 40)
    expected = u32(message.TYPE) + body
    assert wire[:len(expected)] == expected, f"{type(message).__name__} packs to {wire.hex()}"
    assert len(wire) == max(40, len(expected)) and not any(wire[len(expected):]), "padding is not zeros"
    assert nvsp.decode(wire, completion) == message


@pytest.mark.parametrize(("message", "completion", "body"), GOLDEN, ids=IDS)
def test_describe_names_every_type(message: nvsp.NvspMessage, completion: bool, body: bytes) -> None:
    wire = nvsp.encode(message, 28 if len(body) <= 24 else 40)
    text = nvsp.describe(wire, PacketType.COMP if completion else PacketType.DATA_INBAND)
    assert text.startswith("NVSP_MSG"), text
    assert f"({message.TYPE})" in text, f"type number missing: {text}"


def test_describe_examples() -> None:
    assert nvsp.describe(nvsp.encode(nvsp.SendNdisVersion(6, 30))) == (
        "NVSP_MSG1_TYPE_SEND_NDIS_VER(100) ndis_version=6.30")
    assert nvsp.describe(nvsp.encode(nvsp.SendNdisConfig(1514, 0, nvsp.linux_capabilities(0x60001)))) == (
        "NVSP_MSG2_TYPE_SEND_NDIS_CONFIG(125) mtu=1514 capabilities=sriov|ieee8021q|teaming|rsc")
    assert nvsp.describe(nvsp.encode(nvsp.SendRndisPacket(0, nvsp.NO_SECTION, 0))) == (
        "NVSP_MSG1_TYPE_SEND_RNDIS_PKT(107) channel_type=data no send-buffer section")


@pytest.mark.parametrize(("version", "caps", "ndis"), [
    (0x2, 0x08, (6, 1)), (0x30002, 0x08, (6, 1)), (0x40000, 0x08, (6, 1)),
    (0x50000, 0x2C, (6, 30)), (0x60000, 0x2C, (6, 30)), (0x60001, 0xAC, (6, 30))])
def test_linux_ndis_config_and_version(version: int, caps: int, ndis: tuple[int, int]) -> None:
    assert nvsp.linux_capabilities(version) == caps, f"capabilities for {nvsp.version_text(version)}"
    assert nvsp.linux_ndis_version(version) == ndis
    assert nvsp.linux_capabilities(0x60001, isolated=True) & nvsp.CAP_SRIOV == 0


def test_indirection_table_before_61_is_read_from_the_message_end() -> None:
    # netvsc_send_table: up to v6 the offset field is not trusted (a host bug); the table ends the message.
    table = tuple(range(16))
    body = u32(16, 0xDEAD) + u32(*table)
    assert nvsp.SendIndirectionTable.unpack(body, 0x60000).table == table
    with pytest.raises(nvsp.NvspError, match="overruns"):
        nvsp.SendIndirectionTable.unpack(body, 0x60001)
    with pytest.raises(nvsp.NvspError, match="16"):
        nvsp.SendIndirectionTable.unpack(u32(8, 12) + u32(*range(8)), 0x60001)


def test_receive_buffer_complete_cannot_claim_more_sections_than_it_carries() -> None:
    with pytest.raises(nvsp.NvspError, match="claims 2 sections"):
        nvsp.SendReceiveBufferComplete.unpack(u32(1, 2) + u32(0, 1806, 10, 18060))


@pytest.mark.parametrize("completion", [False, True])
def test_short_and_unknown_messages_are_nvsp_errors(completion: bool) -> None:
    with pytest.raises(nvsp.NvspError, match="shorter than its header"):
        nvsp.decode(b"\x01\x00", completion)
    with pytest.raises(nvsp.NvspError, match="unknown or unsupported"):
        nvsp.decode(u32(4242), completion)
    with pytest.raises(nvsp.NvspError, match="need 12"):
        nvsp.decode(u32(nvsp.MessageType.SEND_RNDIS_PKT, 0, 0), False)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.booleans(), st.sampled_from([PacketType.DATA_INBAND, PacketType.COMP]))
def test_fuzz_parsers_raise_only_nvsp_errors(data: bytes, completion: bool, packet_type: int) -> None:
    for parse in (lambda: nvsp.decode(data, completion), lambda: nvsp.describe(data, packet_type)):
        try:
            parse()
        except nvsp.NvspError:
            pass
        except DeviceProtocolError as exc:  # pragma: no cover - must not happen
            raise AssertionError(f"a DeviceProtocolError that is not an NvspError: {exc!r}") from exc


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(int(t) for t in nvsp.MessageType)), st.binary(max_size=80), st.booleans())
def test_fuzz_bodies_of_every_type(msg_type: int, body: bytes, completion: bool) -> None:
    data = struct.pack("<I", msg_type) + body
    try:
        nvsp.decode(data, completion)
        nvsp.describe(data, PacketType.COMP if completion else PacketType.DATA_INBAND)
    except nvsp.NvspError:
        pass
