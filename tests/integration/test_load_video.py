"""The video load workload against a real parent: two guests draw frames into their VRAM and send DIRT; the
parent's screens show the last frame exactly, its channel counters saw every DIRT, and the guests leave
nothing behind."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from child_partition.load.video import VideoWorkload

from .conftest import Parent
from .load_driver import Api, Rec, build, drive, parent_with_api, quiet

pytestmark = pytest.mark.integration


@pytest.fixture
def http_parent(tmp_path: Path) -> Iterator[tuple[Parent, Api]]:
    yield from parent_with_api(tmp_path)


def top_left(api: Api, name: str) -> tuple[int, int, int, int, int]:
    """The screen's size and its pixel (0, 0) as RGB."""
    with Image.open(io.BytesIO(api.get(f"/api/partitions/{name}/screen.png"))) as img:
        pixel = img.convert("RGB").getpixel((0, 0))
        assert isinstance(pixel, tuple)
        return img.width, img.height, pixel[0], pixel[1], pixel[2]


@pytest.mark.parametrize("argv", [["--frame", "full", "--mode", "800x600"],
                                  ["--frame", "rects", "--rects", "5", "--dirt", "fbdev", "--measure", "screen"]],
                         ids=["full-now", "rects-fbdev-screen"])
async def test_frames_reach_the_parents_screens(http_parent: tuple[Parent, Api], argv: list[str]) -> None:
    parent, api = http_parent
    workload = build(VideoWorkload, argv, parent, api, "vid")
    rec = Rec()
    ops = 6
    seen: dict[str, object] = {}
    size = (800, 600) if "800x600" in argv else (1024, 768)  # the parent's default mode

    def check(parts: list[object]) -> None:
        for p in parts:
            name = p.name  # type: ignore[attr-defined]
            # Pixel (0, 0) carries the last frame's number as its colour (B, G, R in VRAM); the last DIRT
            # left the guest, and the parent shows it once it has read it.
            api.until(lambda: top_left(api, name) == (*size, 0, 0, ops),  # noqa: B023
                      f"{name}'s {size[0]}x{size[1]} screen shows frame {ops}")
            video = next(c for c in api.get(f"/api/partitions/{name}/channels") if c["device"] == "video")
            seen[name] = video["counters"]
        assert {p["name"] for p in api.get("/api/partitions")} >= set(seen)

    done, parts, extra = await drive(workload, 2, ops, 2, rec, check)
    stats = extra["video"]
    assert [d.op for d in done] == ["frame"] * 2 * ops and all(d.nbytes > 0 for d in done)
    assert stats["frames"] == 2 * ops and not rec.errors
    assert len(rec.ops["dirt"]) == stats["dirt_messages"] > 0, (rec.ops["dirt"], stats)
    assert sum(n for _, n in rec.ops["dirt"]) == stats["dirt_bytes"]
    # Every DIRT reached the parent with its pixels (plus the handshake's and the pointer's packets).
    assert sum(c["packets_in"] for c in seen.values()) > stats["dirt_messages"]  # type: ignore[index]
    assert sum(c["data_in"] for c in seen.values()) >= stats["dirt_bytes"]  # type: ignore[index]
    if "fbdev" in argv:
        assert stats["dirt_sends"] + stats["coalesced"] == stats["frames"]
        assert len(rec.ops["visible"]) == 2 * ops, "a frame was never seen on the console"
    else:
        assert stats["coalesced"] == 0 and stats["dirt_messages"] >= 2 * ops
    # stop() unloaded every guest: the parent holds none of them (nor their GPADLs).
    api.until(lambda: not api.names() & {p.name for p in parts}, "the guests are gone from the parent")
    quiet(parent)
