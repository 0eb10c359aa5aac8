"""The ``[storage]`` section and its ``[[storage.lun]]`` tables: the disks each partition's SCSI controller
gets (OpenVMM configures a StorVSP controller the same way: LUNs, each a disk image, optionally read-only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmbus_proto.devices.storage import vstor

from ...settings import count, flag, names, seconds_or_zero, sectors, setting, tables
from .scsi import MAX_LUNS


def _lun_number(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_LUNS:
        raise ValueError(f"must be an integer in 0-{MAX_LUNS - 1}, not {v!r}")
    return v


def _image_path(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be the path of an existing disk image, not {v!r}")
    return v


def _vstor_versions(raw: Any) -> list[int]:
    """VSTOR versions as "major.minor" strings (the ones Hyper-V has: 2.0, 4.2, 5.1, 6.0, 6.2)."""
    known = {f"{v >> 8}.{v & 0xFF}": int(v) for v in vstor.Version}
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v in known for v in raw):
        raise ValueError(f"must be a non-empty list of {', '.join(map(repr, known))}, not {raw!r}")
    return [known[v] for v in raw]


@dataclass(slots=True)
class LunEntry:
    """``[[storage.lun]]``: an extra LUN (or a replacement for LUN 0) for every partition or some."""

    lun: int = setting(0, check=_lun_number, required=f"lun = N (0-{MAX_LUNS - 1})")
    size: int = setting(1 << 30, check=sectors)
    path: str | None = setting(None, check=_image_path)
    read_only: bool = setting(False, check=flag)
    partitions: list[str] | None = setting(None, check=names)  # None: every partition


@dataclass(slots=True)
class StorageSettings:
    disk_size: int = setting(1 << 30, check=sectors)  # LUN 0 of each partition, created sparse on first use
    queue_depth: int = setting(256, check=count())
    max_transfer_bytes: int = setting(0x40000, check=count(512))
    idle_close: float = setting(30.0, check=seconds_or_zero)  # disks stay open this long after the last close
    subchannels: int = setting(0, check=count(0, 64))  # offered through VSTOR CREATE_SUB_CHANNELS
    protocol_versions: list[int] = setting(check=_vstor_versions,
                                           factory=lambda: sorted(vstor.DEFAULT_SUPPORTED, reverse=True))
    lun: list[LunEntry] = tables(LunEntry)

    def luns_for(self, partition: str) -> list[tuple[int, int, str | None, bool]]:
        """(lun, size, path, read_only) for one partition, LUN 0 first."""
        chosen: dict[int, tuple[int, int, str | None, bool]] = {0: (0, self.disk_size, None, False)}
        for e in self.lun:
            if e.partitions is None or partition in e.partitions:
                chosen[e.lun] = (e.lun, e.size, e.path, e.read_only)
        return [chosen[k] for k in sorted(chosen)]
