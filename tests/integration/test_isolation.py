"""Isolation between partitions over real sockets (issue 12): each connection has its own relid space and its
own GPADL ids, so a child cannot open, close, signal, send packets on or tear down another partition's
channels and GPADLs. The module's bystander child must never notice."""

from __future__ import annotations

import asyncio
import io
import itertools
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from child_partition.bus import GuestBus
from child_partition.devices.video.framebuffer import Framebuffer
from child_partition.devices.video.vsc import VideoVsc
from child_partition.guest_memory import GuestMemory
from child_partition.runner import open_bus
from vmbus_proto import messages as m
from vmbus_proto.aio import logs
from vmbus_proto.aio.keyfile import new_secret_file, read_secret_file
from vmbus_proto.devices.storage import vstor
from vmbus_proto.envelope import Signal
from vmbus_proto.gpadl import split
from vmbus_proto.guids import SYNTH_KEYBOARD, SYNTHVID
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, GpaRange, Packet, PacketType

from .conftest import FAST_LIMITS, Parent, Proc, child
from .rawclient import Closed, RawClient

pytestmark = pytest.mark.integration
PAGES = 10  # ring pages per direction
RING = 0xA1  # both partitions use this GPADL id for their own ring
_names = itertools.count(1)


@pytest.fixture
def p(survived_parent: Parent) -> Parent:
    return survived_parent


def _keyboard(c: RawClient, name: str) -> int:
    offers = c.negotiate(name)
    return next(r for r, o in offers.items() if o.if_type == SYNTH_KEYBOARD)


def _a_with_open_keyboard(p: Parent) -> tuple[RawClient, str, int]:
    name = f"iso-a-{next(_names)}"
    a = RawClient(p.tcp)
    relid = _keyboard(a, name)
    a.open(relid, PAGES, RING)
    return a, name, relid


def _still_open(p: Parent, a: RawClient, name: str, relid: int, mark: int) -> None:
    """A closes its channel and the parent closes it: it was A's and open until now."""
    a.send(m.CloseChannel(child_relid=relid))
    p.wait_event("channel closed", start=mark, partition=name, relid=relid)
    a.close()


def test_relids_and_gpadl_ids_belong_to_their_connection(p: Parent) -> None:
    a, name_a, relid = _a_with_open_keyboard(p)
    mark = p.mark()
    b = RawClient(p.tcp)
    name_b = f"iso-b-{next(_names)}"
    assert _keyboard(b, name_b) == relid, "both partitions are offered the keyboard under the same relid"
    # A's GPADL id is unknown on B's connection: opening with it fails, tearing it down is dropped.
    b.send(m.OpenChannel(child_relid=relid, openid=1, ringbuffer_gpadlhandle=RING,
                         downstream_ringbuffer_pageoffset=PAGES))
    assert b.expect(m.OpenChannelResult).status != 0, "B opened a channel with A's ring GPADL"
    b.send(m.GpadlTeardown(child_relid=relid, gpadl=RING))
    p.wait_event("control message dropped", start=mark, partition=name_b, kind="gpadl_not_accepted")
    b.send(m.CloseChannel(child_relid=relid))
    p.wait_event("control message dropped", start=mark, partition=name_b, kind="wrong_state")
    # The same relid and GPADL id on B are B's own: its open succeeds while A's channel stays open.
    b.open(relid, PAGES, RING)
    p.wait_event("channel open", start=mark, partition=name_b, relid=relid)
    _still_open(p, a, name_a, relid, mark)
    b.close()


def test_packets_and_signals_on_anothers_channel_never_reach_it(p: Parent) -> None:
    a, name_a, relid = _a_with_open_keyboard(p)
    mark = p.mark()
    b = RawClient(p.tcp)
    name_b = f"iso-b-{next(_names)}"
    _keyboard(b, name_b)
    b.signal(relid, Signal(ring=0, write_index=64))
    b.send_packet(relid, Packet(PacketType.DATA_INBAND, 0, 1, b"\x00" * 16))
    # Dropped as frames for B's own channel, which B never opened.
    for kind in ("SIGNAL", "PACKET"):
        p.wait_event("frame for a channel that is not open dropped", start=mark, partition=name_b, relid=relid,
                     kind=kind)
    _still_open(p, a, name_a, relid, mark)
    b.close()


def test_the_bystander_never_noticed(p: Parent, bystander: Proc) -> None:
    assert bystander.proc.poll() is None and not bystander.events("session with the parent ended")


