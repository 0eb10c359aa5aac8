"""``[http]``: where the parent's web console, JSON API and /metrics listen, and what /metrics labels.

Kept free of aiohttp so the config loader can read it without starting anything.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from typing import Any

from vmbus_proto.aio.endpoint import parse_endpoint
from vmbus_proto.aio.keyfile import SecretFileError, read_token_file
from vmbus_proto.aio.tls import TlsConfigError, server_context

from ..settings import ConfigError, flag, setting, text

DEFAULT_HTTP = "127.0.0.1:8080"
OFF = "none"


def http_address(v: Any) -> str:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6; port 0: any free port) or ``none``."""
    if v == OFF:
        return OFF
    if not isinstance(v, str) or "://" in v:
        raise ValueError(f"must be HOST:PORT (as in {DEFAULT_HTTP}) or {OFF!r}, not {v!r}")
    try:
        parse_endpoint(f"tcp://{v}")
    except ValueError as exc:
        raise ValueError(f"must be HOST:PORT (as in {DEFAULT_HTTP}) or {OFF!r}: "
                         f"{str(exc).split(': ', 1)[-1].split(';')[0]}") from None
    return v


def split_address(address: str) -> tuple[str, int]:
    """A checked ``HOST:PORT`` as (host, port)."""
    _, host, port = parse_endpoint(f"tcp://{address}")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class HttpSettings:
    listen: str = setting(DEFAULT_HTTP, check=http_address)  # or "none"
    partition_labels: bool = setting(False, check=flag)  # /metrics: a partition label on per-partition series
    token_file: str | None = setting(None, check=text)  # the API token; needed off loopback
    tls_cert_file: str | None = setting(None, check=text)  # HTTPS: the server's certificate (PEM) ...
    tls_key_file: str | None = setting(None, check=text)  # ... and its private key
    tls_client_ca_file: str | None = setting(None, check=text)  # a client certificate it signed stands for the token
    explicit: bool = field(default=False)  # listen was chosen (file or flag): failing to bind it is an error
    token: str | None = field(default=None)  # read from token_file: every request must carry it
    ssl_context: ssl.SSLContext | None = field(default=None)  # made from the tls_* files: HTTPS

    def load_token(self, where: str) -> None:
        """Read ``token_file`` (a ConfigError names ``where`` and the file)."""
        if self.token_file is None:
            return
        try:
            self.token = read_token_file(self.token_file)
        except SecretFileError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def load_tls(self, where: str) -> None:
        """Make the HTTPS context from the ``tls_*`` files (a ConfigError names ``where`` and the file). With a
        client CA, a client may present a certificate (verified if it does: CERT_OPTIONAL) or the token."""
        self.ssl_context = None
        if self.tls_cert_file is None and self.tls_key_file is None and self.tls_client_ca_file is None:
            return
        if self.tls_cert_file is None or self.tls_key_file is None:
            raise ConfigError(f"{where}: HTTPS needs both tls_cert_file and tls_key_file")
        try:
            self.ssl_context = server_context(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file,
                                              client_cert_required=False)
        except TlsConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @property
    def client_certs(self) -> bool:
        """A verified client certificate is accepted in place of the token."""
        return self.ssl_context is not None and self.tls_client_ca_file is not None

    @property
    def enabled(self) -> bool:
        return self.listen != OFF
