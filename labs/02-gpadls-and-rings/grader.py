"""Lab 2's grader: the student's GPADL split and ring accounting, fed edge cases and compared with the project's
pure core (vmbus_proto/gpadl.py, vmbus_proto/ring.py, vmbus_proto/packets.py) and with values worked out by hand
from Linux's arithmetic (so a mistake the core and the student shared would still show). One step runs a real
child partition with the student's ``split()`` against a real parent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labs.harness import Context, Failed, Lab, Step, import_file, parent
from labs.harness import answers as read_answers
from vmbus_proto import gpadl as core_gpadl
from vmbus_proto.errors import LocalProtocolError
from vmbus_proto.packets import packet_ring_size
from vmbus_proto.ring import RingReader, RingWriter

HERE = Path(__file__).resolve().parent
RELID, GID = 7, 0xE1E10
# Edge cases: nothing, one page, a full header, one PFN into the first body, a full first body, one PFN into
# the second, full second, storvsc's ring GPADL (64), a netvsc buffer (4096), the u16 limit and one past it.
PFN_COUNTS = (1, 25, 26, 27, 54, 55, 82, 83, 64, 4096, 8190)
# Linux create_gpadl_header: header holds 26, bodies 28; byte_count = pages * 4096; range_buflen = 8 + 8 * pages.
FIXED_SPLIT = {1: 0, 26: 0, 27: 1, 54: 1, 55: 2, 64: 2, 82: 2, 83: 3, 4096: 146, 8190: 292}


def _pfns(n: int) -> list[int]:
    return [0x1000 + 3 * i for i in range(n)]  # not consecutive: a split that invents PFNs shows


def _call_split(mod: Any, n: int) -> Any:
    return mod.split(RELID, GID, _pfns(n))


def _diff(got: Any, want: Any) -> str:
    """The fields that differ, as ``name: yours -> expected`` (PFN lists by their length and ends)."""
    if type(got) is not type(want):
        return f"is a {type(got).__name__}, expected a {type(want).__name__}"
    out = []
    for name in want.__dataclass_fields__:
        a, b = getattr(got, name), getattr(want, name)
        if a != b:
            if name == "pfns":
                a, b = _pfn_text(a), _pfn_text(b)
            out.append(f"{name}: {a} -> expected {b}")
    return "; ".join(out)


def _pfn_text(pfns: Any) -> str:
    pfns = list(pfns)
    return f"{len(pfns)} PFNs" + (f" {pfns[0]:#x}..{pfns[-1]:#x}" if pfns else "")


def _check_split(mod: Any, counts: tuple[int, ...]) -> None:
    for n in counts:
        header, bodies = _call_split(mod, n)
        want_h, want_b = core_gpadl.split(RELID, GID, _pfns(n))
        if header != want_h:
            raise Failed(f"{n} PFNs: GPADL_HEADER {_diff(header, want_h)}")
        if len(bodies) != len(want_b):
            raise Failed(f"{n} PFNs: {len(bodies)} GPADL_BODY messages, expected {len(want_b)}")
        for i, (got, want) in enumerate(zip(bodies, want_b, strict=True)):
            if got != want:
                raise Failed(f"{n} PFNs: GPADL_BODY {i} {_diff(got, want)}")
        linux = (FIXED_SPLIT.get(n, len(bodies)), 8 + 8 * n, ((n * 4096, 0),))
        if (len(bodies), header.range_buflen, header.ranges) != linux:
            raise Failed(f"{n} PFNs: Linux sends {linux[0]} bodies, range_buflen {linux[1]}, one range {linux[2][0]}")


def split_header_only(ctx: Context) -> None:
    mod = ctx.load("gpadl")
    _check_split(mod, (1, 25, 26))
    try:
        _call_split(mod, 0)
    except ValueError:
        pass
    else:
        raise Failed("split() of 0 PFNs returned; a GPADL needs at least one page (raise ValueError)")


def split_with_bodies(ctx: Context) -> None:
    mod = ctx.load("gpadl")
    _check_split(mod, tuple(n for n in PFN_COUNTS if n > 26))
    try:
        _call_split(mod, 8191)
    except (ValueError, LocalProtocolError):
        pass
    else:
        raise Failed("split() of 8191 PFNs returned; range_buflen (a u16) cannot describe them (raise ValueError)")


def wire_layout(ctx: Context) -> None:
    mod = ctx.load("gpadl")
    # Fixed bytes from hyperv.h's structs, written out by hand: 30 PFNs from 0x100, relid 1, GPADL 0xe1e10.
    pfns = list(range(0x100, 0x100 + 30))
    header, bodies = core_gpadl.split(1, 0xE1E10, pfns)
    want_head = bytes.fromhex("08000000" "00000000" "01000000" "101e0e00" "f800" "0100" "00e00100" "00000000"
                              "0001000000000000")
    got = mod.encode_header(header)
    if got[:len(want_head)] != want_head:
        raise Failed(f"encode_header starts\n    {got[:len(want_head)].hex(' ', 4)}\n  expected\n    "
                     f"{want_head.hex(' ', 4)}\n  (msgtype, padding, child_relid, gpadl, range_buflen+rangecount, "
                     "byte_count, byte_offset, first PFN)")
    want_body = bytes.fromhex("09000000" "00000000" "00000000" "101e0e00" "1a01000000000000")
    got = mod.encode_body(bodies[0])
    if got[:len(want_body)] != want_body:
        raise Failed(f"encode_body starts {got[:len(want_body)].hex(' ', 4)}, expected {want_body.hex(' ', 4)}")
    for n in PFN_COUNTS:
        header, bodies = core_gpadl.split(RELID, GID, _pfns(n))
        for msg, enc in [(header, mod.encode_header), *((b, mod.encode_body) for b in bodies)]:
            got, want = enc(msg), msg.to_binary()
            if got != want:
                raise Failed(f"{n} PFNs: {type(msg).__name__} encodes to {len(got)} bytes, expected {len(want)}: "
                             f"first difference at byte {_first_diff(got, want)}")
            if len(got) > 240:
                raise Failed(f"{type(msg).__name__} of {len(got)} bytes: a channel message holds at most 240")


def _first_diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _patched_child() -> Any:
    return import_file(HERE / "patched_child.py", "_lab2_patched_child")


def real_parent(ctx: Context) -> None:
    _call_split(ctx.load("gpadl"), 30)  # not written yet: fail here, before starting processes
    with parent(ctx.tmp) as (_, url):
        asked = _patched_child().check(ctx.code, url, ctx.tmp / "lab2.log")
    if len(asked) < 6:
        raise Failed(f"only {len(asked)} GPADLs went through your split(); the child shares at least six")


def _core_free(w: int, r: int, ds: int) -> RingWriter:
    wr = RingWriter(ds)
    if r:
        wr.write(r)
    wr.update(r, 0)
    if (w - r) % ds:
        wr.write((w - r) % ds)
    return wr


PACKETS = {0: 24, 1: 32, 7: 32, 8: 32, 9: 40, 100: 128, 4072: 4096, 65536: 65560}
# (write_index, read_index, data_size) -> hv_get_bytes_to_write
FREE = {(0, 0, 4096): 4096, (128, 0, 4096): 3968, (0, 128, 4096): 128, (4088, 8, 4096): 16,
        (8, 4088, 4096): 4080, (4000, 200, 4096): 296, (65528, 65528, 65536): 65536}
# (w, r, data_size, size) -> may it be written: strictly less than the free bytes
CAN = {(0, 0, 4096, 4096): False, (0, 0, 4096, 4088): True, (3968, 0, 4096, 128): False,
       (3960, 0, 4096, 128): True, (4000, 200, 4096, 280): True, (4000, 200, 4096, 296): False,
       (8, 16, 4096, 8): False}
NEXT = {(4000, 280, 4096): 184, (0, 128, 4096): 128, (3968, 128, 4096): 0}


def ring_packet_size(ctx: Context) -> None:
    mod = ctx.load("ring")
    for n, want in PACKETS.items():
        got = mod.packet_size(n)
        if got != want or got != packet_ring_size(n):
            raise Failed(f"packet_size({n}) = {got}, expected {want}: 16-byte descriptor + payload padded to 8 "
                         "+ 8-byte trailer")
    try:
        mod.packet_size(-1)
    except ValueError:
        return
    raise Failed("packet_size(-1) returned; expected ValueError")


def ring_free_space(ctx: Context) -> None:
    mod = ctx.load("ring")
    for (w, r, ds), want in FREE.items():
        got = mod.bytes_to_write(w, r, ds)
        if got != want or got != _core_free(w, r, ds).free:
            raise Failed(f"bytes_to_write(write_index={w}, read_index={r}, data_size={ds}) = {got}, expected {want}")
    for (w, r, ds, size), want in CAN.items():
        got = mod.can_write(w, r, ds, size)
        if got != want or got != _core_free(w, r, ds).can_write(size):
            raise Failed(f"can_write(write_index={w}, read_index={r}, data_size={ds}, size={size}) = {got}, "
                         f"expected {want} ({mod.bytes_to_write(w, r, ds)} bytes free)")
    for (w, size, ds), want in NEXT.items():
        got = mod.next_write_index(w, size, ds)
        if got != want:
            raise Failed(f"next_write_index({w}, {size}, {ds}) = {got}, expected {want} (the ring wraps)")
    # A walk round a small ring several times: the writer fills it, the reader takes a packet, again.
    ds, size, w, r, core = 1024, 200, 0, 0, RingWriter(1024)
    for step in range(40):
        mine, theirs = mod.can_write(w, r, ds, size), core.can_write(size)
        if mine != theirs:
            raise Failed(f"walk step {step} (write_index {w}, read_index {r}): can_write says {mine}, the core "
                         f"{theirs}")
        if mine:
            w = mod.next_write_index(w, size, ds)
            core.write(size)
        else:
            r = (r + size) % ds
            core.update(r, 0)


def _core_signal_reader(old_w: int, r: int, mask: int, ds: int = 4096) -> bool:
    reader = RingReader(ds)
    reader.interrupt_mask = mask
    used = (old_w - r) % ds
    if used:
        reader.arrive(used)
    return reader.arrive(8)


SIGNAL_READER = {(128, 128, 0): True, (128, 128, 1): False, (256, 128, 0): False, (0, 0, 0): True,
                 (0, 3968, 0): False, (4088, 4088, 0): True}


def ring_signal_reader(ctx: Context) -> None:
    mod = ctx.load("ring")
    for (old_w, r, mask), want in SIGNAL_READER.items():
        got = mod.must_signal_reader(old_w, r, mask)
        if bool(got) != want or want != _core_signal_reader(old_w, r, mask):
            raise Failed(f"must_signal_reader(old_write_index={old_w}, read_index={r}, interrupt_mask={mask}) = "
                         f"{got}, expected {want}")


def _core_signal_writer(w: int, old_r: int, new_r: int, ds: int, pss: int) -> bool:
    reader = RingReader(ds)
    if old_r:  # put the reader at old_r first
        reader.arrive(old_r)
        reader.consume(old_r)
    used = (w - old_r) % ds
    if used:
        reader.arrive(used)
    reader.credit()
    reader.writer_pending(pss)
    return reader.consume((new_r - old_r) % ds)


# (write_index, old_read_index, new_read_index, data_size, pending_send_sz) -> signal the writer?
# A writer waits for 280 bytes; the reader frees 128 at a time from a ring with 128 free (Linux hv_pkt_iter_close).
SIGNAL_WRITER = {(3968, 0, 128, 4096, 280): False,  # 128 -> 256 free: still not enough
                 (3968, 128, 256, 4096, 280): True,  # 256 -> 384: crossed
                 (3968, 256, 384, 4096, 280): False,  # 384 -> 512: already told
                 (3968, 0, 128, 4096, 0): False,  # nobody waits
                 (3968, 0, 152, 4096, 280): False,  # 128 -> 280 free: 280 is not more than 280
                 (3968, 0, 160, 4096, 280): True,  # 128 -> 288
                 (40, 48, 328, 4096, 280): True,  # 8 -> 288, the writer's index wrapped
                 (4000, 4008, 192, 4096, 280): True,  # 8 -> 288, the reader's index wraps
                 (4000, 4008, 192, 4096, 288): False}


def ring_pending_send_sz(ctx: Context) -> None:
    mod = ctx.load("ring")
    for (w, old_r, new_r, ds, pss), want in SIGNAL_WRITER.items():
        got = mod.must_signal_writer(w, old_r, new_r, ds, pss)
        core = _core_signal_writer(w, old_r, new_r, ds, pss)
        if bool(got) != want or core != want:
            raise Failed(f"must_signal_writer(write_index={w}, old_read_index={old_r}, new_read_index={new_r}, "
                         f"data_size={ds}, pending_send_sz={pss}) = {got}, expected {want}")


ANSWERS = {"q1_storvsc_ring_bodies": 2, "q2_netvsc_recv_messages": 147, "q3_max_gpadl_pages": 8190,
           "q4_packets_in_two_page_ring": 31}


def answers(ctx: Context) -> None:
    got = read_answers(ctx)
    wrong = [k for k, v in ANSWERS.items() if got.get(k) != v]
    if wrong:
        raise Failed(f"not right yet: {', '.join(wrong)}")
    short = [k for k in ("q5_why_one_byte_gap", "q6_why_crossing") if len(str(got.get(k, "")).split()) < 15]
    if short:
        raise Failed(f"write a few sentences for {', '.join(short)}")


LAB = Lab(2, "GPADLs and rings", "moderate", [
    Step("split: header only", 10, split_header_only, "26 PFNs fit the header: 240 - 8 - 12 - 8 bytes, 8 each"),
    Step("split: header and bodies", 15, split_with_bodies, "a body has 16 bytes before its PFNs"),
    Step("split: bytes on the wire", 10, wire_layout, "struct.pack('<II', msgtype, 0) starts every message"),
    Step("split: a real parent accepts it", 15, real_parent, "run the step's child yourself: see the handout"),
    Step("ring: packet size", 10, ring_packet_size, "hv_ringbuffer_write adds sizeof(u64) for the trailer"),
    Step("ring: free space and wraparound", 15, ring_free_space, "hv_get_bytes_to_write; then <, not <="),
    Step("ring: when the writer signals", 10, ring_signal_reader, "hv_signal_on_write: only empty -> non-empty"),
    Step("ring: pending_send_sz", 10, ring_pending_send_sz, "hv_pkt_iter_close: signal on the crossing only"),
    Step("questions", 5, answers, "the handout's Questions section"),
], starter_fails=frozenset({"split: header only", "split: header and bodies", "split: bytes on the wire",
                            "split: a real parent accepts it", "ring: packet size", "ring: free space and wraparound",
                            "ring: when the writer signals", "ring: pending_send_sz", "questions"}))
