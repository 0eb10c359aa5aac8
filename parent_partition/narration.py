"""The demo's story: one child partition's VMBus lifecycle cut into stages, each with a plain explanation.

The stages follow the order a Linux guest goes through on Hyper-V (drivers/hv/connection.c ``vmbus_connect``,
channel_mgmt.c ``vmbus_request_offers``, channel.c ``vmbus_establish_gpadl`` and ``vmbus_open``, then each
driver's probe handshake). The records are the partitions' own ``--trace --json-logs`` lines; this module only
groups, trims and prints them, each behind a gutter naming the partition that logged it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.segment import Segment
from rich.text import Text

from vmbus_proto.devices.registry import BY_NAME

Record = dict[str, Any]

DETAILED = "storage"  # the channel whose GPADL and open are shown step by step
STYLES = {"parent": "bold magenta", "vm1": "cyan", "vm2": "green", "vm3": "yellow", "demo": "bold"}
GUTTER = 8  # "  parent │ " minus the bar

INTRO = ("A parent partition (the host) runs one VMBus server per child and VSPs shared by every child: "
         "storage, network, video, input (keyboard and mouse) and the heartbeat integration service. Each child "
         "partition (a guest VM) runs one "
         "VSC per device. Below, vm1's whole VMBus lifecycle is shown step by step from its own --trace; "
         "vm2 and vm3 then start the same way, and all three put their disks to work and ping each other.")

EXPLAIN = {
    "connect": ("Connecting: the VMBus version",
                "vm1 proposes VMBus versions newest first in INITIATE_CONTACT; the host answers VERSION_RESPONSE "
                "(supported or not). A refused guest tries the next older version, so a new guest and an old "
                "host (or the reverse) settle on the newest version both know without any other exchange."),
    "offers": ("Offers: what devices does this VM have?",
               "REQUESTOFFERS asks the host for its devices. Each OFFERCHANNEL is one synthetic device: its class "
               "GUID says what it is (storage, network, ...) and its relid (child_relid) names the channel from "
               "now on. ALLOFFERS_DELIVERED ends the list; the guest binds a driver, a VSC, to each offer by GUID."),
    "gpadl": ("sharing the ring pages (GPADL)",
              "A channel carries its packets in two ring buffers, one per direction, in the guest's own memory. "
              "The guest hands the host the page numbers (PFNs) of those pages in a GPADL (Guest Physical Address "
              "Descriptor List): GPADL_HEADER with the first 26 PFNs, GPADL_BODY with 28 more each, and the host "
              "confirms with GPADL_CREATED. Sharing pages means neither side copies packets through the hypervisor."),
    "open": ("opening the channel",
             "OPENCHANNEL names the ring GPADL and where in it the host-to-guest ring starts (the "
             "downstream_ringbuffer_pageoffset). The host attaches its VSP to the rings and answers "
             "OPENCHANNEL_RESULT; status 0 means packets can flow."),
    "ready": ("vm1 is up",
              "Every offered channel is open and every device handshake is done. vm1 also exports its SCSI disk "
              "over NBD, so real tools (qemu-img, qemu-io, nbdcopy) can use the VM's disk."),
}

STOPPING = ("Each child closes every channel (CLOSECHANNEL), takes its ring pages back (GPADL_TEARDOWN, answered "
            "by GPADL_TORNDOWN) and leaves the bus (UNLOAD, answered by UNLOAD_RESPONSE); then the parent stops: "
            "it stops accepting, drains in-flight I/O and flushes the disks.")

# Fields that are zero in every message of a normal run: dropped from the teaching view.
_ZERO_FIELD = re.compile(r" (?:reserved\d|padding|mmio_megabytes_optional|monitor_page\d|target_vcpu|target_vp|"
                         r"sub_channel_index|monitor_allocated|is_dedicated_interrupt|user_def|userdata|msgnumber|"
                         r"monitorid|mmio_megabytes)=0(?:x0)?\b")
_RELID = re.compile(r"\bchild_relid=(\d+)")
_GPADL = re.compile(r"\bgpadl=(0x[0-9a-f]+)")
_OFFER = re.compile(r"if_type=\S+?\((\w+)\).*?child_relid=(\d+)")
_PFNS = re.compile(r"\((\d+) pfns\)")
_CONNECT = {"INITIATE_CONTACT", "VERSION_RESPONSE"}
_OFFERS = {"REQUESTOFFERS", "OFFERCHANNEL", "ALLOFFERS_DELIVERED"}
_INFO_STAGE = {"VMBus negotiated": "connect", "VMBus connected": "connect", "partition connected": "connect",
               "all offered channels open": "ready", "disk exported over NBD": "ready"}
QUIET = {"device packet"}


class Gutter:
    """A line behind the name of the partition that logged it; wrapped lines keep the gutter."""

    def __init__(self, who: str, body: RenderableType) -> None:
        self.who = who
        self.body = body

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(20, options.max_width - GUTTER - 3)
        lines = console.render_lines(self.body, options.update(width=width, height=None), pad=False)
        style = console.get_style(STYLES.get(self.who, ""))
        for i, line in enumerate(lines):
            yield Segment(f"{self.who if i == 0 else '':>{GUTTER}} │ ", style)
            yield from line
            yield Segment.line()


def is_trace(rec: Record) -> bool:
    return str(rec.get("event", "")).startswith(("G>H ", "H>G "))


def message_name(text: str) -> str:
    """'CHANNELMSG_GPADL_BODY(9) ...' -> 'GPADL_BODY'; '' for a device packet."""
    m = re.match(r"CHANNELMSG_(\w+)\(", text)
    return m.group(1) if m else ""


def body_text(rec: Record) -> Text:
    """A record as one readable line: a trace arrow and the trimmed message, or an event and its fields."""
    event = str(rec.get("event", ""))
    if is_trace(rec):
        arrow, _, rest = event.partition(" ")
        rest, _, framing = _ZERO_FIELD.sub("", rest).strip().partition("  [")
        text = Text(("→ " if arrow == "G>H" else "← ") + rest, style="dim" if "GPADL_BODY" in rest else "")
        if framing:
            text.append("  [" + framing, style="dim")
        return text
    level = str(rec.get("level", "info"))
    text = Text(event, style={"warning": "yellow", "error": "bold red", "raw": "red"}.get(level, "bold"))
    extras = " ".join(f"{k}={v}" for k, v in rec.items()
                      if k not in ("event", "level", "timestamp", "component", "transport", "peer", "partition",
                                   "who"))
    if extras:
        text.append("  " + extras, style="dim")
    return text


@dataclass(slots=True)
class Stage:
    key: str
    title: str
    explanation: str
    records: list[Record] = field(default_factory=list)


def build_story(records: Iterable[Record]) -> list[Stage]:
    """vm1's records (and the parent's for vm1, each tagged ``who``) in the stages of the lifecycle.

    Records are grouped by what they belong to (the connection, the offers, one channel by relid); within a
    stage they keep their time order. Storage's channel is shown first, in three stages (GPADL, open,
    handshake), the others in one each in offer order, since their GPADL and open read the same.
    """
    by_key: dict[str, list[Record]] = {}
    devices: dict[int, str] = {}
    gpadl_relid: dict[str, int] = {}
    last = "connect"
    for rec in records:
        event = str(rec.get("event", ""))
        if event in QUIET or rec.get("level") in ("warning", "error"):
            continue
        key = _stage_of(rec, event, devices, gpadl_relid) or last
        by_key.setdefault(key, []).append(rec)
        last = key
    relids = sorted({int(k.split(":")[1]) for k in by_key if ":" in k})
    # A device's sub-channels (its later relids: NVSP SUBCHANNEL, VSTOR CREATE_SUB_CHANNELS) are told in
    # its primary's stage.
    primary: dict[str, int] = {}
    subs: dict[int, list[int]] = {}
    for relid in relids:
        first = primary.setdefault(devices.get(relid, f"relid {relid}"), relid)
        if first != relid:
            subs.setdefault(first, []).append(relid)
    relids = [r for r in relids if r in primary.values()]
    # One channel is shown in three stages: storage's, whose GPADL needs GPADL_BODY messages too.
    detailed = next((r for r in relids if devices.get(r) == DETAILED), relids[0] if relids else 0)
    relids = sorted(relids, key=lambda r: r != detailed)
    stages = [Stage("connect", *EXPLAIN["connect"]), Stage("offers", *EXPLAIN["offers"])]
    for relid in relids:
        device = devices.get(relid, f"relid {relid}")
        spec = BY_NAME[device].spec if device in BY_NAME else None
        title = spec.title if spec and spec.title else f"{device}: ring, open and handshake"
        explanation = spec.explain if spec else ""
        if relid == detailed:
            stages += [Stage(f"gpadl:{relid}", f"{device} channel: " + EXPLAIN["gpadl"][0], EXPLAIN["gpadl"][1]),
                       Stage(f"open:{relid}", f"{device} channel: " + EXPLAIN["open"][0], EXPLAIN["open"][1]),
                       Stage(f"device:{relid}", title, explanation)]
        else:
            stages.append(Stage(f"channel:{relid}", title, explanation))
    stages.append(Stage("ready", *EXPLAIN["ready"]))
    for stage in stages:
        if stage.key.startswith("channel:"):
            channel = int(stage.key.split(":")[1])
            keys = [f"{part}:{c}" for c in (channel, *subs.get(channel, ())) for part in ("gpadl", "open", "device")]
        else:
            kind, _, channel_text = stage.key.partition(":")
            keys = [stage.key, *(f"{kind}:{c}" for c in subs.get(int(channel_text), ()))] if channel_text \
                else [stage.key]
        stage.records = sorted((r for k in keys for r in by_key.get(k, [])),
                               key=lambda r: str(r.get("timestamp", "")))
    return stages


def _stage_of(rec: Record, event: str, devices: dict[int, str], gpadl_relid: dict[str, int]) -> str | None:
    if not is_trace(rec):
        if event in _INFO_STAGE:
            return _INFO_STAGE[event]
        channel = rec.get("relid")
        if channel is None:
            return None
        if rec.get("device"):
            devices.setdefault(int(channel), str(rec["device"]))
        return f"{'open' if event == 'channel open' else 'device'}:{channel}"
    if rec.get("relid") is not None:  # a device packet: logged on its channel's logger
        devices.setdefault(int(rec["relid"]), str(rec.get("device", "")))
        return f"device:{rec['relid']}"
    name = message_name(event[4:])
    if name in _CONNECT:
        return "connect"
    if name in _OFFERS:
        offer = _OFFER.search(event)
        if offer:
            devices[int(offer.group(2))] = offer.group(1)
        return "offers"
    relid_m, gpadl_m = _RELID.search(event), _GPADL.search(event)
    if relid_m is None and gpadl_m is not None:
        relid: int | None = gpadl_relid.get(gpadl_m.group(1))
    else:
        relid = int(relid_m.group(1)) if relid_m else None
    if relid is None:
        return None
    if name.startswith("GPADL"):
        if gpadl_m is not None:
            gpadl_relid[gpadl_m.group(1)] = relid
        return f"gpadl:{relid}"
    return f"open:{relid}"


def render_records(records: Iterable[Record]) -> Iterator[Gutter]:
    """Gutter lines for records; a run of GPADL_BODY messages shows as its first one and a count."""
    hidden: dict[str, tuple[int, int]] = {}  # who -> (bodies hidden, pfns hidden)
    shown_body: set[str] = set()

    def flush(who: str) -> Iterator[Gutter]:
        n, pfns = hidden.pop(who, (0, 0))
        shown_body.discard(who)
        if n:
            yield Gutter(who, Text(f"→ … {n} more CHANNELMSG_GPADL_BODY with {pfns} PFNs", style="dim"))

    for rec in records:
        who = str(rec.get("who", "?"))
        name = message_name(str(rec.get("event", ""))[4:]) if is_trace(rec) else ""
        if name == "GPADL_BODY":
            if who in shown_body:
                n, pfns = hidden.get(who, (0, 0))
                m = _PFNS.search(str(rec["event"]))
                hidden[who] = (n + 1, pfns + (int(m.group(1)) if m else 0))
                continue
            shown_body.add(who)
        else:
            yield from flush(who)
        yield Gutter(who, body_text(rec))
    for who in list(hidden):
        yield from flush(who)
