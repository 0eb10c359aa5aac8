"""Lab 1, watch the bus: the answers in ``answers.toml`` against a trace the grader takes itself.

The facts (versions, offers, relids, GPADLs, the teardown order) are checked exactly against what this
grader reads from its own run: a real ``parent-partition serve --trace`` with the lab's ``parent.toml`` and a
real ``child-partition run --trace``, stopped with Ctrl-C once every channel is open. So the answers must come
from reading a trace, and they follow the configuration if it changes. The "why" answers get a lenient
key-term check only (``labs.harness.key_terms``): a grader cannot judge prose; your instructor reads them.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from labs.harness import (
    Context,
    Failed,
    Lab,
    Step,
    TraceMsg,
    answer,
    answers,
    child,
    control_messages,
    key_terms,
    parent,
)

HERE = Path(__file__).resolve().parent
STORAGE_CLASS = "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f"


class Observed(NamedTuple):
    """What the grader's own trace shows (a NamedTuple: graders are loaded without a sys.modules entry)."""

    tried: list[str]  # versions asked for, in order ("5.3")
    negotiated: str
    offers: int  # OFFERCHANNEL before ALLOFFERS_DELIVERED
    storage_relid: int
    storage_class: str
    ring_gpadl: int  # the storage channel's ring GPADL handle
    ring_pages: int
    ring_bodies: int
    downstream_offset: int
    vram_pages: int  # the video device's second GPADL (its VRAM)
    vram_bodies: int
    storage_teardown: list[str]
    released: list[int]


def _version(field: str) -> str:
    """``0x50000(5.0)`` -> ``5.0``."""
    return field.partition("(")[2].rstrip(")")


def _gpadl(msgs: list[TraceMsg], gid: int) -> tuple[int, int]:
    """(pages, GPADL_BODY messages) of GPADL ``gid``."""
    parts = [m for m in msgs if m.name in ("GPADL_HEADER", "GPADL_BODY") and m.num("gpadl") == gid]
    return sum(m.pfn_count for m in parts), sum(m.name == "GPADL_BODY" for m in parts)


def observe(log: str) -> Observed:
    msgs = control_messages(log)
    tried = [_version(m.fields["vmbus_version_requested"]) for m in msgs if m.name == "INITIATE_CONTACT"]
    accepted = [m for m in msgs if m.name == "VERSION_RESPONSE" and m.fields["version_supported"] == "1"]
    names = [m.name for m in msgs]
    if not tried or not accepted or "ALLOFFERS_DELIVERED" not in names or "UNLOAD_RESPONSE" not in names:
        raise Failed("the grader's own trace is incomplete (no version, offers or unload): see the parent's log")
    first_offers = msgs[:names.index("ALLOFFERS_DELIVERED")]
    offers = [m for m in first_offers if m.name == "OFFERCHANNEL"]
    by_device = {m.fields["if_type"].partition("(")[2].rstrip(")"): m for m in offers}
    storage, video = by_device["storage"], by_device["video"]
    s_relid, v_relid = storage.num("child_relid"), video.num("child_relid")
    opens = {m.num("child_relid"): m for m in msgs if m.name == "OPENCHANNEL"}
    ring = opens[s_relid].num("ringbuffer_gpadlhandle")
    vram = next(m.num("gpadl") for m in msgs if m.name == "GPADL_HEADER" and m.num("child_relid") == v_relid
                and m.num("gpadl") != opens[v_relid].num("ringbuffer_gpadlhandle"))
    stop = next(i for i, m in enumerate(msgs) if m.name == "CLOSECHANNEL")
    teardown = [m.name for m in msgs[stop:]
                if m.fields.get("child_relid") == str(s_relid)
                or (m.name == "GPADL_TORNDOWN" and m.num("gpadl") == ring)
                or m.name in ("UNLOAD", "UNLOAD_RESPONSE")]
    return Observed(
        tried=tried, negotiated=_version(next(m for m in reversed(msgs) if m.name == "INITIATE_CONTACT")
                                         .fields["vmbus_version_requested"]),
        offers=len(offers), storage_relid=s_relid, storage_class=storage.fields["if_type"].partition("(")[0],
        ring_gpadl=ring, ring_pages=_gpadl(msgs, ring)[0], ring_bodies=_gpadl(msgs, ring)[1],
        downstream_offset=opens[s_relid].num("downstream_ringbuffer_pageoffset"),
        vram_pages=_gpadl(msgs, vram)[0], vram_bodies=_gpadl(msgs, vram)[1], storage_teardown=teardown,
        released=[m.num("child_relid") for m in msgs if m.name == "RELID_RELEASED"])


@functools.cache
def observed() -> Observed:
    """One real run for every step: the lab's parent, a child that opens everything, Ctrl-C."""
    with tempfile.TemporaryDirectory(prefix="lab1-trace-") as tmp, \
            parent(Path(tmp), "--trace", config=(HERE / "parent.toml").read_text()) as (_, url):
        vm = child(Path(tmp), url, "vm1", "--trace")
        vm.wait_for("all offered channels open", 90)
        vm.wait_for("NIC queues", 60)  # the NIC's sub-channels are open too
        if vm.interrupt() != 0:
            raise Failed(f"the grader's child did not stop cleanly:\n{vm.output()[-2000:]}")
        return observe(vm.output())


