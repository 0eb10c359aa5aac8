"""The guest behaves as a current x86 Linux guest (vmbus-core.md §2.1, §3, §4.1, §6.5; device-protocols.md §3):
ring sizes per direction, the VMBus versions it tries and in which order, what INITIATE_CONTACT carries, what
decides a VERSION_RESPONSE, no UNLOAD below 3.0, the trace of VERSION_RESPONSE by version, hyperv_fb's synthvid
version choice, and a bus that cannot silently ignore a new core event."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from child_partition.bus import GuestBus
from child_partition.cli import build_parser
from child_partition.devices import vsc_classes
from child_partition.devices.video.vsc import VideoVsc
from child_partition.guest_memory import GUEST_PFN_BASE, GuestMemory
from vmbus_proto import client as c
from vmbus_proto import messages as m
from vmbus_proto.devices.video import synthvid
from vmbus_proto.ring import vmbus_ring_size
from vmbus_proto.versions import GUEST_ORDER, LINUX_VERSIONS, Version, guest_order

from .inmemory import GUEST_PAGES, Bus

PAGE = 4096


# ---- 1. ring sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("payload", "ring"), [
    (36 * 1024, 36 * 1024),  # hid-hyperv, hyperv-keyboard: 9 pages, the header comes out of the payload
    (128 * 1024, 128 * 1024),  # storvsc
    (128 * PAGE, 128 * PAGE),  # netvsc ring_size = 128 pages
    (32 * 1024, 32 * 1024),  # the threshold: 8 * sizeof(struct hv_ring_buffer)
    (16 * 1024, 20 * 1024),  # below it one header page is added
    (10 * 1024, 16 * 1024),  # and the sum is page-aligned
])
def test_vmbus_ring_size_is_linux_macro(payload: int, ring: int) -> None:
    assert vmbus_ring_size(payload) == ring, f"VMBUS_RING_SIZE({payload}) should be {ring}"


def test_each_vsc_opens_linux_ring_pages_per_direction() -> None:
    """The child's VSC for each class opens rings of these many pages per direction; echo keeps its size."""
    want = {"storage": 32, "network": 128, "video": 64, "keyboard": 9, "mouse": 9, "heartbeat": 4, "echo": 65}
    got = {cls.spec.name: cls.spec.ring_bytes // PAGE for cls in vsc_classes().values()}
    assert got == want


async def test_vsc_attach_shares_two_rings_of_spec_pages() -> None:
    """Vsc.attach allocates 2 x ring pages, opens with downstream offset = ring pages (video: 128 and 64)."""
    calls: dict[str, Any] = {}

    class FakeBus:
        trace = False
        core = SimpleNamespace(version=Version.WIN10_V5_3)

        async def create_gpadl(self, relid: int, pfns: list[int]) -> int:
            calls["pfns"] = pfns
            return 0xE1E10

        async def open_channel(self, relid: int, gpadl: int, pages: int, offset: int, userdata: bytes = b"",
                               name: str = "") -> Any:
            calls["open"] = (pages, offset)
            raise ConnectionResetError("stop here")

    offer = m.OfferChannel(if_type=synthvid.SPEC.class_id, if_instance=synthvid.SPEC.default_instance,
                           child_relid=3, connection_id=3)
    vsc = VideoVsc(FakeBus(), GuestMemory(1024 * PAGE), offer, _Log())  # type: ignore[arg-type]
    with pytest.raises(ConnectionResetError):
        await vsc.attach()
    assert len(calls["pfns"]) == 128 and calls["open"] == (128, 64)


class _Log:
    def bind(self, **_: Any) -> _Log:
        return self

    def info(self, *_: Any, **__: Any) -> None: ...

    def debug(self, *_: Any, **__: Any) -> None: ...

    def warning(self, *_: Any, **__: Any) -> None: ...

    def error(self, *_: Any, **__: Any) -> None: ...


# ---- 2. versions, INITIATE_CONTACT, VERSION_RESPONSE, UNLOAD ---------------------------------------------

def test_guest_tries_linux_versions_in_linux_order() -> None:
    assert [v.text for v in GUEST_ORDER] == ["5.3", "5.2", "5.1", "5.0", "4.1", "4.0", "3.0", "2.4"]
    assert Version.WIN7 not in GUEST_ORDER and Version.WS2008 not in GUEST_ORDER
    assert guest_order(Version.WIN10_V6_0) == LINUX_VERSIONS and LINUX_VERSIONS[0] == Version.WIN10_V6_0
    assert guest_order(Version.WIN10) == (Version.WIN10, Version.WIN8_1, Version.WIN8)
    with pytest.raises(ValueError, match=r"at most 1\.1"):
        guest_order(Version.WIN7)


def test_guest_asks_6_0_first_only_when_told() -> None:
    bus = Bus(guest_versions=guest_order(Version.WIN10_V6_0))
    bus.connect()
    assert bus.guest.version == Version.WIN10_V6_0
    parsed = build_parser().parse_args(["run", "--connect", "tcp://127.0.0.1:1", "--name", "vm",
                                        "--vmbus-max-version", "6.0"])
    assert parsed.vmbus_max_version[:2] == [Version.WIN10_V6_0, Version.WIN10_V5_3]
    parsed = build_parser().parse_args(["run", "--connect", "tcp://127.0.0.1:1", "--name", "vm",
                                        "--vmbus-version", "1.1"])
    assert parsed.vmbus_version == [Version.WIN7]  # older versions only when named


def test_a_win7_host_is_reached_only_when_asked() -> None:
    bus = Bus(host_versions={Version.WIN7})
    bus.connect()
    assert bus.guest.state == c.GuestConnState.FAILED
    bus = Bus(host_versions={Version.WIN7}, guest_versions=[Version.WIN8, Version.WIN7])
    bus.connect()
    assert bus.guest.version == Version.WIN7


def _contacts(versions: list[int]) -> list[m.InitiateContact]:
    g = c.GuestConnection(GUEST_PAGES, versions=versions)
    out = []
    g.connect()
    for _ in versions:
        (msg,) = g.messages()
        assert isinstance(msg, m.InitiateContact)
        out.append(msg)
        g.receive(m.VersionResponse(version_supported=0))
    return out


def test_initiate_contact_carries_interrupt_page_below_5_0_and_monitor_pages_always() -> None:
    by_version = {ic.vmbus_version_requested: ic for ic in _contacts(list(LINUX_VERSIONS))}
    for v, ic in by_version.items():
        assert (ic.monitor_page1, ic.monitor_page2) == (GUEST_PAGES.monitor_page1, GUEST_PAGES.monitor_page2), \
            f"{Version(v).text}: both monitor pages must be sent"
        assert ic.target_vcpu == 0
        want = 2 if v >= Version.WIN10_V5 else GUEST_PAGES.int_page  # msg_sint = 2 (VTL 0), else the page
        assert ic.interrupt_page == want, f"{Version(v).text}: union {ic.interrupt_page:#x}, want {want:#x}"
    assert GUEST_PAGES.int_page == 0x100 << 12  # guest physical addresses, not page numbers


def test_connection_pages_must_be_named() -> None:
    with pytest.raises(ValueError, match="guest physical address"):
        c.GuestConnection(c.ConnectionPages(0x1000, 0, 0))


def test_version_response_decided_by_version_supported_alone() -> None:
    """Linux vmbus_negotiate_version reads version_supported; connection_state is not checked."""
    g = c.GuestConnection(GUEST_PAGES)
    g.connect()
    g.messages()
    g.receive(m.VersionResponse(version_supported=1, connection_state=m.ConnectionState.FAILED_UNKNOWN_FAILURE,
                                msg_conn_id=1))
    assert g.state == c.GuestConnState.REQUESTING_OFFERS and g.version == Version.WIN10_V5_3
    assert g.messages() == [m.RequestOffers()]
    assert [type(e) for e in g.events()] == [c.VersionNegotiated]


@pytest.mark.parametrize(("version", "sends_unload"), [
    (Version.WIN8, False), (Version.WIN8_1, True), (Version.WIN10_V5_3, True), (Version.WIN7, False)])
def test_no_unload_below_3_0(version: Version, sends_unload: bool) -> None:
    bus = Bus(host_versions={version}, guest_versions=[version])
    bus.connect()
    assert bus.guest.version == version
    bus.guest.unload()
    sent = bus.guest.messages()
    assert (sent == [m.Unload()]) == sends_unload, f"{version.text}: sent {sent}"
    for msg in sent:
        bus.host.receive(m.decode(msg.encode()))
    bus.pump()
    assert bus.guest.state == c.GuestConnState.UNLOADED and bus.of(c.UnloadComplete)
    assert not bus.guest.outstanding


# ---- 3. VERSION_RESPONSE in the trace -----------------------------------------------------------------------

def test_version_response_describe_by_version() -> None:
    resp = m.VersionResponse(version_supported=1, msg_conn_id=1, supported_features=0)
    assert "supported_features" not in resp.describe(Version.WIN10_V5_3)  # the 16-byte VersionResponse
    assert "supported_features" not in resp.describe()
    assert resp.describe(Version.WIN10_V6_0).endswith("msg_conn_id=0x1 supported_features=0x0")  # VersionResponse2
    assert "supported_features" not in m.VersionResponse(version_supported=0).describe(Version.WIN10_V6_0)
    names = ["version_supported", "connection_state", "padding", "msg_conn_id"]
    assert [f.split("=")[0] for f in resp.describe(Version.WIN10_V5_3).split()[1:]] == names
    assert [f.split("=")[0] for f in resp.describe(Version.WIN10_V6_0).split()[1:]] == [*names, "supported_features"]
    assert (len(resp.to_binary(Version.WIN10_V5_3)), len(resp.to_binary(Version.WIN10_V6_0))) == (16, 20)


def test_guest_knows_which_version_a_response_answers() -> None:
    g = c.GuestConnection(GUEST_PAGES, versions=[Version.WIN10_V6_0, Version.WIN10_V5_3])
    assert g.contacting_version is None
    g.connect()
    assert g.contacting_version == Version.WIN10_V6_0
    g.receive(m.VersionResponse(version_supported=0))
    assert g.contacting_version == Version.WIN10_V5_3
    g.receive(m.VersionResponse(version_supported=1, msg_conn_id=1))
    assert g.contacting_version is None


async def test_bus_traces_version_response_for_the_version_asked() -> None:
    lines: list[str] = []

    class Log(_Log):
        def info(self, event: str, *_: Any, **__: Any) -> None:
            lines.append(event)

    bus = GuestBus("vm", trace=True, versions=[Version.WIN10_V6_0], memory=GuestMemory(16 * PAGE), log=Log())
    bus.hello_future.set_result(None)  # type: ignore[arg-type]
    bus.core.connect()
    bus.core.messages()
    bus.on_control(SimpleNamespace(body=m.VersionResponse(version_supported=1, msg_conn_id=1).encode()))
    assert lines[0].startswith("H>G CHANNELMSG_VERSION_RESPONSE(15)") and "supported_features=0x0" in lines[0]


# ---- 4. synthvid version by VMBus version ------------------------------------------------------------------

@pytest.mark.parametrize(("vmbus", "synthvid_versions"), [
    (Version.WIN10, ["3.5", "3.2"]), (Version.WIN10_V5, ["3.5", "3.2"]),
    (Version.WIN8, ["3.2"]), (Version.WIN8_1, ["3.2"]),
    (Version.WIN10_V4_1, ["3.5"]), (Version.WIN10_V5_1, ["3.5"]), (Version.WIN10_V5_2, ["3.5"]),
    (Version.WIN10_V5_3, ["3.5"]), (Version.WIN10_V6_0, ["3.5"]), (Version.WIN7, ["3.5"]),
])
def test_synthvid_versions_as_hyperv_fb(vmbus: Version, synthvid_versions: list[str]) -> None:
    assert [synthvid.version_text(v) for v in synthvid.linux_versions(vmbus)] == synthvid_versions
    offer = m.OfferChannel(if_type=synthvid.SPEC.class_id, if_instance=synthvid.SPEC.default_instance,
                           child_relid=3, connection_id=3)
    bus = SimpleNamespace(core=SimpleNamespace(version=vmbus), trace=False)
    hs = VideoVsc(bus, GuestMemory(4 * PAGE), offer, _Log()).new_handshake()  # type: ignore[arg-type]
    assert isinstance(hs, synthvid.VscHandshake)
    assert [synthvid.version_text(v) for v in hs.versions] == synthvid_versions


def test_synthvid_max_packet_is_the_default() -> None:
    assert synthvid.SPEC.max_packet == 4096 and synthvid.SPEC.ring_bytes == 256 * 1024


# ---- 5. the bus consumes every core event ------------------------------------------------------------------

async def test_bus_refuses_an_unknown_core_event() -> None:
    bus = GuestBus("vm", memory=GuestMemory(16 * PAGE))
    with pytest.raises(AssertionError):
        bus._handle_event(object())  # type: ignore[arg-type]
    bus._handle_event(c.AllOffersDelivered())  # a known one is consumed


async def test_bus_takes_its_three_pages_from_guest_memory_and_returns_them() -> None:
    memory = GuestMemory(16 * PAGE)
    bus = GuestBus("vm", memory=memory)
    assert bus.connection_pfns == [GUEST_PFN_BASE, GUEST_PFN_BASE + 1, GUEST_PFN_BASE + 2]
    bus.core.connect()
    (ic,) = bus.core.messages()
    assert isinstance(ic, m.InitiateContact)
    assert (ic.monitor_page1, ic.monitor_page2) == ((GUEST_PFN_BASE + 1) << 12, (GUEST_PFN_BASE + 2) << 12)
    bus.on_connection_lost(None)
    assert memory.alloc(16)[0] == GUEST_PFN_BASE, "the bus's pages went back to guest memory"


def test_request_and_gpadl_states_are_enums() -> None:
    bus = Bus()
    bus.connect()
    relid = bus.of(c.OfferReceived)[0].offer.child_relid
    gid = bus.guest.create_gpadl(relid, list(range(0x2000, 0x2008)))
    assert bus.guest.channels[relid].gpadls[gid] is c.GpadlState.CREATING
    assert bus.guest.outstanding == [(c.Request.GPADL, gid)]
    bus.guest.handle_timer(1e9)
    assert bus.guest.events() == [c.TimedOut(c.Request.GPADL, gid)]
