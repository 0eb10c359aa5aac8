"""Parent daemon configuration: embedded defaults, overridden by a TOML file, overridden by flags.

``[parent]`` holds the daemon's own settings, ``[devices]`` turns devices on and off, and each device has a
section of its own, parsed from the ``Settings`` dataclass its VSP declares (``[storage]`` and its
``[[storage.lun]]`` tables, for example): this module names no device.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbus_proto.aio.cli import vmbus_version
from vmbus_proto.aio.endpoint import parse_endpoint
from vmbus_proto.aio.tls import TlsConfigError, server_context
from vmbus_proto.aio.transport import FRAME_TIMEOUT, KEEPALIVE, check_keepalive
from vmbus_proto.devices.registry import BY_NAME, EMULATED, REGISTRY
from vmbus_proto.envelope import DEFAULT_DATA_WINDOW, MAX_DATA_WINDOW, MIN_DATA_WINDOW
from vmbus_proto.packets import PAGE_SIZE
from vmbus_proto.versions import HOST_SUPPORTED

from .auth import AuthSettings
from .devices import load_vsp_plugin, vsp_classes
from .settings import ConfigError, count, describe, flag, parse_section, seconds, setting, text
from .vsp import Vsp
from .web.settings import HttpSettings

__all__ = ["Config", "ConfigError", "LimitsSettings", "TlsSettings"]

DEFAULT_TCP = "tcp://127.0.0.1:6464"
DEFAULT_UNIX = "unix:./run/vmbus.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")
WORKER_COMMAND = "_worker"  # the hidden command a supervisor starts its worker processes with
MIN_FRAME = 64 * 1024 + 4096  # a 64 KiB in-band payload and its framing


def _listen(v: Any) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(u, str) for u in v):
        raise ValueError('must be a non-empty list of URLs, as in ["tcp://127.0.0.1:6464", "unix:./run/vmbus.sock"]')
    for url in v:
        parse_endpoint(url)
    return v


def workers_setting(v: Any) -> int | str:
    """``[parent] workers``: a number of worker processes (1 or more), or "auto" (one per core)."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v  # type: ignore[no-any-return]
    raise ValueError(f'must be a number of worker processes (1 or more) or "auto" (one per core), not {v!r}')


def worker_count(config: Config) -> int:
    """The worker processes ``config`` asks for: "auto" is the cores this process may run on."""
    if config.workers != "auto":
        return int(config.workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _level(v: Any) -> str:
    if v not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(map(repr, LOG_LEVELS))}, not {v!r}")
    return str(v)


def _versions(v: Any) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError(f'must be a non-empty list of version strings, as in ["6.0", "5.3"], not {v!r}')
    return [vmbus_version(x) for x in v]


def _plugins(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f'must be a list of device plug-ins, as in ["lab/vsp.py:TimesyncVsp"], not {v!r}')
    for ref in v:
        load_vsp_plugin(ref)  # a PluginError is a ValueError: the file, the key and why
    return v