def _same(got: Any, want: Any, key: str, hint: str = "") -> None:
    if got != want:
        raise Failed(f"{key} = {got!r} is not what the trace shows" + (f" ({hint})" if hint else ""))


def _answered(ctx: Context, *keys: str) -> list[Any]:
    """The answers to ``keys``, every one of them given (checked before the grader runs its trace)."""
    a = answers(ctx)
    return [answer(a, k) for k in keys]


def _hex(value: Any, key: str) -> int:
    try:
        return int(str(value), 0)
    except ValueError:
        raise Failed(f"{key} = {value!r}: write the handle as it is printed, e.g. \"0xe1e10\"") from None


def check_version(ctx: Context) -> None:
    tried, negotiated = _answered(ctx, "version.tried", "version.negotiated")
    o = observed()
    _same(tried, o.tried, "version.tried", "every vmbus_version_requested, in order")
    _same(negotiated, o.negotiated, "version.negotiated")


def check_offers(ctx: Context) -> None:
    count, relid, cls = _answered(ctx, "offers.count", "offers.storage_relid", "offers.storage_class")
    o = observed()
    _same(count, o.offers, "offers.count", "count the offers before ALLOFFERS_DELIVERED")
    _same(relid, o.storage_relid, "offers.storage_relid")
    _same(str(cls).lower(), o.storage_class, "offers.storage_class")


def check_gpadl(ctx: Context) -> None:
    keys = ("gpadl.storage_ring", "gpadl.storage_ring_pages", "gpadl.storage_ring_bodies", "gpadl.downstream_offset",
            "gpadl.vram_pages", "gpadl.vram_bodies", "gpadl.bodies_for_1000_pages")
    ring, pages, bodies, offset, vram_pages, vram_bodies, thousand = _answered(ctx, *keys)
    want = math.ceil((1000 - 26) / 28)  # 26 page numbers fit in GPADL_HEADER, 28 in each GPADL_BODY
    _same(thousand, want, "gpadl.bodies_for_1000_pages", "how many page numbers fit in the header, and in each body?")
    o = observed()
    _same(_hex(ring, "gpadl.storage_ring"), o.ring_gpadl, "gpadl.storage_ring", "OPENCHANNEL's ringbuffer_gpadlhandle")
    _same(pages, o.ring_pages, "gpadl.storage_ring_pages")
    _same(bodies, o.ring_bodies, "gpadl.storage_ring_bodies")
    _same(offset, o.downstream_offset, "gpadl.downstream_offset")
    _same(vram_pages, o.vram_pages, "gpadl.vram_pages")
    _same(vram_bodies, o.vram_bodies, "gpadl.vram_bodies")


def check_teardown(ctx: Context) -> None:
    order, released = _answered(ctx, "teardown.storage_order", "teardown.released_relids")
    o = observed()
    _same([str(x).removeprefix("CHANNELMSG_") for x in order], o.storage_teardown, "teardown.storage_order",
          "names without CHANNELMSG_, from the first CLOSECHANNEL on")
    _same(sorted(released), sorted(o.released), "teardown.released_relids")


CHOICES = {  # multiple choice: the letter
    "choice.closechannel_reply": "c",
    "choice.who_picks_relid": "b",
    "choice.who_picks_gpadl": "a",
}


def check_choices(ctx: Context) -> None:
    a = answers(ctx)
    wrong = [k for k, v in CHOICES.items() if str(answer(a, k)).strip().lower() != v]
    if wrong:
        raise Failed("not the right choice: " + ", ".join(wrong))


WHY = {  # the key terms a written answer should touch (any one term of each group)
    "why.gpadl_before_open": [("ringbuffer_gpadlhandle", "handle", "gpadl"), ("page", "memory", "pfn"),
                              ("ring",)],
    "why.torndown_waits": [("host", "parent"), ("still", "access", "read", "write", "use", "mapped", "dma"),
                           ("reuse", "free", "give", "return", "again")],
    "why.newest_first": [("newest", "highest", "latest", "best"), ("feature", "capabilit"),
                         ("exact", "accept", "support", "refuse", "reject")],
    "why.relid_released": [("relid", "channel id", "id"), ("reuse", "re-offer", "reoffer", "again", "new offer"),
                           ("stale", "old", "confus", "still", "done", "finished", "no longer")],
}


def check_why(ctx: Context) -> None:
    a = answers(ctx)
    for key, groups in WHY.items():
        key_terms(answer(a, key), groups, key)


LAB = Lab(
    number=1,
    title="Watch the bus",
    difficulty="easy",
    steps=[
        Step("version negotiation", 2, check_version, "grep INITIATE_CONTACT and VERSION_RESPONSE in vm1.log"),
        Step("offers", 2, check_offers, "grep OFFERCHANNEL in vm1.log; the class GUID is if_type"),
        Step("GPADLs and the open", 3, check_gpadl, "follow one gpadl= handle through HEADER, BODY and CREATED"),
        Step("teardown", 2, check_teardown, "everything after the first CLOSECHANNEL is the Ctrl-C"),
        Step("multiple choice", 2, check_choices, "the handout's Questions section"),
        Step("why questions", 4, check_why, "a sentence or two each; the handout's Background has pointers"),
    ],
    starter_fails=frozenset({"version negotiation", "offers", "GPADLs and the open", "teardown",
                             "multiple choice", "why questions"}),
)
