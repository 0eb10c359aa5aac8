"""``[auth]``: which partitions may connect, with what secret, and on which listeners without one.

The parent's half of docs/protocol.md §3.1 (the exchange itself is ``vmbus_proto.auth.HostAuth``): the secrets
of ``[[auth.partition]]`` by name or name pattern, the mode, and the one decision of where an unauthenticated
partition is allowed (``open_allowed``: only in mode "open-on-loopback", only on a Unix socket or a TCP listener
bound to a loopback address).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmbus_proto.aio.endpoint import parse_endpoint
from vmbus_proto.aio.keyfile import SecretFileError, read_secret_file

from .settings import ConfigError, flag, setting, tables, text
from .web.settings import is_loopback

REQUIRED, OPEN_ON_LOOPBACK = "required", "open-on-loopback"
MODES = (REQUIRED, OPEN_ON_LOOPBACK)


def _mode(v: Any) -> str:
    if v not in MODES:
        raise ValueError(f"must be one of {', '.join(map(repr, MODES))}, not {v!r}")
    return str(v)


def name_pattern(v: Any) -> str:
    """A partition name, or a name prefix ending in ``*`` (``"load-*"``; a lone ``*`` is every name)."""
    name = text(v)
    if "*" in name[:-1] or len(name) > 64 or not name.isprintable():
        raise ValueError(f"must be a partition name (1-64 printable characters) or a prefix ending in '*', "
                         f"not {v!r}")
    return name


@dataclass(slots=True)
class PartitionSecret:
    """``[[auth.partition]]``: a partition name (or ``PREFIX*``) and the file holding its secret."""

    name: str = setting("", check=name_pattern, required='name = "vm1" (or a prefix: "load-*")')
    secret_file: str = setting("", check=text, required='secret_file = "secrets/vm1.key"')


@dataclass(slots=True)
class AuthSettings:
    mode: str = setting(OPEN_ON_LOOPBACK, check=_mode)
    replace: bool = setting(False, check=flag)  # an authenticated newcomer replaces a connection under its name
    partition: list[PartitionSecret] = tables(PartitionSecret)
    secrets: dict[str, bytes] = field(default_factory=dict)  # exact names
    prefixes: list[tuple[str, bytes]] = field(default_factory=list)  # longest first

    def load_secrets(self, source: str) -> None:
        """Read every ``[[auth.partition]]`` secret file (a ConfigError names the entry and the file)."""
        self.secrets.clear()
        prefixes: dict[str, bytes] = {}
        for i, entry in enumerate(self.partition, 1):
            where = f"{source}: [[auth.partition]] #{i}"
            try:
                secret = read_secret_file(entry.secret_file)
            except SecretFileError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            table = prefixes if entry.name.endswith("*") else self.secrets
            key = entry.name.removesuffix("*")
            if key in table:
                raise ConfigError(f"{where}: name {entry.name!r} is configured twice")
            table[key] = secret
        self.prefixes = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))

    def lookup(self, name: str) -> bytes | None:
        """The secret of partition ``name``: its own entry, else the longest matching prefix's."""
        secret = self.secrets.get(name)
        if secret is not None:
            return secret
        return next((s for prefix, s in self.prefixes if name.startswith(prefix)), None)

    @property
    def configured(self) -> bool:
        return bool(self.secrets or self.prefixes)

    def open_allowed(self, listener: str) -> bool:
        """Whether a partition with no secret configured may connect unauthenticated on ``listener``."""
        return self.mode == OPEN_ON_LOOPBACK and listener_is_local(listener)


def listener_is_local(url: str) -> bool:
    """A Unix socket, or TCP bound to a loopback address (127.0.0.0/8, ::1, localhost). A wildcard (0.0.0.0,
    ::) or any other address is reachable from other hosts."""
    kind, host, _ = parse_endpoint(url)
    return kind == "unix" or is_loopback(host)
