"""Parent daemon configuration: embedded defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vmbus_proto.versions import HOST_SUPPORTED, parse_version

DEFAULT_TCP = "tcp://127.0.0.1:6464"
DEFAULT_UNIX = "unix:./run/vmbus.sock"
DEVICES = ("storage", "network", "video", "keyboard", "mouse", "echo")


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
    max_gpadls: int = 256
    max_partitions: int = 4096
    devices: dict[str, bool] = field(default_factory=lambda: {d: d != "echo" for d in DEVICES})

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
        unknown = set(raw) - {"parent", "devices"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
        return cfg

    def apply(self, values: dict[str, Any], source: str) -> None:
        known = {f.name: f for f in fields(self)}
        for key, raw in values.items():
            if key not in known or key == "devices":
                raise ValueError(f"{source}: unknown setting {key!r}")
            value = [int(parse_version(str(v))) for v in raw] if key == "vmbus_versions" else raw
            current = getattr(self, key)
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            if type(value) is not type(current):
                raise ValueError(f"{source}: {key} must be {type(current).__name__}")
            setattr(self, key, value)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)
