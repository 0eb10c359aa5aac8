"""The ``[video]`` section: the modes the synthetic monitor offers (RESOLUTION_RESPONSE) and its default."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vmbus_proto.devices.video.host import DEFAULT_RESOLUTIONS
from vmbus_proto.devices.video.synthvid import MAX_RESOLUTIONS, VRAM_SIZE

from ...settings import ConfigError, setting

_MODE = re.compile(r"(\d{3,5})x(\d{3,5})")


def mode(v: Any) -> tuple[int, int]:
    """A mode written as "WIDTHxHEIGHT": at least 640x480 (hyperv_fb's minimum), 32 bpp within the 8 MiB VRAM."""
    m = _MODE.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError(f'must be a mode written as "1024x768", not {v!r}')
    w, h = int(m[1]), int(m[2])
    if w < 640 or h < 480 or w > 0xFFFF or h > 0xFFFF or w * h * 4 > VRAM_SIZE:
        raise ValueError(f"{v!r} must be at least 640x480 and fit the {VRAM_SIZE >> 20} MiB VRAM at 32 bpp")
    return w, h


def modes(v: Any) -> list[tuple[int, int]]:
    if not isinstance(v, list) or not 0 < len(v) <= MAX_RESOLUTIONS:
        raise ValueError(f'must be a list of 1 to {MAX_RESOLUTIONS} modes, as in ["1024x768", "1920x1080"], '
                         f"not {v!r}")
    return [mode(x) for x in v]


@dataclass(slots=True)
class VideoSettings:
    resolutions: list[tuple[int, int]] = setting(check=modes, factory=lambda: list(DEFAULT_RESOLUTIONS))
    default: tuple[int, int] = setting(DEFAULT_RESOLUTIONS[0], check=mode)  # must be one of the resolutions

    def default_index(self) -> int:
        """Where the default is in the list; a ConfigError when the list lacks it."""
        if self.default not in self.resolutions:
            listed = ", ".join(f'"{w}x{h}"' for w, h in self.resolutions)
            raise ConfigError(f'[video] default = "{self.default[0]}x{self.default[1]}" is not one of the '
                              f"resolutions ({listed})")
        return self.resolutions.index(self.default)
