"""TLS under the framed VMBus connection (docs/protocol.md §1, §3.3), with the stdlib ``ssl`` module.

Not Hyper-V's (there the "connection" is the hypervisor's message page). What a TCP service with optional
mutual TLS does, like PostgreSQL's ``hostssl`` with ``clientcert=verify-full``: the parent's ``[tls]``
certificate and key, TLS 1.2 at least (1.3 preferred, the OpenSSL default), and with a client CA, every client
must present a certificate that CA signed; the certificate's names (CN and DNS subjectAltNames) then
identify the partition. The child verifies the parent against a CA file and the host name it connects to.

``TlsGate`` runs the server's handshake itself (``loop.start_tls``) instead of ``create_server(ssl=...)``:
asyncio and uvloop log a failed server handshake only in debug mode, and this project logs each one, once,
with the peer and the reason (rate-limited per peer by ``logs.PeerLimiter``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from ..envelope import CERT_REFUSED, encode_close
from ..framing import FrameKind, frame_parts
from .endpoint import tls_query
from .keyfile import SecretFileError, read_key_file
from .logs import LIMIT_KEY

MIN_VERSION = ssl.TLSVersion.TLSv1_2

# OpenSSL's reasons for a handshake failure, in words a user can act on.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG", "UNSUPPORTED_PROTOCOL", "HTTPS_PROXY_REQUEST"}
_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the parent requires a client certificate (give --tls-cert and --tls-key)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate, and this listener requires one",
    "TLSV1_ALERT_UNKNOWN_CA": "the other side does not trust this side's certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the other side refused this side's certificate (bad certificate)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the other side refused this side's certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (this side needs TLS 1.2 or later)",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (this side needs TLS 1.2 or later)",
}


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file and says what to do."""


