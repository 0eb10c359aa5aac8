"""The teaching trace of device handshakes: real message names and numbers, versions as people write them."""

from __future__ import annotations

import pytest

from vmbus_proto.devices.base import HandshakeTrace, Incoming, Outgoing
from vmbus_proto.devices.input import keyboard, mouse
from vmbus_proto.devices.network import nvsp as network
from vmbus_proto.devices.storage import vstor as storage
from vmbus_proto.devices.video import synthvid as video
from vmbus_proto.packets import PacketType


def run_traced(module: object) -> list[str]:
    """Wire a device's VSC and VSP handshakes together and trace every packet from the guest's side."""
    vsc, vsp = module.VscHandshake(), module.VspHandshake()  # type: ignore[attr-defined]
    trace = HandshakeTrace(module.describe)  # type: ignore[attr-defined]
    lines: list[str] = []
    to_host: list[Outgoing] = list(vsc.start())
    for _ in range(20):
        if not to_host:
            break
        to_guest: list[Outgoing] = []
        for out in to_host:
            lines.append(trace.sent("G>H", out))
            to_guest += vsp.receive(Incoming(out.type, out.trans_id, out.completion_requested, out.payload))
        to_host = []
        for out in to_guest:
            pkt = Incoming(out.type, out.trans_id, out.completion_requested, out.payload)
            lines.append(trace.received("H>G", pkt))
            to_host += vsc.receive(pkt)
    assert vsc.done and vsp.done, "the handshake did not finish"
    return lines


@pytest.mark.parametrize(("module", "expected"), [
    (storage, ["G>H VSTOR_OPERATION_BEGIN_INITIALIZATION(7)",
               "H>G VSTOR_OPERATION_COMPLETE_IO(1) status=STATUS_SUCCESS(0x00000000) for BEGIN_INITIALIZATION(7)",
               "G>H VSTOR_OPERATION_QUERY_PROTOCOL_VERSION(9) version=6.2",
               "H>G VSTOR_OPERATION_COMPLETE_IO(1) status=STATUS_SUCCESS(0x00000000) for QUERY_PROTOCOL_VERSION(9)"
               " version=6.2",
               "G>H VSTOR_OPERATION_QUERY_PROPERTIES(10)",
               "H>G VSTOR_OPERATION_COMPLETE_IO(1) status=STATUS_SUCCESS(0x00000000) for QUERY_PROPERTIES(10)"
               " max_channel_cnt=0 flags=0x1 max_transfer_bytes=262144",
               "G>H VSTOR_OPERATION_END_INITIALIZATION(8)",
               "H>G VSTOR_OPERATION_COMPLETE_IO(1) status=STATUS_SUCCESS(0x00000000) for END_INITIALIZATION(8)"]),
    (network, ["G>H NVSP_MSG_TYPE_INIT(1) min_protocol_ver=6.1 max_protocol_ver=6.1",
               "H>G NVSP_MSG_TYPE_INIT_COMPLETE(2) status=NVSP_STAT_SUCCESS(1) max_mdl_chain_len=34 for version 6.1"]),
    (video, ["G>H SYNTHVID_VERSION_REQUEST(1) version=3.5",
             "H>G SYNTHVID_VERSION_RESPONSE(2) version=3.5 is_accepted=2 max_video_outputs=1"]),
    (mouse, ["G>H SYNTH_HID_PROTOCOL_REQUEST(0) version=2.0",
             "H>G SYNTH_HID_PROTOCOL_RESPONSE(1) version_requested=2.0 approved=1",
             "H>G SYNTH_HID_INITIAL_DEVICE_INFO(2) vendor=0x045e product=0x0621 report_descriptor=67 bytes",
             "G>H SYNTH_HID_INITIAL_DEVICE_INFO_ACK(3)"]),
    (keyboard, ["G>H SYNTH_KBD_PROTOCOL_REQUEST(1) version=1.0",
                "H>G SYNTH_KBD_PROTOCOL_RESPONSE(2) proto_status=0x1 (ACCEPTED)"]),
])
def test_handshake_trace_names_each_message(module: object, expected: list[str]) -> None:
    lines = [line.split("  [")[0] for line in run_traced(module)]
    assert lines == expected


def test_trace_line_shows_the_vmbus_packet_framing() -> None:
    line = run_traced(network)[0]
    assert line.endswith("[VM_PKT_DATA_INBAND, trans_id=0x1, completion requested]"), line
    assert run_traced(network)[1].endswith("[VM_PKT_COMP, trans_id=0x1]")


def test_a_refused_version_reads_as_refused_and_the_next_one_follows() -> None:
    vsc, vsp = storage.VscHandshake(), storage.VspHandshake(supported={storage.Version.WIN8_1})
    trace = HandshakeTrace(storage.describe)
    lines, out = [], vsc.start()
    while out:
        (req,) = out
        lines.append(trace.sent("G>H", req))
        (comp,) = vsp.receive(Incoming(req.type, req.trans_id, True, req.payload))
        pkt = Incoming(comp.type, comp.trans_id, False, comp.payload)
        lines.append(trace.received("H>G", pkt))
        out = vsc.receive(pkt)
    assert any("STATUS_REVISION_MISMATCH(0xc0000059) for QUERY_PROTOCOL_VERSION(9) version=6.2" in x for x in lines)
    assert any("QUERY_PROTOCOL_VERSION(9) version=6.0" in x for x in lines)


def test_undecodable_packets_are_described_not_raised() -> None:
    trace = HandshakeTrace(video.describe)
    line = trace.line("H>G", PacketType.DATA_INBAND, 0, False, b"\x01")
    assert "undecodable (1 bytes" in line
    assert "UNKNOWN(99)" in keyboard.describe(keyboard.pack_message(99, b""))


@pytest.mark.parametrize(("spec", "version", "text"), [
    (storage.SPEC, 0x0602, "6.2"), (storage.SPEC, 0x0501, "5.1"), (network.SPEC, 0x60001, "6.1"),
    (network.SPEC, 0x30002, "2"), (video.SPEC, 0x50003, "3.5"), (video.SPEC, 0x20003, "3.2"),
    (mouse.SPEC, 0x20000, "2.0"), (keyboard.SPEC, 0x10000, "1.0"),
])
def test_version_text_is_how_the_readme_names_versions(spec: storage.DeviceSpec, version: int, text: str) -> None:
    assert spec.version_text(version) == text
