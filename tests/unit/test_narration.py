"""The demo's narration: the partition gutter survives wrapping, and trace records land in the right stage."""

from __future__ import annotations

import io

from rich.console import Console
from rich.text import Text

from parent_partition.narration import Gutter, build_story, render_records


def render(renderable: object, width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False).print(renderable)
    return out.getvalue().splitlines()


def test_a_wrapped_line_keeps_its_gutter_on_every_row() -> None:
    long = "CHANNELMSG_OFFERCHANNEL(1) " + " ".join(f"field{i}=0x{i:04x}" for i in range(30))
    lines = render(Gutter("vm1", Text(long)), 60)
    assert len(lines) > 3, "the test line should wrap"
    assert lines[0].startswith("     vm1 │ CHANNELMSG_OFFERCHANNEL(1)")
    assert all(line.startswith("         │ ") for line in lines[1:]), lines
    assert all(len(line) <= 60 for line in lines)


def rec(who: str, event: str, t: int, **fields: object) -> dict[str, object]:
    return {"who": who, "event": event, "timestamp": f"2026-12-02T10:00:00.{t:06d}", "level": "info", **fields}


def test_records_are_grouped_into_the_lifecycle_stages() -> None:
    records = [
        rec("vm1", "G>H CHANNELMSG_INITIATE_CONTACT(14) vmbus_version_requested=0x60000(6.0)", 1),
        rec("vm1", "H>G CHANNELMSG_VERSION_RESPONSE(15) version_supported=1", 2),
        rec("vm1", "G>H CHANNELMSG_REQUESTOFFERS(3) ", 3),
        rec("vm1", "H>G CHANNELMSG_OFFERCHANNEL(1) if_type=ba6163d9-04a1-4d29-b605-72e2ffb1dc7f(storage) "
                   "child_relid=1 connection_id=0x2001", 4),
        rec("vm1", "H>G CHANNELMSG_OFFERCHANNEL(1) if_type=f8615163-df3e-46c5-913f-f2d2f965ed0e(network) "
                   "child_relid=2 connection_id=0x2002", 5),
        rec("vm1", "H>G CHANNELMSG_ALLOFFERS_DELIVERED(4) ", 6),
        rec("vm1", "G>H CHANNELMSG_GPADL_HEADER(8) child_relid=2 gpadl=0xe1e11 pfns=[0x1..0x1a (26 pfns)]", 7),
        rec("vm1", "G>H CHANNELMSG_GPADL_HEADER(8) child_relid=1 gpadl=0xe1e10 pfns=[0x1..0x1a (26 pfns)]", 8),
        rec("vm1", "G>H CHANNELMSG_GPADL_BODY(9) gpadl=0xe1e10 pfns=[0x1..0x1c (28 pfns)]", 9),
        rec("vm1", "G>H CHANNELMSG_GPADL_BODY(9) gpadl=0xe1e11 pfns=[0x1..0x1c (28 pfns)]", 10),
        rec("vm1", "G>H CHANNELMSG_GPADL_BODY(9) gpadl=0xe1e10 pfns=[0x1..0xc (12 pfns)]", 11),
        rec("vm1", "H>G CHANNELMSG_GPADL_CREATED(10) child_relid=1 gpadl=0xe1e10 creation_status=0x0", 12),
        rec("vm1", "G>H CHANNELMSG_OPENCHANNEL(5) child_relid=1 openid=1", 13),
        rec("parent", "channel open", 14, relid=1, device="storage", partition="vm1"),
        rec("vm1", "H>G CHANNELMSG_OPENCHANNEL_RESULT(6) child_relid=1 openid=1 status=0x0", 15),
        rec("vm1", "G>H VSTOR_OPERATION_BEGIN_INITIALIZATION(7)  [VM_PKT_DATA_INBAND]", 16, relid=1,
            device="storage"),
        rec("vm1", "device ready", 17, relid=1, device="storage", version="6.2"),
        rec("vm1", "device packet", 18, relid=1),  # quiet
        rec("vm1", "all offered channels open", 19),
    ]
    stages = {s.key: s for s in build_story(records)}
    assert list(stages) == ["connect", "offers", "gpadl:1", "open:1", "device:1", "channel:2", "ready"]
    assert stages["gpadl:1"].title == "storage channel: sharing the ring pages (GPADL)"
    assert stages["channel:2"].title.startswith("network:")

    def events(key: str) -> list[str]:
        return [str(r["event"])[:40] for r in stages[key].records]

    assert len(events("connect")) == 2 and len(events("offers")) == 4
    assert events("gpadl:1") == [r["event"][:40] for r in records[7:9]] + [records[10]["event"][:40],
                                                                           records[11]["event"][:40]]
    assert [r["who"] for r in stages["open:1"].records] == ["vm1", "parent", "vm1"]
    assert len(events("device:1")) == 2
    assert len(events("channel:2")) == 2  # its GPADL_HEADER and GPADL_BODY
    # A run of GPADL_BODY shows as its first message and a count of the rest.
    shown = [render(line, 200)[0] for line in render_records(stages["gpadl:1"].records)]
    assert any("… 1 more CHANNELMSG_GPADL_BODY with 12 PFNs" in line for line in shown), shown
    assert sum("GPADL_BODY(9)" in line for line in shown) == 1