def _pem(path: str, marker: str, what: str) -> None:
    """``path`` is readable and holds a PEM block whose header contains ``marker``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 20)
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: {(exc.strerror or str(exc)).lower()}") from None
    if b"-----BEGIN " not in data or marker.encode() not in data:
        raise TlsConfigError(f"{what} {path}: no PEM {marker.strip('-').lower()} in it; is it the right file?")


def _key(path: str) -> None:
    try:
        read_key_file(path)  # OpenSSH's rule: a private key other users may read is refused
    except SecretFileError as exc:
        raise TlsConfigError(str(exc)) from None
    _pem(path, "PRIVATE KEY-----", "key file")


def _load_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    _pem(cert_file, "CERTIFICATE-----", "certificate file")
    _key(key_file)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(f"key file {key_file} does not belong to certificate file {cert_file} "
                                 f"(the key does not match the certificate's public key)") from None
        raise TlsConfigError(f"certificate file {cert_file} with key file {key_file}: {tls_reason(exc)}") from None


def _load_ca(ctx: ssl.SSLContext, ca_file: str, what: str) -> None:
    _pem(ca_file, "CERTIFICATE-----", what)
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{what} {ca_file}: {tls_reason(exc)}") from None


def server_context(cert_file: str, key_file: str, client_ca_file: str | None = None, *,
                   client_cert_required: bool = True) -> ssl.SSLContext:
    """A server context: this certificate and key; with ``client_ca_file``, client certificates signed by that
    CA are verified, and required (``CERT_REQUIRED``) unless ``client_cert_required`` is False (``CERT_OPTIONAL``:
    a client may come without one, as a browser with a token does)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    _load_chain(ctx, cert_file, key_file)
    if client_ca_file:
        _load_ca(ctx, client_ca_file, "client CA file")
        ctx.verify_mode = ssl.CERT_REQUIRED if client_cert_required else ssl.CERT_OPTIONAL
    return ctx


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A child's TLS options (``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-insecure``), carried in its
    ``tls://`` URL's query so that every tool that takes a URL (run, probe, load, its mix files) gets them."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    insecure: bool = False

    @classmethod
    def from_url(cls, url: str) -> ClientTls:
        q = tls_query(url)
        insecure = q.get("insecure", "0")
        if insecure not in ("0", "1"):
            raise TlsConfigError(f"insecure={insecure!r}: must be 0 or 1")
        return cls(q.get("ca") or None, q.get("cert") or None, q.get("key") or None, q.get("server_name") or None,
                   insecure == "1")

    def context(self) -> ssl.SSLContext:
        """The client context (a TlsConfigError names a file that cannot be used)."""
        if self.ca is None and not self.insecure:
            raise TlsConfigError("tls:// needs --tls-ca FILE (the CA that signed the parent's certificate; the "
                                 "system's CAs never do for a parent), or --tls-insecure to skip the check")
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError("a client certificate needs both --tls-cert and --tls-key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = MIN_VERSION
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            assert self.ca is not None
            _load_ca(ctx, self.ca, "CA file")
        if self.cert is not None and self.key is not None:
            _load_chain(ctx, self.cert, self.key)
        return ctx


def client_url(url: str, *, ca: str | None = None, cert: str | None = None, key: str | None = None,
               insecure: bool = False) -> str:
    """``url`` with these TLS options added to its query (absolute paths: a load run's worker processes and a
    mix file's URL mean the same files). A ValueError when they are given for a URL that is not ``tls://``."""
    given = {"ca": ca, "cert": cert, "key": key}
    if not any(given.values()) and not insecure:
        return url
    if urlsplit(url).scheme != "tls":
        raise ValueError(f"--tls-* options need a tls:// URL, not {url!r}")
    query = tls_query(url)
    query.update({k: os.path.abspath(v) for k, v in given.items() if v})
    if insecure:
        query["insecure"] = "1"
    return f"{url.partition('?')[0]}?{urlencode(query)}"


def tls_reason(exc: BaseException) -> str:
    """A TLS failure in one line a user can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the certificate is not trusted: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _NOT_TLS:
            return f"the other side does not speak TLS ({reason.lower().replace('_', ' ')})"
        if reason in _REASONS:
            return _REASONS[reason]
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "the other side closed the connection during the TLS handshake"
        return (reason.lower().replace("_", " ") or str(exc)) if reason else str(exc)
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):  # asyncio's handshake timeout
        return "no TLS handshake in time"
    if isinstance(exc, ConnectionError | EOFError):
        return "the other side closed the connection during the TLS handshake"
    return str(exc) or type(exc).__name__


def permanent(exc: BaseException) -> bool:
    """Whether a TLS failure is one a retry cannot fix (a certificate refused, a peer that speaks no TLS), as
    opposed to a connection cut mid-handshake (a parent restarting)."""
    return isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)


def peer_names(transport: asyncio.BaseTransport) -> list[str] | None:
    """The names in the peer's verified certificate (its subject CN, then its DNS subjectAltNames), or None when
    the connection is not TLS or the peer presented no certificate."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    return list(dict.fromkeys(names))


def name_matches(name: str, patterns: list[str]) -> bool:
    """A certificate name matches a partition name exactly, or as a prefix when it ends in ``*`` (as
    ``[[auth.partition]]`` names do: ``load-*``)."""
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


class TlsGate(asyncio.Protocol):
    """The protocol a TLS listener accepts with: runs the server handshake (``loop.start_tls``), then hands the
    TLS transport to the protocol ``factory`` makes. A failed handshake is logged once with ``log`` (peer and
    reason) and costs that connection only.

    ``require_cert``: a client must present a certificate (``ctx`` verifies one that is presented,
    CERT_OPTIONAL). A client without one is refused here, inside TLS, with a CLOSE frame saying so (code
    ``auth-cert``): a handshake refused for it would reach the client as a bare reset, as asyncio sends no
    alert when a server handshake fails."""

    def __init__(self, ctx: ssl.SSLContext, factory: Callable[[], asyncio.BaseProtocol], timeout: float,
                 log: Any, *, require_cert: bool = False) -> None:
        self.ctx, self.factory, self.timeout, self.log, self.require_cert = ctx, factory, timeout, log, require_cert
        self.raw: asyncio.Transport | None = None
        self.peer = "?"
        self._raw: list[bytes] | None = []  # TLS bytes read before start_tls took the transport over
        self._early: list[bytes] = []  # application data that arrived before the hand-over
        self._eof = False
        self._lost: tuple[Exception | None] | None = None
        self._target: asyncio.BaseProtocol | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        # Limited per host, not per connection: a flood of bad handshakes comes from fresh ports.
        self.log = self.log.bind(**{LIMIT_KEY: f"tls {peer[0] if isinstance(peer, tuple) else '?'}"})
        self._task = asyncio.get_running_loop().create_task(self._handshake())

    async def _handshake(self) -> None:
        assert self.raw is not None
        if self._gone():
            return  # the client left before its handshake could start
        loop = asyncio.get_running_loop()
        # The transport read for us until now (uvloop starts reading after connection_made, whatever it was told):
        # what came (the ClientHello) goes to the TLS protocol that start_tls installs before its handshake runs.
        raw, self._raw = b"".join(self._raw or ()), None
        if raw:
            loop.call_soon(self._replay, raw)
        try:
            tls = await loop.start_tls(self.raw, self, self.ctx, server_side=True,
                                       ssl_handshake_timeout=self.timeout)
        except (OSError, TimeoutError, EOFError) as exc:
            self.log.warning("TLS handshake failed; connection dropped", peer=self.peer, reason=tls_reason(exc))
            self.raw.abort()
            return
        if tls is None:  # the peer went while the handshake ended
            return
        if self.require_cert and not tls.get_extra_info("peercert"):
            self.log.warning("TLS client without a certificate refused", peer=self.peer)
            tls.write(b"".join(frame_parts(FrameKind.CLOSE, 0, encode_close(
                "this listener takes only clients with a certificate ([tls] client_ca_file)", CERT_REFUSED))))
            tls.close()
            return
        target = self.factory()
        self._target = target
        tls.set_protocol(target)
        target.connection_made(tls)
        for data in self._early:
            _deliver(target, data)
        self._early.clear()
        if self._eof:
            _eof(target)
        if self._lost is not None:
            target.connection_lost(self._lost[0])

    def _gone(self) -> bool:
        return self._lost is not None or self.raw is None or self.raw.is_closing()

    def _replay(self, raw: bytes) -> None:
        """Hand the bytes read before start_tls to its protocol (it queues them for its handshake)."""
        assert self.raw is not None
        proto = self.raw.get_protocol()
        if proto is not self and not self.raw.is_closing():
            _deliver(proto, raw)

    # Until the hand-over, the TLS transport reports to this protocol: keep what it says for the target.
    def data_received(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw.append(bytes(data))
        elif self._target is not None:
            _deliver(self._target, data)
        else:
            self._early.append(bytes(data))

    def eof_received(self) -> bool | None:
        if self._target is not None:
            return _eof(self._target)
        self._eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._target is not None:
            self._target.connection_lost(exc)
        else:
            self._lost = (exc,)  # between the handshake and the hand-over


def _deliver(proto: Any, data: bytes) -> None:
    if hasattr(proto, "get_buffer"):  # a BufferedProtocol (uvloop's SSL protocol is one, not by its class)
        view = memoryview(data)
        while view:
            buf = memoryview(proto.get_buffer(len(view)))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            proto.buffer_updated(n)
            view = view[n:]
    else:
        proto.data_received(data)


def _eof(proto: asyncio.BaseProtocol) -> bool | None:
    return proto.eof_received() if isinstance(proto, asyncio.Protocol | asyncio.BufferedProtocol) else None


# ---- the child's command-line options (run, probe, ping, load) -------------------------------------------

def add_client_options(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-insecure``: for a ``tls://`` --connect URL."""
    group = parser.add_argument_group("TLS (for a tls:// --connect URL)")
    group.add_argument("--tls-ca", metavar="FILE",
                       help="the CA certificate(s) (PEM) that signed the parent's certificate; the parent's "
                            "certificate must also name the --connect host (DNS or IP subjectAltName)")
    group.add_argument("--tls-cert", metavar="FILE",
                       help="this partition's client certificate (PEM), for a parent with [tls] client_ca_file; "
                            "its CN or a DNS subjectAltName must be the partition name")
    group.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (readable by this user only)")
    group.add_argument("--tls-insecure", action="store_true",
                       help="do not verify the parent's certificate (anyone on the path could pose as the parent)")


def connect_url(args: argparse.Namespace, prog: str, *, warn: bool = True) -> str:
    """``args.connect`` with the TLS options folded into its query, checked: a ValueError names a file that
    cannot be used. Warns on stderr (unless not ``warn``) that ``--tls-insecure`` verifies nothing."""
    url = client_url(args.connect, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, insecure=args.tls_insecure)
    if urlsplit(url).scheme == "tls":
        options = ClientTls.from_url(url)
        options.context()
        if options.insecure and warn:
            print(f"{prog}: warning: TLS without verifying the parent's certificate (--tls-insecure): anyone on "
                  f"the path can pose as the parent", file=sys.stderr, flush=True)
    return url


@functools.lru_cache(maxsize=16)
def client_context(url: str) -> tuple[ssl.SSLContext, str | None]:
    """The context for a ``tls://`` URL and the name the parent's certificate must have (None: the URL's host),
    made once per URL (a load run opens hundreds of connections with one)."""
    options = ClientTls.from_url(url)
    return options.context(), options.server_name