# ---- guest memory: the pages a partition may name (docs/protocol.md §7.4) --------------------------------

MEMORY = 64 << 20  # what the raw guests below declare: pages below 0x4000
BOUND = MEMORY // 4096


def _storage_ready(c: RawClient, name: str, memory: int | None = MEMORY) -> int:
    """Connect as ``name``, open the storage channel and finish the VSTOR handshake; its relid."""
    offers = c.negotiate(name, memory=memory)
    relid = next(r for r, o in offers.items() if o.if_type == vstor.SPEC.class_id)
    c.open(relid, vstor.SPEC.ring_bytes // 4096, gpadl=0xE1E10)
    c.handshake(relid, vstor.VscHandshake())
    return relid


def _read_srb(trans_id: int, pfn: int, *, path: int = 0, target: int = 0, lun: int = 0) -> Packet:
    """A READ(10) of the first 4 KiB into page ``pfn`` of the guest, at (path, target, LUN)."""
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
    srb = vstor.VmscsiRequest(cdb_length=10, data_in=vstor.DataDirection.READ, data_transfer_length=4096,
                              data=cdb.ljust(20, b"\0"), path_id=path, target_id=target, lun=lun)
    return Packet(PacketType.DATA_USING_GPA_DIRECT, FLAG_COMPLETION_REQUESTED, trans_id,
                  vstor.pack_request(vstor.Operation.EXECUTE_SRB, srb.pack()), ranges=(GpaRange(4096, 0, (pfn,)),))


def test_a_gpa_direct_range_beyond_the_partitions_memory_is_refused(p: Parent) -> None:
    c = RawClient(p.tcp)
    name = f"iso-gpa-{next(_names)}"
    relid = _storage_ready(c, name)
    c.send_packet(relid, _read_srb(1, BOUND - 1))  # the last page of its memory: served
    done = c.recv_packet(relid)
    assert done.type == PacketType.COMP and len(done.data) == 4096, "a READ into the last guest page failed"
    mark = p.mark()
    c.send_packet(relid, _read_srb(2, BOUND))  # the first page beyond it: Hyper-V refuses it
    reason = c.wait_closed()
    assert reason is not None and f"names page {BOUND:#x}, outside the partition's guest memory" in reason, reason
    p.wait_for(lambda r: r.get("event") == "protocol error, closing connection" and r.get("partition") == name
               and "outside the partition's guest memory" in str(r.get("error")), start=mark)


def test_a_gpadl_beyond_the_partitions_memory_fails(p: Parent) -> None:
    c = RawClient(p.tcp)
    name = f"iso-gpadl-{next(_names)}"
    relid = _keyboard_relid(c.negotiate(name, memory=MEMORY))
    mark = p.mark()
    for gid, first in ((0x71, BOUND - 40), (0x72, BOUND - 39)):  # 40 pages: a GPADL_HEADER and a GPADL_BODY
        header, bodies = split(relid, gid, list(range(first, first + 40)))
        for msg in [header, *bodies]:
            c.send(msg)
        created = c.expect(m.GpadlCreated)
        assert created.gpadl == gid and (created.creation_status == 0) == (gid == 0x71), created
    p.wait_event("control message dropped", start=mark, partition=name, kind="gpa_outside_memory")
    # The refusal is the GPADL's alone: the connection and its good GPADL go on.
    c.send(m.OpenChannel(child_relid=relid, openid=1, ringbuffer_gpadlhandle=0x71,
                         downstream_ringbuffer_pageoffset=20))
    assert c.expect(m.OpenChannelResult).status == 0, "the GPADL inside guest memory could not carry a ring"
    c.close()


def test_a_hello_without_memory_keeps_any_page_and_a_declared_one_is_capped(p: Parent) -> None:
    c = RawClient(p.tcp)
    relid = _storage_ready(c, f"iso-old-{next(_names)}", memory=None)
    c.send_packet(relid, _read_srb(1, 0x7FFF_FFFF))  # a HELLO of earlier releases: no memory map declared
    assert c.recv_packet(relid).type == PacketType.COMP
    c.close()
    big = RawClient(p.tcp)
    name = f"iso-big-{next(_names)}"
    mark = p.mark()
    relid = _storage_ready(big, name, memory=1 << 40)
    p.wait_event("guest memory capped", start=mark, partition=name, declared=1 << 40, cap=4 << 30)
    big.send_packet(relid, _read_srb(1, (4 << 30) // 4096))
    assert "outside the partition's guest memory" in str(big.wait_closed())


def _keyboard_relid(offers: dict[int, m.OfferChannel]) -> int:
    return next(r for r, o in offers.items() if o.if_type == SYNTH_KEYBOARD)


# ---- disks ---------------------------------------------------------------------------------------------

def test_scsi_addresses_beyond_the_partitions_own_disk_reach_nothing(p: Parent) -> None:
    """Every (path, target, LUN) a VSTOR request can name is looked up in the partition's own controller:
    another address is an error, never another partition's disk."""
    c = RawClient(p.tcp)
    relid = _storage_ready(c, f"iso-lun-{next(_names)}")
    for i, (path, target, lun) in enumerate([(0, 0, 1), (0, 0, 63), (0, 1, 0), (1, 0, 0), (0xFF, 0xFF, 0xFF)]):
        c.send_packet(relid, _read_srb(10 + i, 0x200, path=path, target=target, lun=lun))
        done = c.recv_packet(relid)
        status = vstor.unpack_execute_srb(done.payload).srb_status & 0x3F
        assert status != vstor.SrbStatus.SUCCESS and not done.data, \
            f"a READ at path {path} target {target} LUN {lun} succeeded with {len(done.data)} bytes"
    c.send_packet(relid, _read_srb(99, 0x200))
    assert c.recv_packet(relid).data == bytes(4096), "the partition's own new disk does not read as zeros"
    c.close()


# ---- framebuffers --------------------------------------------------------------------------------------

def _pattern(size: tuple[int, int], seed: int) -> Image.Image:
    """A picture no other seed draws: every pixel a function of its place and ``seed``."""
    w, h = size
    data = bytes(v for y in range(h) for x in range(w)
                 for v in ((x * seed) & 0xFF, (y + seed * 40) & 0xFF, (x ^ y ^ seed) & 0xFF))
    return Image.frombytes("RGB", size, data)


async def _screen(api: str, name: str) -> Image.Image | None:
    def get() -> bytes | None:
        try:
            with urllib.request.urlopen(f"{api}/api/partitions/{name}/screen.png", timeout=10) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError:
            return None  # no screen yet
    png = await asyncio.to_thread(get)
    return Image.open(io.BytesIO(png)).convert("RGB") if png is not None else None


async def _shows(api: str, name: str, want: Image.Image, timeout: float = 60.0) -> None:
    """Until the API's picture of ``name``'s screen is ``want``, pixel for pixel."""
    deadline = time.monotonic() + timeout
    while True:
        got = await _screen(api, name)
        if got is not None and got.size == want.size and got.tobytes() == want.tobytes():
            return
        if time.monotonic() > deadline:
            wrong = "no screen" if got is None else f"size {got.size}" if got.size != want.size else _differ(got, want)
            raise AssertionError(f"{name}'s screen via the API is not what it drew: {wrong}")
        await asyncio.sleep(0.1)


def _differ(got: Image.Image, want: Image.Image) -> str:
    g, w = got.tobytes(), want.tobytes()
    bad = [i // 3 for i in range(0, len(w), 3) if g[i:i + 3] != w[i:i + 3]]
    x, y = bad[0] % want.width, bad[0] // want.width
    return f"{len(bad)} pixels differ, the first at ({x}, {y}): {tuple(g[bad[0] * 3:bad[0] * 3 + 3])}"


async def _video_guest(url: str, name: str) -> tuple[GuestBus, VideoVsc, Framebuffer]:
    memory = GuestMemory(MEMORY)
    bus = await open_bus(url, name, log=logs.get(partition=name), memory=memory)
    offers = await asyncio.wait_for(bus.negotiate(), 30)
    vsc = VideoVsc(bus, memory, next(o for o in offers.values() if o.if_type == SYNTHVID), logs.get(partition=name))
    await asyncio.wait_for(vsc.attach(), 30)
    fb = vsc.framebuffer
    assert fb is not None
    fb.set_pointer(0, 0, visible=False)  # Linux's 1x1 pointer would be painted into the API's picture
    return bus, vsc, fb


async def test_each_partition_draws_only_into_its_own_screen(tmp_path: Path) -> None:
    """Two guests place their VRAM GPADLs at the same guest page numbers and damage the whole screen; the
    API's picture of each is exactly what that one drew, before and after the other draws again."""
    parent = Parent(tmp_path / "parent", FAST_LIMITS, extra=["--http", "127.0.0.1:0"])
    try:
        api = parent.wait_event("web console and API listening")["url"]
        a_name, b_name = f"iso-fb-a-{next(_names)}", f"iso-fb-b-{next(_names)}"
        (a, va, fb_a), (b, vb, fb_b) = await _video_guest(parent.unix, a_name), await _video_guest(parent.tcp, b_name)
        assert va.vram_pfns == vb.vram_pfns, "the two VRAMs are not at the same guest pages"
        pa, pb = _pattern(fb_a.size, 3), _pattern(fb_b.size, 7)
        fb_a.draw(pa)
        fb_b.draw(pb)
        await _shows(api, a_name, pa)
        await _shows(api, b_name, pb)
        pb2 = _pattern(fb_b.size, 11)
        fb_b.draw(pb2)
        await _shows(api, b_name, pb2)
        await _shows(api, a_name, pa, timeout=1.0)
        for bus in (a, b):
            bus.close()
    finally:
        parent.stop()


def test_names_that_differ_only_in_case_or_a_trailing_dot_get_their_own_disks(tmp_path: Path) -> None:
    """Real children, each writing its own pattern through its NBD export: every one reads back only its own,
    and the parent keeps one image each, inside its data directory (where case or a trailing '.' is ignored,
    too: the directory names differ in more than that)."""
    parent = Parent(tmp_path / "parent", FAST_LIMITS)
    vms: list[Proc] = []
    try:
        names = {"iso-disk": 0x11, "ISO-DISK": 0x22, "iso-disk.": 0x33}
        socks = {}
        for name, byte in names.items():
            sock = tmp_path / f"{len(socks)}.nbd"
            vms.append(child(tmp_path, parent.unix, name, "--nbd", f"unix:{sock}", "--no-console"))
            vms[-1].wait_event("disk exported over NBD")
            socks[name] = sock
            _qemu_io(sock, f"write -P {byte} 0 64k")
        for name, byte in names.items():
            _qemu_io(socks[name], f"read -P {byte} 0 64k")
        var = tmp_path / "parent" / "var"
        images = sorted(var.rglob("lun0.img"))
        dirs = {img.parent.name.casefold().rstrip(".") for img in images}
        assert len(images) == len(dirs) == 3 and all(img.parent.parent == var for img in images), images
        for vm in vms:
            assert vm.stop() == 0
    finally:
        for vm in vms:
            vm.stop()
        parent.stop()


def _qemu_io(sock: Path, command: str) -> None:
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", command, f"nbd+unix:///?socket={sock}"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, \
        f"qemu-io {command!r}: {proc.stdout.strip()} {proc.stderr.strip()}"


def test_a_departed_partitions_disk_is_not_an_impostors(tmp_path: Path) -> None:
    """``[auth] mode = "required"``: vm1 writes its disk and leaves; newcomers under its name without its
    secret are refused before any channel opens; vm1 comes back and finds its data."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    secret, wrong = new_secret_file(keys / "vm1.key"), new_secret_file(keys / "wrong.key")
    parent = Parent(tmp_path / "parent", f'{FAST_LIMITS}\n[auth]\nmode = "required"\n'
                                         f'[[auth.partition]]\nname = "vm1"\nsecret_file = "{secret}"\n')
    try:
        sock = tmp_path / "vm1.nbd"
        args = ("--secret-file", str(secret), "--nbd", f"unix:{sock}", "--no-console")
        vm1 = child(tmp_path, parent.unix, "vm1", *args)
        vm1.wait_event("disk exported over NBD")
        _qemu_io(sock, "write -P 0x5a 0 64k")
        assert vm1.stop() == 0
        mark = parent.mark()
        for label, attempt in (("no secret", lambda c: c.negotiate("vm1")),
                               ("a wrong secret", lambda c: c.authenticate("vm1", read_secret_file(wrong)))):
            impostor = RawClient(parent.tcp)
            with pytest.raises((Closed, ConnectionResetError, AssertionError)):
                attempt(impostor)
                pytest.fail(f"an impostor with {label} was accepted as vm1")
            assert impostor.close_code in ("auth", "auth-failed"), (label, impostor.close_reason)
            impostor.close()
        assert not [r for r in parent.lines[mark:] if r.get("partition") == "vm1"
                    and r.get("event") in ("partition connected", "channel open")], "an impostor got vm1's channels"
        vm1 = child(tmp_path, parent.unix, "vm1", *args)
        vm1.wait_event("disk exported over NBD")
        _qemu_io(sock, "read -P 0x5a 0 64k")
        assert vm1.stop() == 0
    finally:
        parent.stop()
