"""Device protocol catalogues: each VSC handshake wired to its VSP in memory, golden bytes, and bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections import deque
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus_proto import guids
from vmbus_proto.devices import registry
from vmbus_proto.devices.base import Handshake, Incoming, Outgoing
from vmbus_proto.devices.heartbeat import protocol as heartbeat
from vmbus_proto.devices.input import keyboard, mouse
from vmbus_proto.devices.network import nvsp as network
from vmbus_proto.devices.storage import vstor as storage
from vmbus_proto.devices.video import synthvid as video
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PacketType
from vmbus_proto.pipe import PIPE_HEADER, PIPE_PARTIAL

DEVICES: list[tuple[ModuleType, int]] = [
    (storage, 0x0602),
    (network, 0x60001),
    (video, 0x00050003),
    (keyboard, 0x00010000),
    (mouse, 0x00020000),
]
DEVICE_IDS = [module.SPEC.name for module, _ in DEVICES]


def incoming(out: Outgoing) -> Incoming:
    return Incoming(out.type, out.trans_id, out.completion_requested, out.payload)


def wire(vsc: Handshake, vsp: Handshake) -> tuple[list[Outgoing], list[Outgoing]]:
    """Run both sides until neither has anything left to send; returns what each side sent."""
    to_vsp: deque[Outgoing] = deque(vsc.start())
    to_vsc: deque[Outgoing] = deque(vsp.start())
    vsc_sent, vsp_sent = list(to_vsp), list(to_vsc)
    for _ in range(100):
        if not to_vsp and not to_vsc:
            return vsc_sent, vsp_sent
        if to_vsp:
            replies = vsp.receive(incoming(to_vsp.popleft()))
            vsp_sent += replies
            to_vsc.extend(replies)
        if to_vsc:
            replies = vsc.receive(incoming(to_vsc.popleft()))
            vsc_sent += replies
            to_vsp.extend(replies)
    raise AssertionError("handshake did not settle")


def inband(payload: bytes, trans_id: int = 0, completion_requested: bool = False) -> Incoming:
    return Incoming(PacketType.DATA_INBAND, trans_id, completion_requested, payload)


def comp(payload: bytes, trans_id: int) -> Incoming:
    return Incoming(PacketType.COMP, trans_id, False, payload)


def stor_request(operation: int, body: bytes = b"", trans_id: int = 5) -> Incoming:
    return inband(storage.pack_request(operation, body), trans_id, True)


# --- every device negotiates -------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "expected"), DEVICES, ids=DEVICE_IDS)
def test_vsc_and_vsp_negotiate(module: ModuleType, expected: int) -> None:
    vsc, vsp = module.VscHandshake(), module.VspHandshake()
    wire(vsc, vsp)
    assert vsc.done and vsp.done
    assert vsc.failed is None
    assert vsc.negotiated_version == vsp.negotiated_version == expected


@pytest.mark.parametrize(("module", "expected"), [d for d in DEVICES if d[0] is not storage],
                         ids=[i for i in DEVICE_IDS if i != "storage"])
def test_vsc_trans_ids_start_at_one_and_never_zero(module: ModuleType, expected: int) -> None:
    vsc_sent, _ = wire(module.VscHandshake(), module.VspHandshake())
    ids = [out.trans_id for out in vsc_sent]
    assert ids == list(range(1, len(ids) + 1))


def test_storvsc_init_requests_use_vmbus_rqst_init() -> None:
    """Linux storvsc_execute_vstor_op: every init request goes with trans_id VMBUS_RQST_INIT (U64_MAX - 2)."""
    vsc_sent, vsp_sent = wire(storage.VscHandshake(), storage.VspHandshake())
    assert len(vsc_sent) == 4
    assert {out.trans_id for out in vsc_sent} == {storage.VMBUS_RQST_INIT} == {(1 << 64) - 3}
    assert {out.trans_id for out in vsp_sent} == {storage.VMBUS_RQST_INIT}  # echoed in every completion


@pytest.mark.parametrize("refuse_all", [False, True], ids=["accepted", "refused"])
@pytest.mark.parametrize("module", [storage, network], ids=["storage", "network"])
def test_completions_echo_trans_id(module: ModuleType, refuse_all: bool) -> None:
    vsp = module.VspHandshake(supported=[]) if refuse_all else module.VspHandshake()
    vsc_sent, vsp_sent = wire(module.VscHandshake(), vsp)
    assert all(out.completion_requested for out in vsc_sent)
    assert [out.type for out in vsp_sent] == [PacketType.COMP] * len(vsp_sent)
    assert [out.trans_id for out in vsp_sent] == [out.trans_id for out in vsc_sent]


@pytest.mark.parametrize("module", [video, keyboard, mouse], ids=["video", "keyboard", "mouse"])
def test_pipe_and_input_vsps_answer_inband_without_trans_id(module: ModuleType) -> None:
    _, vsp_sent = wire(module.VscHandshake(), module.VspHandshake())
    assert vsp_sent
    for out in vsp_sent:
        assert (out.type, out.trans_id, out.completion_requested) == (PacketType.DATA_INBAND, 0, False)


@pytest.mark.parametrize(("module", "expected"), DEVICES, ids=DEVICE_IDS)
def test_receive_after_done_is_a_protocol_error(module: ModuleType, expected: int) -> None:
    vsc, vsp = module.VscHandshake(), module.VspHandshake()
    vsc_sent, vsp_sent = wire(vsc, vsp)
    with pytest.raises(DeviceProtocolError):
        vsp.receive(incoming(vsc_sent[0]))
    with pytest.raises(DeviceProtocolError):
        vsc.receive(incoming(vsp_sent[-1]))


# --- version fallback --------------------------------------------------------------------------------------


def test_storage_falls_back_to_win8_1() -> None:
    vsc = storage.VscHandshake()
    vsp = storage.VspHandshake(supported={0x0600, 0x0501, 0x0402, 0x0200})
    _, vsp_sent = wire(vsc, vsp)
    assert vsc.negotiated_version == vsp.negotiated_version == 0x0600
    mismatch = storage.VstorPacket.unpack(vsp_sent[1].payload)
    assert mismatch.status == storage.NtStatus.REVISION_MISMATCH
    assert storage.ProtocolVersion.unpack(mismatch.body).major_minor == 0x0602


def test_network_falls_back_to_v6() -> None:
    vsc = network.VscHandshake()
    vsp = network.VspHandshake(supported={0x60000})
    vsc_sent, vsp_sent = wire(vsc, vsp)
    assert vsc.negotiated_version == vsp.negotiated_version == 0x60000
    assert [network.Init.unpack(network.unpack_message(o.payload)[1]).max_protocol_ver for o in vsc_sent] == [
        0x60001, 0x60000]
    assert network.InitComplete.unpack(network.unpack_message(vsp_sent[0].payload)[1]).status == 0


def test_video_falls_back_to_3_2() -> None:
    vsc = video.VscHandshake()
    vsp = video.VspHandshake(supported={video.Version.WIN8})
    wire(vsc, vsp)
    assert vsc.negotiated_version == vsp.negotiated_version == 0x00020003


@pytest.mark.parametrize("module", [storage, network, video, keyboard, mouse], ids=DEVICE_IDS)
def test_every_version_refused_fails_the_vsc(module: ModuleType) -> None:
    vsc, vsp = module.VscHandshake(), module.VspHandshake(supported=set())
    _, vsp_sent = wire(vsc, vsp)
    assert not vsc.done and not vsp.done
    assert vsc.failed is not None and "refused every" in vsc.failed
    assert vsc.negotiated_version is None
    assert vsc.receive(incoming(vsp_sent[-1])) == []


def test_storage_failure_lists_every_version_tried() -> None:
    vsc = storage.VscHandshake()
    wire(vsc, storage.VspHandshake(supported={0x0200}))
    assert vsc.failed is not None
    assert "6.2, 6.0, 5.1" in vsc.failed
    assert "0xc0000059" in vsc.failed


# --- storage ----------------------------------------------------------------------------------------------


def test_storage_begin_initialization_golden() -> None:
    out = storage.VscHandshake().start()[0]
    assert out.payload == bytes.fromhex("07000000 01000000 00000000") + bytes(52)
    assert (out.type, out.trans_id, out.completion_requested) == (PacketType.DATA_INBAND, storage.VMBUS_RQST_INIT,
                                                                  True)


def test_storage_sequence_and_completion_bytes() -> None:
    vsc_sent, vsp_sent = wire(storage.VscHandshake(), storage.VspHandshake())
    ops = [storage.VstorPacket.unpack(o.payload).operation for o in vsc_sent]
    assert ops == [7, 9, 10, 8]
    assert vsc_sent[1].payload == bytes.fromhex("09000000 01000000 00000000 02060000") + bytes(48)
    assert all(len(o.payload) == 64 for o in vsc_sent + vsp_sent)
    assert vsp_sent[0].payload == bytes.fromhex("01000000 00000000 00000000") + bytes(52)
    assert vsp_sent[1].payload == bytes.fromhex("01000000 00000000 00000000 02060000") + bytes(48)
    # WIN8 and later: SUPPORTS_MULTI_CHANNEL even with no sub-channels to give (OpenVMM process_primary).
    props = bytes.fromhex("00000000 0000 0000 01000000 00000400 0000000000000000")
    assert vsp_sent[2].payload == bytes.fromhex("01000000 00000000 00000000") + props + bytes(28)


def test_storage_vsc_stores_channel_properties() -> None:
    vsc = storage.VscHandshake()
    vsp = storage.VspHandshake(max_channel_cnt=7, max_transfer_bytes=0x80000)
    wire(vsc, vsp)
    assert (vsc.max_channel_cnt, vsc.flags, vsc.max_transfer_bytes) == (7, 1, 0x80000)
    assert vsc.supports_multi_channel and vsp.multi_channel


def test_storage_no_multichannel_before_win8() -> None:
    vsc = storage.VscHandshake(versions=[0x0402])
    wire(vsc, storage.VspHandshake(max_channel_cnt=4))
    assert vsc.negotiated_version == 0x0402
    assert (vsc.max_channel_cnt, vsc.flags) == (0, 0)


def test_storage_out_of_order_gets_invalid_device_state() -> None:
    vsp = storage.VspHandshake()
    (reply,) = vsp.receive(stor_request(storage.Operation.END_INITIALIZATION, trans_id=42))
    assert (reply.type, reply.trans_id) == (PacketType.COMP, 42)
    assert len(reply.payload) == 64
    msg = storage.VstorPacket.unpack(reply.payload)
    assert (msg.operation, msg.status) == (storage.Operation.COMPLETE_IO, 0xC0000184)
    assert not vsp.done
    (reply,) = vsp.receive(stor_request(storage.Operation.BEGIN_INITIALIZATION))
    assert storage.VstorPacket.unpack(reply.payload).status == 0
    (reply,) = vsp.receive(stor_request(storage.Operation.QUERY_PROPERTIES))
    assert storage.VstorPacket.unpack(reply.payload).status == storage.NtStatus.INVALID_DEVICE_STATE


def test_storage_revision_mismatch_stays_in_query_version() -> None:
    vsp = storage.VspHandshake(supported={0x0600})
    vsp.receive(stor_request(storage.Operation.BEGIN_INITIALIZATION))
    for version, status in [(0x0602, 0xC0000059), (0x0700, 0xC0000059), (0x0600, 0)]:
        (reply,) = vsp.receive(stor_request(storage.Operation.QUERY_PROTOCOL_VERSION,
                                            storage.ProtocolVersion(version).pack()))
        assert storage.VstorPacket.unpack(reply.payload).status == status
    assert vsp.negotiated_version == 0x0600


def test_storage_completion_padding_follows_request_size() -> None:
    vsp = storage.VspHandshake()
    short = inband(storage.pack_request(storage.Operation.BEGIN_INITIALIZATION, size=48), 3, True)
    (reply,) = vsp.receive(short)
    assert len(reply.payload) == 48
    assert storage.completion_size(12) == 12
    assert storage.completion_size(200) == 64


def test_storage_create_sub_channels_before_end_initialization() -> None:
    vsp = storage.VspHandshake(max_channel_cnt=3)
    for op, body in [(storage.Operation.BEGIN_INITIALIZATION, b""),
                     (storage.Operation.QUERY_PROTOCOL_VERSION, storage.ProtocolVersion(0x0602).pack()),
                     (storage.Operation.QUERY_PROPERTIES, b"")]:
        vsp.receive(stor_request(op, body))
    (too_many,) = vsp.receive(stor_request(storage.Operation.CREATE_SUB_CHANNELS, struct.pack("<H", 4)))
    assert storage.VstorPacket.unpack(too_many.payload).status == storage.NtStatus.INVALID_PARAMETER
    (ok,) = vsp.receive(stor_request(storage.Operation.CREATE_SUB_CHANNELS, struct.pack("<H", 3)))
    assert storage.VstorPacket.unpack(ok.payload).status == 0
    assert vsp.sub_channel_count == 3
    (again,) = vsp.receive(stor_request(storage.Operation.CREATE_SUB_CHANNELS, struct.pack("<H", 1)))
    assert storage.VstorPacket.unpack(again.payload).status == storage.NtStatus.INVALID_DEVICE_STATE
    vsp.receive(stor_request(storage.Operation.END_INITIALIZATION))
    assert vsp.done


def _to_properties(vsp: storage.VspHandshake, version: int) -> storage.ChannelProperties:
    vsp.receive(stor_request(storage.Operation.BEGIN_INITIALIZATION))
    vsp.receive(stor_request(storage.Operation.QUERY_PROTOCOL_VERSION, storage.ProtocolVersion(version).pack()))
    (props,) = vsp.receive(stor_request(storage.Operation.QUERY_PROPERTIES))
    return storage.ChannelProperties.unpack(storage.VstorPacket.unpack(props.payload).body)


@pytest.mark.parametrize("max_channel_cnt", [0, 4])
@pytest.mark.parametrize("version", list(storage.Version), ids=[storage.version_text(v) for v in storage.Version])
def test_storage_multi_channel_flag_for_every_version_from_win8(version: int, max_channel_cnt: int) -> None:
    """OpenVMM process_primary: ``multi_channel_supported = version >= Win8`` sets SUPPORTS_MULTI_CHANNEL and
    announces the maximum (even 0); before WIN8 neither, and CREATE_SUB_CHANNELS is then out of order."""
    vsp = storage.VspHandshake(max_channel_cnt=max_channel_cnt)
    props = _to_properties(vsp, version)
    multi = version >= storage.Version.WIN8
    assert bool(props.flags & storage.ChannelFlags.SUPPORTS_MULTI_CHANNEL) == multi, f"flags {props.flags:#x}"
    assert props.max_channel_cnt == (max_channel_cnt if multi else 0)
    (reply,) = vsp.receive(stor_request(storage.Operation.CREATE_SUB_CHANNELS, struct.pack("<H", 1)))
    expected = (storage.NtStatus.SUCCESS if max_channel_cnt else storage.NtStatus.INVALID_PARAMETER) if multi \
        else storage.NtStatus.INVALID_DEVICE_STATE
    assert storage.VstorPacket.unpack(reply.payload).status == expected


def test_storage_create_sub_channels_refused_until_granted() -> None:
    """With no sub-channels configured every request for one is INVALID_PARAMETER and may be retried; a count
    of 0 is within the maximum of 0 (OpenVMM enable_subchannels: ``count > max`` is the only refusal)."""
    vsp = storage.VspHandshake()
    _to_properties(vsp, storage.Version.WIN10)
    for count in (1, 0xFFFF):
        (refused,) = vsp.receive(stor_request(storage.Operation.CREATE_SUB_CHANNELS, struct.pack("<H", count)))
        assert storage.VstorPacket.unpack(refused.payload).status == storage.NtStatus.INVALID_PARAMETER
        assert vsp.sub_channel_count is None
    (zero,) = vsp.receive(stor_request(storage.Operation.CREATE_SUB_CHANNELS, struct.pack("<H", 0)))
    assert storage.VstorPacket.unpack(zero.payload).status == storage.NtStatus.SUCCESS
    assert vsp.sub_channel_count == 0
    assert storage.parse_create_sub_channels(struct.pack("<H", 7) + bytes(50)) == 7
    with pytest.raises(DeviceProtocolError, match="CREATE_SUB_CHANNELS"):
        storage.parse_create_sub_channels(b"\x01")


def test_storage_host_notification_is_a_bare_vstor_packet() -> None:
    assert storage.pack_host_notification(storage.Operation.ENUMERATE_BUS) == bytes.fromhex("0b000000") + bytes(60)
    assert len(storage.pack_host_notification(storage.Operation.ENUMERATE_BUS, storage.request_size(0x0402))) == 48


def test_storage_vsc_ignores_unsolicited_enumerate_bus() -> None:
    vsc = storage.VscHandshake()
    vsc.start()
    notice = storage.VstorPacket(storage.Operation.ENUMERATE_BUS).pack()
    assert vsc.receive(inband(notice)) == []
    assert not vsc.done and vsc.failed is None


def test_storage_vsc_rejects_bad_completions() -> None:
    vsc = storage.VscHandshake()
    (begin,) = vsc.start()
    good = storage.pack_completion(0)
    with pytest.raises(DeviceProtocolError, match="unknown transaction id"):
        vsc.receive(comp(good, begin.trans_id + 1))
    with pytest.raises(DeviceProtocolError, match="shorter"):
        vsc.receive(comp(good[:48], begin.trans_id))
    with pytest.raises(DeviceProtocolError, match="COMPLETE_IO"):
        vsc.receive(comp(storage.VstorPacket(storage.Operation.EXECUTE_SRB).pack(), begin.trans_id))
    with pytest.raises(DeviceProtocolError):
        vsc.receive(inband(good, begin.trans_id))
    (query,) = vsc.receive(comp(good, begin.trans_id))
    assert query.trans_id == storage.VMBUS_RQST_INIT


def test_storage_vsp_rejects_malformed_packets() -> None:
    vsp = storage.VspHandshake()
    begin = storage.pack_request(storage.Operation.BEGIN_INITIALIZATION)
    with pytest.raises(DeviceProtocolError):
        vsp.receive(inband(begin[:8], 1, True))
    with pytest.raises(DeviceProtocolError, match="completion"):
        vsp.receive(comp(begin, 1))
    with pytest.raises(DeviceProtocolError, match="not transactional"):
        vsp.receive(inband(begin, 1, False))
    with pytest.raises(DeviceProtocolError, match="unrecognized"):
        vsp.receive(stor_request(storage.Operation.COMPLETE_IO))
    with pytest.raises(DeviceProtocolError, match="unrecognized"):
        vsp.receive(stor_request(99))
    with pytest.raises(DeviceProtocolError, match="vmstorage_protocol_version"):
        vsp.receive(inband(storage.pack_request(storage.Operation.QUERY_PROTOCOL_VERSION, size=12), 1, True))


def test_vmscsi_request_round_trip() -> None:
    request = storage.VmscsiRequest(
        port_number=2, path_id=0, target_id=1, lun=3, cdb_length=10, data_in=storage.DataDirection.READ,
        data_transfer_length=4096, data=bytes.fromhex("28000000000000000800"), queue_tag=0xFF,
        queue_action=0x20, srb_flags=storage.SrbFlags.DISABLE_SYNCH_TRANSFER | storage.SrbFlags.DATA_IN,
        time_out_value=60)
    raw = request.pack()
    assert len(raw) == storage.VMSCSI_REQUEST_SIZE == 52
    assert raw[:4] == bytes.fromhex("3400 00 00")
    back = storage.VmscsiRequest.unpack(raw)
    assert back.cdb == bytes.fromhex("28000000000000000800")
    assert back == dataclasses.replace(request, data=request.data.ljust(20, b"\0"))
    v1 = storage.VmscsiRequest.unpack(raw[:36])
    assert (v1.srb_flags, v1.time_out_value, v1.lun) == (0, 0, 3)
    with pytest.raises(DeviceProtocolError):
        storage.VmscsiRequest.unpack(raw[:35])


_u8, _u16, _u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)


@given(st.builds(storage.VmscsiRequest, _u16, _u8, _u8, _u8, _u8, _u8, _u8, st.integers(1, 16), _u8, _u8, _u8, _u32,
                 st.binary(min_size=20, max_size=20), _u16, _u8, _u8, _u32, _u32, _u32),
       st.sampled_from([storage.VSTOR_PACKET_SIZE, storage.VSTOR_PACKET_SIZE_V1, 50, 80]),
       st.sampled_from([0x01, 0x04, 0x06, 0x84, 0x22, 0x3F]), _u8, _u32, st.binary(max_size=24))
@settings(max_examples=300, deadline=None)
def test_execute_srb_and_complete_io_structs_match_the_field_by_field_layout(
        request: storage.VmscsiRequest, size: int, srb_status: int, scsi_status: int, transferred: int,
        sense: bytes) -> None:
    """The one-struct I/O path reads and writes exactly what vstor_packet + vmscsi_request define."""
    payload = storage.pack_request(storage.Operation.EXECUTE_SRB, request.pack(), size=size)
    fast = storage.unpack_execute_srb(payload)
    slow = storage.VmscsiRequest.unpack(storage.VstorPacket.unpack(payload).body)
    assert fast.operation == storage.Operation.EXECUTE_SRB and fast.flags == storage.REQUEST_COMPLETION_FLAG
    assert fast[3:] == tuple(dataclasses.astuple(slow))
    assert fast.cdb == slow.cdb
    # OpenVMM handle_completion: a fresh vmscsi_request (length 52, cdb_length 16, sense_info_ex_length 0x14,
    # the rest zero) with the outcome, sized like the request.
    sense = sense[:storage.SENSE_BUFFER_SIZE]
    answer = storage.VmscsiRequest(length=52, srb_status=srb_status, scsi_status=scsi_status, cdb_length=16,
                                   sense_info_length=0x14, data_in=0, data_transfer_length=transferred,
                                   data=sense.ljust(storage.SENSE_BUFFER_SIZE, b"\0"))
    expected = storage.pack_completion(storage.srb_status_to_nt_status(srb_status), answer.pack(),
                                       request_payload_len=len(payload))
    assert storage.pack_complete_io(srb_status, scsi_status, transferred, sense, len(payload)) == expected


def test_srb_status_to_nt_status() -> None:
    assert storage.srb_status_to_nt_status(storage.SrbStatus.SUCCESS) == storage.NtStatus.SUCCESS
    assert storage.srb_status_to_nt_status(0x80 | storage.SrbStatus.INVALID_LUN) == 0xC00000C0
    assert storage.srb_status_to_nt_status(storage.SrbStatus.ERROR) == storage.NtStatus.IO_DEVICE_ERROR


# --- network ----------------------------------------------------------------------------------------------


def test_network_init_and_init_complete_golden() -> None:
    vsc_sent, vsp_sent = wire(network.VscHandshake(), network.VspHandshake())
    assert vsc_sent[0].payload == bytes.fromhex("01000000 01000600 01000600") + bytes(28)
    assert (vsp_sent[0].type, vsp_sent[0].trans_id) == (PacketType.COMP, vsc_sent[0].trans_id)
    assert vsp_sent[0].payload == bytes.fromhex("02000000 ffffffff 22000000 01000000") + bytes(24)


def test_network_init_complete_is_28_bytes_up_to_v6_and_2_for_v1() -> None:
    for version, negotiated in [(0x60000, 0xFFFFFFFF), (0x2, 0x2)]:
        vsp = network.VspHandshake()
        request = network.pack_message(network.MessageType.INIT, network.Init(version, version).pack())
        (reply,) = vsp.receive(inband(request, 9, True))
        assert len(reply.payload) == 28
        msg_type, body = network.unpack_message(reply.payload)
        assert msg_type == network.MessageType.INIT_COMPLETE
        assert network.InitComplete.unpack(body) == network.InitComplete(negotiated, 34, network.Status.SUCCESS)


def test_network_malformed_input() -> None:
    vsp = network.VspHandshake()
    with pytest.raises(DeviceProtocolError):
        vsp.receive(inband(b"\x01\x00", 1, True))
    with pytest.raises(DeviceProtocolError, match="INIT body"):
        vsp.receive(inband(struct.pack("<II", 1, 0x60001), 1, True))
    with pytest.raises(DeviceProtocolError, match="before INIT"):
        vsp.receive(inband(network.pack_message(network.MessageType.SEND_NDIS_VER, b""), 1, True))
    vsc = network.VscHandshake()
    (init,) = vsc.start()
    with pytest.raises(DeviceProtocolError):
        vsc.receive(inband(network.pack_message(network.MessageType.INIT_COMPLETE, b""), init.trans_id))
    with pytest.raises(DeviceProtocolError, match="INIT_COMPLETE body"):
        vsc.receive(comp(struct.pack("<III", 2, 0xFFFFFFFF, 34), init.trans_id))
    with pytest.raises(DeviceProtocolError, match="unknown transaction id"):
        vsc.receive(comp(network.pack_message(2, network.InitComplete(0, 34, 1).pack(), 28), 0))


# --- video ------------------------------------------------------------------------------------------------


def test_video_version_request_and_response_golden() -> None:
    vsc_sent, vsp_sent = wire(video.VscHandshake(), video.VspHandshake())
    assert vsc_sent[0].payload == bytes.fromhex("01000000 0c000000 01000000 0c000000 03000500")
    assert (vsc_sent[0].trans_id, vsc_sent[0].completion_requested) == (1, False)
    assert vsp_sent[0].payload == bytes.fromhex("01000000 0e000000 02000000 06000000 03000500 02 01")


def test_video_refuses_other_majors_and_waits() -> None:
    vsp = video.VspHandshake(supported={video.make_version(4, 0), video.Version.WIN8})
    request = video.pack_message(video.MessageType.VERSION_REQUEST, video.VersionRequest(0x00000004).pack())
    (reply,) = vsp.receive(inband(request))
    response = video.VersionResponse.unpack(video.unpack_message(reply.payload)[1])
    assert (response.version, response.is_accepted, response.max_video_outputs) == (4, 0, 1)
    assert (vsp.done, vsp.negotiated_version) == (False, None)
    request = video.pack_message(video.MessageType.VERSION_REQUEST, video.VersionRequest(0x00020003).pack())
    (reply,) = vsp.receive(inband(request))
    assert video.VersionResponse.unpack(video.unpack_message(reply.payload)[1]).is_accepted == 2
    assert (vsp.done, vsp.negotiated_version) == (True, 0x00020003)
    with pytest.raises(DeviceProtocolError, match="second"):
        vsp.receive(inband(request))


def test_video_malformed_input() -> None:
    vsp = video.VspHandshake()
    body = video.VersionRequest(video.Version.WIN10).pack()
    partial = PIPE_HEADER.pack(PIPE_PARTIAL, 12) + struct.pack("<II", 1, 12) + body
    with pytest.raises(DeviceProtocolError, match="not DATA"):
        vsp.receive(inband(partial))
    with pytest.raises(DeviceProtocolError, match="shorter than its header"):
        vsp.receive(inband(PIPE_HEADER.pack(1, 4) + b"\x01\x00\x00\x00"))
    with pytest.raises(DeviceProtocolError, match="VERSION_REQUEST body"):
        vsp.receive(inband(video.pack_message(video.MessageType.VERSION_REQUEST, b"\x03\x00")))
    with pytest.raises(DeviceProtocolError, match="before the version"):
        vsp.receive(inband(video.pack_message(video.MessageType.DIRT, b"\x00\x00")))
    vsc = video.VscHandshake()
    vsc.start()
    with pytest.raises(DeviceProtocolError, match="VERSION_RESPONSE body"):
        vsc.receive(inband(video.pack_message(video.MessageType.VERSION_RESPONSE, b"\x03\x00\x05\x00\x02")))


# --- mouse ------------------------------------------------------------------------------------------------


REFERENCE_REPORT_DESCRIPTOR = bytes.fromhex(
    "05 01 09 02 A1 01 09 01 A1 00 05 09 19 01 29 05 15 00 25 01 95 05 75 01 81 02 95 01 75 03 81 01 05 01"
    " 09 30 09 31 15 00 26 FF 7F 75 10 95 02 81 02 05 01 09 38 16 01 80 26 FF 7F 75 10 95 01 81 06 C0 C0")


def test_mouse_report_descriptor_is_the_reference_67_bytes() -> None:
    assert len(REFERENCE_REPORT_DESCRIPTOR) == 67
    assert mouse.REPORT_DESCRIPTOR == REFERENCE_REPORT_DESCRIPTOR


def test_mouse_golden_messages() -> None:
    vsc = mouse.VscHandshake()
    vsc_sent, vsp_sent = wire(vsc, mouse.VspHandshake())
    assert vsc_sent[0].payload == bytes.fromhex("01000000 0c000000 00000000 04000000 00000200")
    assert vsc_sent[1].payload == bytes.fromhex("01000000 09000000 03000000 01000000 00")
    assert all(out.completion_requested for out in vsc_sent)
    assert vsp_sent[0].payload == bytes.fromhex("01000000 0d000000 01000000 05000000 00000200 01")
    info = vsp_sent[1].payload
    assert info[:16] == bytes.fromhex("01000000 b1000000 02000000 6c000000")  # 8 + 169 piped, size 108
    assert info[16:48] == bytes.fromhex("20000000 5e04 2106 0100") + bytes(22)
    assert info[48:57] == bytes.fromhex("09 21 0101 00 01 22 4300")
    assert info[57:124] == REFERENCE_REPORT_DESCRIPTOR
    assert info[124:] == bytes(128 - 67)
    assert vsc.device_info == mouse.DEFAULT_DEVICE_INFO
    assert vsc.report_descriptor == REFERENCE_REPORT_DESCRIPTOR


def test_mouse_vsc_ignores_completions_and_early_reports() -> None:
    vsc = mouse.VscHandshake()
    (request,) = vsc.start()
    assert vsc.receive(comp(b"", request.trans_id)) == []
    report = mouse.pack_message(mouse.MessageType.INPUT_REPORT, mouse.MouseReport(1, 100, 200, -1).pack())
    assert vsc.receive(inband(report)) == []
    assert not vsc.done


def test_mouse_refused_version_waits_for_another_request() -> None:
    vsp = mouse.VspHandshake()
    old = mouse.pack_message(mouse.MessageType.PROTOCOL_REQUEST, mouse.ProtocolRequest(0x00010000).pack())
    (reply,) = vsp.receive(inband(old, 1, True))
    assert mouse.ProtocolResponse.unpack(mouse.unpack_message(reply.payload)[1]).approved == 0
    new = mouse.pack_message(mouse.MessageType.PROTOCOL_REQUEST, mouse.ProtocolRequest(0x00020000).pack())
    replies = vsp.receive(inband(new, 2, True))
    assert [mouse.unpack_message(r.payload)[0] for r in replies] == [1, 2]


def test_mouse_malformed_input() -> None:
    vsp = mouse.VspHandshake()
    request = mouse.pack_message(mouse.MessageType.PROTOCOL_REQUEST, mouse.ProtocolRequest(0x00020000).pack())
    with pytest.raises(DeviceProtocolError, match="not DATA"):
        vsp.receive(inband(PIPE_HEADER.pack(PIPE_PARTIAL, 12) + request[8:]))
    with pytest.raises(DeviceProtocolError, match="header says"):
        vsp.receive(inband(mouse.pack_message(mouse.MessageType.PROTOCOL_REQUEST, b"\x00\x00", size=4)))
    with pytest.raises(DeviceProtocolError, match="before PROTOCOL_REQUEST"):
        vsp.receive(inband(mouse.pack_message(mouse.MessageType.INITIAL_DEVICE_INFO_ACK, b"\x00")))
    vsp.receive(inband(request))
    with pytest.raises(DeviceProtocolError, match="empty body"):
        vsp.receive(inband(mouse.pack_message(mouse.MessageType.INITIAL_DEVICE_INFO_ACK, b"")))
    vsc = mouse.VscHandshake()
    vsc.start()
    approved = mouse.pack_message(mouse.MessageType.PROTOCOL_RESPONSE, mouse.ProtocolResponse(0x20000, 1).pack())
    vsc.receive(inband(approved))
    bad = mouse.InitialDeviceInfo(mouse.InputDevInfo(0x045E, 0x0621, 1), mouse.HidDescriptor(report_length=200),
                                  mouse.REPORT_DESCRIPTOR)
    with pytest.raises(DeviceProtocolError, match="overruns"):
        vsc.receive(inband(mouse.pack_message(mouse.MessageType.INITIAL_DEVICE_INFO, bad.pack())))


# --- keyboard ---------------------------------------------------------------------------------------------


def test_keyboard_golden_messages() -> None:
    vsc_sent, vsp_sent = wire(keyboard.VscHandshake(), keyboard.VspHandshake())
    assert vsc_sent[0].payload == bytes.fromhex("01 00 00 00 00 00 01 00")
    assert (vsc_sent[0].trans_id, vsc_sent[0].completion_requested) == (1, True)
    assert vsp_sent[0].payload == bytes.fromhex("02000000 01000000")


def test_keyboard_event_pack_unpack() -> None:
    event = keyboard.KeyEvent(0x1C, keyboard.KeystrokeFlags.IS_BREAK | keyboard.KeystrokeFlags.IS_E0)
    raw = keyboard.pack_message(keyboard.MessageType.EVENT, event.pack())
    assert raw == bytes.fromhex("03000000 1c00 0000 06000000")
    msg_type, body = keyboard.unpack_message(raw)
    assert msg_type == keyboard.MessageType.EVENT
    assert keyboard.KeyEvent.unpack(body) == event
    assert event.scancodes() == b"\xe0\x9c"
    assert keyboard.KeyEvent(0x1E).scancodes() == b"\x1e"
    with pytest.raises(DeviceProtocolError):
        keyboard.KeyEvent.unpack(body[:7])


def test_keyboard_malformed_input() -> None:
    vsp = keyboard.VspHandshake()
    with pytest.raises(DeviceProtocolError):
        vsp.receive(inband(b"\x01\x00", 1, True))
    with pytest.raises(DeviceProtocolError, match="PROTOCOL_REQUEST body"):
        vsp.receive(inband(b"\x01\x00\x00\x00\x00\x00", 1, True))
    with pytest.raises(DeviceProtocolError, match="before PROTOCOL_REQUEST"):
        vsp.receive(inband(keyboard.pack_message(keyboard.MessageType.LED_INDICATORS,
                                                 keyboard.LedIndicators(2).pack())))
    vsc = keyboard.VscHandshake()
    vsc.start()
    with pytest.raises(DeviceProtocolError, match="PROTOCOL_RESPONSE body"):
        vsc.receive(inband(b"\x02\x00\x00\x00\x01"))


# --- decoders never leak struct.error / IndexError ---------------------------------------------------------


@pytest.mark.parametrize(("module", "expected"), DEVICES, ids=DEVICE_IDS)
def test_truncated_packets_raise_only_device_protocol_error(module: ModuleType, expected: int) -> None:
    vsc_sent, vsp_sent = wire(module.VscHandshake(), module.VspHandshake())
    first_request, first_answer = vsc_sent[0], vsp_sent[0]
    for cut in range(len(first_request.payload)):
        packet = dataclasses.replace(incoming(first_request), payload=first_request.payload[:cut])
        with contextlib.suppress(DeviceProtocolError):
            module.VspHandshake().receive(packet)
    for cut in range(len(first_answer.payload)):
        vsc = module.VscHandshake()
        vsc.start()
        with contextlib.suppress(DeviceProtocolError):
            vsc.receive(dataclasses.replace(incoming(first_answer), payload=first_answer.payload[:cut]))


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_order_and_lookup() -> None:
    assert [spec.name for spec in registry.ALL] == ["storage", "network", "video", "keyboard", "mouse", "heartbeat"]
    assert registry.BY_CLASS[guids.SCSI].spec is storage.SPEC
    assert registry.BY_CLASS[guids.NETWORK].spec is network.SPEC
    assert registry.BY_CLASS[guids.SYNTHVID].spec is video.SPEC
    assert registry.BY_CLASS[guids.SYNTH_KEYBOARD].spec is keyboard.SPEC
    assert registry.BY_CLASS[guids.SYNTHHID_MOUSE].spec is mouse.SPEC
    assert registry.BY_CLASS[guids.HEARTBEAT].spec is heartbeat.SPEC
    assert len({e.spec.default_instance for e in registry.REGISTRY}) == len(registry.REGISTRY)
    assert len({e.spec.class_id for e in registry.REGISTRY}) == len(registry.REGISTRY)


def test_specs_carry_linux_ring_sizes_and_offer_flags() -> None:
    """Pages per direction, header page included, as a current x86 Linux guest opens them (vmbus-core.md §6.5):
    VMBUS_RING_SIZE adds no header page to a payload of 32 KiB or more; hyperv_fb passes RING_BUFSIZE as is.
    Max packet: storvsc/netvsc set max_pkt_size, hyperv_fb, hid-hyperv and hyperv-keyboard keep 4096."""
    table = {spec.name: (spec.pipe_mode, spec.mmio_megabytes, spec.ring_bytes // 4096, spec.max_packet)
             for spec in registry.ALL}
    assert table == {
        "storage": (False, 0, 32, 80),
        "network": (False, 0, 128, 4624),
        "video": (True, 8, 64, 4096),
        "keyboard": (False, 0, 9, 4096),
        "mouse": (True, 0, 9, 4096),
        "heartbeat": (True, 0, 4, 4096),
    }
    assert all(spec.ring_bytes % 4096 == 0 for spec in registry.ALL)
    assert str(video.SPEC.default_instance) == "5620e0c7-8062-4dce-aeb7-520c7ef76171"
    assert str(mouse.SPEC.default_instance) == "58f75a6d-d949-4320-99e1-a2a2576d581c"
    assert str(keyboard.SPEC.default_instance) == "d34b2567-b9b6-42b9-8778-0a4ec0b955bf"