def _pages(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % PAGE_SIZE:
        raise ValueError(f"must be a positive multiple of {PAGE_SIZE} bytes, not {v!r}")
    return v


def _data_window(v: Any) -> int:
    if (not isinstance(v, int) or isinstance(v, bool) or not MIN_DATA_WINDOW <= v <= MAX_DATA_WINDOW
            or v % 8):
        raise ValueError(f"must be a multiple of 8 from {MIN_DATA_WINDOW} to {MAX_DATA_WINDOW}, not {v!r}")
    return v


@dataclass(slots=True)
class LimitsSettings:
    """``[limits]``: what one partition may cost the parent, and the parent-wide memory budget. The defaults
    never bother a real guest; a guest past one gets the protocol's refusal, and ``strikes`` refusals within
    ``strike_window`` seconds end its connection (CLOSE code ``abuse``)."""

    gpadl_pages: int = setting(1 << 18, check=count())  # pages all of a partition's GPADLs describe (1 GiB)
    subchannels: int = setting(128, check=count(0))  # sub-channels a partition's guest may have asked for
    control_per_second: int = setting(1000, check=count())  # control messages a second, on average ...
    control_burst: int = setting(5000, check=count())  # ... and at once; past it they are dropped
    strikes: int = setting(16, check=count())  # limit refusals within strike_window that end the connection
    strike_window: float = setting(60.0, check=seconds)
    memory_budget: int = setting(1 << 30, check=count(4096))  # bytes held for all partitions together
    partition_bytes: int = setting(64 << 20, check=count(4096))  # bytes held for one partition (limits.py)
    guest_memory: int = setting(4 << 30, check=_pages)  # the most guest memory a partition's HELLO may declare


@dataclass(slots=True)
class TlsSettings:
    """``[tls]``: the certificate of the parent's ``tls://`` listeners (docs/protocol.md §1, §3.3). With
    ``client_ca_file`` every client must present a certificate that CA signed (CERT_REQUIRED), and one whose
    name (CN or DNS subjectAltName) is the partition's counts as that partition's authentication."""

    cert_file: str | None = setting(None, check=text)  # PEM: the parent's certificate (and its chain)
    key_file: str | None = setting(None, check=text)  # PEM: its private key, readable by this user only
    client_ca_file: str | None = setting(None, check=text)  # PEM: the CA(s) whose client certificates are taken
    context: ssl.SSLContext | None = field(default=None)  # made from the files by load()

    def load(self, where: str) -> None:
        """Check the files and make the server context (a ConfigError names ``where`` and the file)."""
        self.context = None
        if self.cert_file is None and self.key_file is None and self.client_ca_file is None:
            return
        if self.cert_file is None or self.key_file is None:
            raise ConfigError(f"{where}: needs both cert_file and key_file (PEM files: the parent's certificate "
                              f"and its private key)")
        try:
            # A client certificate is verified when presented; TlsGate refuses a client without one, in words.
            self.context = server_context(self.cert_file, self.key_file, self.client_ca_file,
                                          client_cert_required=False)
        except TlsConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


@dataclass(slots=True)
class Config:
    """``[parent]`` settings as fields; ``devices`` and ``sections`` hold ``[devices]`` and each device's own."""

    listen: list[str] = setting(check=_listen, factory=lambda: [DEFAULT_TCP, DEFAULT_UNIX])
    data_dir: str = setting("./var", check=text)
    workers: int | str = setting("auto", check=workers_setting)  # worker processes; "auto": one per core
    trace: bool = setting(False, check=flag)
    log_level: str = setting("info", check=_level)
    vmbus_versions: list[int] = setting(check=_versions, factory=lambda: sorted(HOST_SUPPORTED, reverse=True))
    handshake_timeout: float = setting(10.0, check=seconds)  # HELLO and an accepted INITIATE_CONTACT within this
    stall_timeout: float = setting(60.0, check=seconds)  # a child that leaves our writes unread this long goes
    frame_timeout: float = setting(FRAME_TIMEOUT, check=seconds)  # a frame's first byte to its last (slow loris)
    keepalive: tuple[int, int, int] = setting(KEEPALIVE, check=check_keepalive)  # TCP [idle, interval, count]
    shutdown_timeout: float = setting(10.0, check=seconds)  # per shutdown stage
    max_frame: int = setting(4 * 1024 * 1024 + 64 * 1024, check=count(MIN_FRAME))
    channel_data_window: int = setting(DEFAULT_DATA_WINDOW, check=_data_window)  # inline data per channel in flight
    max_gpadls: int = setting(256, check=count())
    max_partitions: int = setting(4096, check=count())
    # Take a Unix child's guest memory when it offers it (docs/protocol.md §14); false: every child streams.
    shared_memory: bool = setting(True, check=flag)
    device_plugins: list[str] = setting(check=_plugins, factory=list)  # more devices: "file.py:VspClass"
    devices: dict[str, bool] = field(default_factory=lambda: {**{e.name: e.enabled for e in REGISTRY},
                                                              **{e.name: e.enabled for e in EMULATED}})
    http: HttpSettings = field(default_factory=HttpSettings)  # [http]: the web console, JSON API and /metrics
    auth: AuthSettings = field(default_factory=AuthSettings)  # [auth]: who may connect, with what secret
    limits: LimitsSettings = field(default_factory=LimitsSettings)  # [limits]: per partition, and the budget
    tls: TlsSettings = field(default_factory=TlsSettings)  # [tls]: the certificate of tls:// listeners
    sections: dict[str, Any] = field(default_factory=lambda: {n: c.Settings() for n, c in vsp_classes().items()
                                                              if dataclasses.fields(c.Settings)})
    source: str | None = None  # the TOML file these settings came from
    plugins: dict[str, type[Vsp]] = field(default_factory=dict)  # device_plugins' VSPs, by device name

    @classmethod
    def load(cls, path: str | None) -> Config:
        """The defaults, overridden by the TOML file at ``path``; a ConfigError names the file and the key."""
        cfg = cls(source=path)
        if path is None:
            return cfg
        try:
            with open(path, "rb") as fh:
                raw_text = fh.read().decode()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            raw = tomllib.loads(raw_text)
        except tomllib.TOMLDecodeError as exc:
            lines = raw_text.count("\n") + 1
            why = str(exc).replace("(at end of document)", f"(at end of document, line {lines})")
            raise ConfigError(f"{path}: not valid TOML: {why}") from None
        if not isinstance(raw.get("parent", {}), dict):
            raise ConfigError(f"{path}: parent must be a table ([parent])")
        cfg.apply(raw.get("parent", {}), source=path)
        cfg.add_plugins(path)  # before the sections: a plug-in device may have one
        known = ["parent", "devices", "http", "auth", "limits", "tls", *cfg.sections]
        for section in sorted(set(raw) - set(known)):
            raise ConfigError(f"{path}: [{section}]: unknown section; known: {', '.join(known)}")
        for section in known:
            if not isinstance(raw.get(section, {}), dict):
                raise ConfigError(f"{path}: {section} must be a table ([{section}])")
        parse_section(HttpSettings, raw.get("http", {}), "[http]", path, obj=cfg.http)
        cfg.http.explicit = "listen" in raw.get("http", {})
        cfg.http.load_token(f"{path}: [http] token_file")
        cfg.http.load_tls(f"{path}: [http]")
        parse_section(AuthSettings, raw.get("auth", {}), "[auth]", path, obj=cfg.auth)
        cfg.auth.load_secrets(path)
        parse_section(LimitsSettings, raw.get("limits", {}), "[limits]", path, obj=cfg.limits)
        parse_section(TlsSettings, raw.get("tls", {}), "[tls]", path, obj=cfg.tls)
        cfg.tls.load(f"{path}: [tls]")
        for name, enabled in raw.get("devices", {}).items():
            if name not in cfg.devices:
                raise ConfigError(f"{path}: [devices] {name}: unknown device; known: {', '.join(cfg.devices)}")
            if not isinstance(enabled, bool):
                raise ConfigError(f"{path}: [devices] {name} must be true or false, not {enabled!r}")
            cfg.devices[name] = enabled
        for name, settings in cfg.sections.items():
            if name in raw:
                parse_section(type(settings), raw[name], f"[{name}]", path, obj=settings)
        return cfg

    def apply(self, values: dict[str, Any], source: str) -> None:
        """Set ``[parent]`` keys, each checked (``source`` names the file in errors)."""
        parse_section(Config, values, "[parent]", source, obj=self)

    def add_plugins(self, source: str) -> None:
        """Offer the ``device_plugins`` devices too, each with its own section if its VSP has settings."""
        for ref in self.device_plugins:
            cls = load_vsp_plugin(ref)
            name = cls.spec.name
            if self.plugins.get(name, cls) is not cls:
                raise ConfigError(f"{source}: [parent] device_plugins: two plug-ins are named {name!r}")
            self.plugins[name] = cls
            self.devices.setdefault(name, True)
            if dataclasses.fields(cls.Settings):
                self.sections.setdefault(name, cls.Settings())

    def vsp_classes(self) -> dict[str, type[Vsp]]:
        """The VSP of every device this configuration knows: the registry's, then the plug-ins'."""
        return {**vsp_classes(), **self.plugins}

    def section(self, device: str) -> Any:
        """The settings of ``device`` (its ``[<device>]`` section, or its defaults; a device with nothing to
        configure has no section)."""
        return self.sections.get(device) or self.vsp_classes()[device].Settings()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def tables_help() -> str:
    """Every table a config file may have, with its keys (``serve --config`` help)."""
    tables = describe("parent", Config) + describe("http", HttpSettings) + describe("auth", AuthSettings)
    tables += describe("limits", LimitsSettings) + describe("tls", TlsSettings)
    for name, settings in Config().sections.items():
        tables += describe(name, type(settings))
    tables.append(f"[devices] ({', '.join([*BY_NAME, *(e.name for e in EMULATED)])} = true|false)")
    return ", ".join(tables)
