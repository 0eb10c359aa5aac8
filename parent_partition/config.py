"""Parent daemon configuration: embedded defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbus_proto.aio.cli import vmbus_version
from vmbus_proto.aio.endpoint import parse_endpoint
from vmbus_proto.devices.storage import vstor
from vmbus_proto.envelope import DEFAULT_DATA_WINDOW, MAX_DATA_WINDOW, MIN_DATA_WINDOW
from vmbus_proto.versions import HOST_SUPPORTED

from .devices.storage.scsi import MAX_LUNS

DEFAULT_TCP = "tcp://127.0.0.1:6464"
DEFAULT_UNIX = "unix:./run/vmbus.sock"
DEVICES = ("storage", "network", "video", "keyboard", "mouse", "echo")
SECTIONS = ("parent", "storage", "devices")
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_FRAME = 64 * 1024 + 4096  # a 64 KiB in-band payload and its framing


class ConfigError(ValueError):
    """A setting (from the TOML file or a flag) is wrong; the message names it and says what it must be."""


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
    source: str | None = None  # the TOML file these settings came from

    @classmethod
    def load(cls, path: str | None) -> Config:
        """The defaults, overridden by the TOML file at ``path``; a ConfigError names the file and the key."""
        cfg = cls(source=path)
        if path is None:
            return cfg
        try:
            with open(path, "rb") as fh:
                text = fh.read().decode()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            lines = text.count("\n") + 1
            why = str(exc).replace("(at end of document)", f"(at end of document, line {lines})")
            raise ConfigError(f"{path}: not valid TOML: {why}") from None
        for section in sorted(set(raw) - set(SECTIONS)):
            raise ConfigError(f"{path}: [{section}]: unknown section; known: {', '.join(SECTIONS)}")
        for section in SECTIONS:
            if not isinstance(raw.get(section, {}), dict):
                raise ConfigError(f"{path}: {section} must be a table ([{section}])")
        cfg.apply(raw.get("parent", {}), source=path)
        for name, enabled in raw.get("devices", {}).items():
            if name not in DEVICES:
                raise ConfigError(f"{path}: [devices] {name}: unknown device; known: {', '.join(DEVICES)}")
            if not isinstance(enabled, bool):
                raise ConfigError(f"{path}: [devices] {name} must be true or false, not {enabled!r}")
            cfg.devices[name] = enabled
        cfg.storage = _storage(raw.get("storage", {}), path)
        return cfg

    def apply(self, values: dict[str, Any], source: str) -> None:
        """Set ``[parent]`` keys, each checked (``source`` names the file in errors)."""
        for key, value in values.items():
            check = _PARENT_KEYS.get(key)
            if check is None:
                raise ConfigError(f"{source}: [parent] {key}: unknown setting; known: {', '.join(_PARENT_KEYS)}")
            try:
                setattr(self, key, check(value))
            except ValueError as exc:
                raise ConfigError(f"{source}: [parent] {key}: {exc}") from None

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _storage(raw: dict[str, Any], source: str) -> StorageConfig:
    cfg = StorageConfig()
    for key, value in raw.items():
        if key == "lun":
            if not isinstance(value, list):
                raise ConfigError(f"{source}: [storage] lun must be an array of tables ([[storage.lun]])")
            cfg.luns = [_lun(i, v, source) for i, v in enumerate(value, 1)]
            continue
        check = _STORAGE_KEYS.get(key)
        if check is None:
            raise ConfigError(f"{source}: [storage] {key}: unknown setting; "
                              f"known: {', '.join([*_STORAGE_KEYS, 'lun'])}")
        try:
            setattr(cfg, key, check(value))
        except ValueError as exc:
            raise ConfigError(f"{source}: [storage] {key}: {exc}") from None
    return cfg


def _vstor_versions(raw: Any) -> list[int]:
    """VSTOR versions as "major.minor" strings (the ones Hyper-V has: 2.0, 4.2, 5.1, 6.0, 6.2)."""
    known = {f"{v >> 8}.{v & 0xFF}": int(v) for v in vstor.Version}
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v in known for v in raw):
        raise ValueError(f"must be a non-empty list of {', '.join(map(repr, known))}, not {raw!r}")
    return [known[v] for v in raw]


def _sectors(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % 512:
        raise ValueError(f"must be a positive multiple of 512 bytes, not {v!r}")
    return v


def _idle(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
        raise ValueError(f"must be a number of seconds (0 or more), not {v!r}")
    return float(v)


def _lun_number(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_LUNS:
        raise ValueError(f"must be an integer in 0-{MAX_LUNS - 1}, not {v!r}")
    return v


def _optional_path(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be the path of an existing disk image, not {v!r}")
    return v


def _partitions(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ValueError(f'must be a list of partition names, as in ["vm1", "vm2"], not {v!r}')
    return v


def _lun(index: int, raw: Any, source: str) -> LunEntry:
    where = f"{source}: [[storage.lun]] #{index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    if "lun" not in raw:
        raise ConfigError(f"{where} needs lun = N (0-{MAX_LUNS - 1})")
    entry = LunEntry(lun=0)
    for key, value in raw.items():
        check = _LUN_KEYS.get(key)
        if check is None:
            raise ConfigError(f"{where} {key}: unknown setting; known: {', '.join(_LUN_KEYS)}")
        try:
            setattr(entry, key, check(value))
        except ValueError as exc:
            raise ConfigError(f"{where} {key}: {exc}") from None
    return entry


# ---- checks of single values: each returns the value to store or raises ValueError("must be ...") -------

def _listen(v: Any) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(u, str) for u in v):
        raise ValueError('must be a non-empty list of URLs, as in ["tcp://127.0.0.1:6464", "unix:./run/vmbus.sock"]')
    for url in v:
        parse_endpoint(url)
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a non-empty string, not {v!r}")
    return v


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {v!r}")
    return v


def _level(v: Any) -> str:
    if v not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(map(repr, LOG_LEVELS))}, not {v!r}")
    return str(v)


def _versions(v: Any) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError(f'must be a non-empty list of version strings, as in ["6.0", "5.3"], not {v!r}')
    return [vmbus_version(x) for x in v]


def _seconds(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
        raise ValueError(f"must be a positive number of seconds, not {v!r}")
    return float(v)


def _count(minimum: int = 1) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"must be an integer of at least {minimum}, not {v!r}")
        return v
    return check


def _data_window(v: Any) -> int:
    if (not isinstance(v, int) or isinstance(v, bool) or not MIN_DATA_WINDOW <= v <= MAX_DATA_WINDOW
            or v % 8):
        raise ValueError(f"must be a multiple of 8 from {MIN_DATA_WINDOW} to {MAX_DATA_WINDOW}, not {v!r}")
    return v


_STORAGE_KEYS: dict[str, Callable[[Any], Any]] = {
    "disk_size": _sectors, "queue_depth": _count(), "max_transfer_bytes": _count(512), "idle_close": _idle,
    "protocol_versions": _vstor_versions,
}
_LUN_KEYS: dict[str, Callable[[Any], Any]] = {
    "lun": _lun_number, "size": _sectors, "path": _optional_path, "read_only": _flag, "partitions": _partitions,
}
_PARENT_KEYS: dict[str, Callable[[Any], Any]] = {
    "listen": _listen, "data_dir": _text, "trace": _flag, "log_level": _level, "vmbus_versions": _versions,
    "handshake_timeout": _seconds, "stall_timeout": _seconds, "shutdown_timeout": _seconds,
    "max_frame": _count(MIN_FRAME), "max_gpadls": _count(), "max_partitions": _count(),
    "channel_data_window": _data_window,
}

