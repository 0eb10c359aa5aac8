"""Parent daemon configuration: embedded defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vmbus_proto.devices import storage as vstor
from vmbus_proto.envelope import DEFAULT_DATA_WINDOW, MAX_DATA_WINDOW, MIN_DATA_WINDOW
from vmbus_proto.versions import HOST_SUPPORTED, parse_version

DEFAULT_TCP = "tcp://127.0.0.1:6464"
DEFAULT_UNIX = "unix:./run/vmbus.sock"
DEVICES = ("storage", "network", "video", "keyboard", "mouse", "echo")


@dataclass(slots=True)
class LunEntry:
    """``[[storage.lun]]``: an extra LUN (or a replacement for LUN 0) for every partition or some."""

    lun: int
    size: int = 1 << 30
    path: str | None = None
    read_only: bool = False
    partitions: list[str] | None = None  # None: every partition


@dataclass(slots=True)
class StorageConfig:
    disk_size: int = 1 << 30  # LUN 0 of each partition, created sparse on first use
    queue_depth: int = 256
    max_transfer_bytes: int = 0x40000
    idle_close: float = 30.0  # seconds a partition's disks stay open after its last storage channel closed
    luns: list[LunEntry] = field(default_factory=list)
    protocol_versions: list[int] = field(default_factory=lambda: sorted(vstor.DEFAULT_SUPPORTED, reverse=True))

    def luns_for(self, partition: str) -> list[tuple[int, int, str | None, bool]]:
        """(lun, size, path, read_only) for one partition, LUN 0 first."""
        chosen: dict[int, tuple[int, int, str | None, bool]] = {0: (0, self.disk_size, None, False)}
        for e in self.luns:
            if e.partitions is None or partition in e.partitions:
                chosen[e.lun] = (e.lun, e.size, e.path, e.read_only)
        return [chosen[k] for k in sorted(chosen)]


@dataclass(slots=True)
class Config:
    listen: list[str] = field(default_factory=lambda: [DEFAULT_TCP, DEFAULT_UNIX])
    data_dir: str = "./var"
    trace: bool = False
    log_level: str = "info"
    vmbus_versions: list[int] = field(default_factory=lambda: sorted(HOST_SUPPORTED, reverse=True))
    handshake_timeout: float = 10.0  # HELLO and an accepted INITIATE_CONTACT within this
    stall_timeout: float = 60.0  # a child that leaves our writes unread this long is dropped
    shutdown_timeout: float = 10.0  # per shutdown stage
    max_frame: int = 4 * 1024 * 1024 + 64 * 1024
    channel_data_window: int = DEFAULT_DATA_WINDOW  # inline data a child may have in flight per channel
    max_gpadls: int = 256
    max_partitions: int = 4096
    devices: dict[str, bool] = field(default_factory=lambda: {d: d != "echo" for d in DEVICES})
    storage: StorageConfig = field(default_factory=StorageConfig)

    @classmethod
    def load(cls, path: str | None) -> Config:
        cfg = cls()
        if path is None:
            return cfg
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
        cfg.apply(raw.get("parent", {}), source=path)
        devices = raw.get("devices", {})
        for name, enabled in devices.items():
            if name not in DEVICES or not isinstance(enabled, bool):
                raise ValueError(f"{path}: [devices] {name} must be one of {DEVICES} = true|false")
            cfg.devices[name] = enabled
        cfg.storage = _storage(raw.get("storage", {}), path)
        unknown = set(raw) - {"parent", "devices", "storage"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
        return cfg

    def apply(self, values: dict[str, Any], source: str) -> None:
        known = {f.name: f for f in fields(self)}
        for key, raw in values.items():
            if key not in known or key in ("devices", "storage"):
                raise ValueError(f"{source}: unknown setting {key!r}")
            value = [int(parse_version(str(v))) for v in raw] if key == "vmbus_versions" else raw
            current = getattr(self, key)
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            if type(value) is not type(current):
                raise ValueError(f"{source}: {key} must be {type(current).__name__}")
            setattr(self, key, value)
        window = self.channel_data_window
        if not (MIN_DATA_WINDOW <= window <= MAX_DATA_WINDOW and window % 8 == 0):
            raise ValueError(f"{source}: channel_data_window must be a multiple of 8 from "
                             f"{MIN_DATA_WINDOW} to {MAX_DATA_WINDOW}")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _storage(raw: dict[str, Any], source: str) -> StorageConfig:
    cfg = StorageConfig()
    for key, value in raw.items():
        if key == "lun":
            if not isinstance(value, list):
                raise ValueError(f"{source}: [[storage.lun]] must be an array of tables")
            cfg.luns = [_lun(v, source) for v in value]
        elif key == "idle_close":
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{source}: storage.idle_close must be a number of seconds")
            cfg.idle_close = float(value)
        elif key == "protocol_versions":
            cfg.protocol_versions = _vstor_versions(value, source)
        elif key in ("disk_size", "queue_depth", "max_transfer_bytes"):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: storage.{key} must be a positive integer")
            setattr(cfg, key, value)
        else:
            raise ValueError(f"{source}: unknown setting storage.{key}")
    if cfg.disk_size % 512:
        raise ValueError(f"{source}: storage.disk_size must be a multiple of 512")
    return cfg


def _vstor_versions(raw: Any, source: str) -> list[int]:
    """VSTOR versions as "major.minor" strings (the ones Hyper-V has: 2.0, 4.2, 5.1, 6.0, 6.2)."""
    known = {f"{v >> 8}.{v & 0xFF}": int(v) for v in vstor.Version}
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v in known for v in raw):
        raise ValueError(f"{source}: storage.protocol_versions must be a non-empty list of "
                         f"{', '.join(map(repr, known))}")
    return [known[v] for v in raw]


def _lun(raw: Any, source: str) -> LunEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("lun"), int):
        raise ValueError(f"{source}: each [[storage.lun]] needs an integer lun")
    unknown = set(raw) - {"lun", "size", "path", "read_only", "partitions"}
    if unknown:
        raise ValueError(f"{source}: unknown [[storage.lun]] keys {sorted(unknown)}")
    entry = LunEntry(lun=raw["lun"], size=raw.get("size", 1 << 30), path=raw.get("path"),
                     read_only=raw.get("read_only", False), partitions=raw.get("partitions"))
    if not isinstance(entry.size, int) or entry.size <= 0 or entry.size % 512:
        raise ValueError(f"{source}: storage.lun {entry.lun}: size must be a positive multiple of 512")
    if entry.path is not None and not isinstance(entry.path, str):
        raise ValueError(f"{source}: storage.lun {entry.lun}: path must be a string")
    if not isinstance(entry.read_only, bool):
        raise ValueError(f"{source}: storage.lun {entry.lun}: read_only must be true or false")
    if entry.partitions is not None and not (isinstance(entry.partitions, list)
                                             and all(isinstance(p, str) for p in entry.partitions)):
        raise ValueError(f"{source}: storage.lun {entry.lun}: partitions must be a list of names")
    return entry
