"""TLS settings and helpers (vmbus_proto.aio.tls, ``[tls]``, ``[http] tls_*``): URLs, files that cannot be used
(each a clear error naming the file), the child's options, certificate names, and the listener's gate handing a
connection over when the client's first bytes arrive before the handshake starts (uvloop and asyncio)."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import uvloop

from parent_partition.config import Config, ConfigError
from vmbus_proto.aio.cli import connect_endpoint
from vmbus_proto.aio.endpoint import parse_endpoint, tls_query, without_query
from vmbus_proto.aio.tls import (
    ClientTls,
    TlsConfigError,
    TlsGate,
    client_url,
    name_matches,
    peer_names,
    server_context,
    tls_reason,
)

from ..tlscerts import Ca


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    ca = Ca.make(tmp_path_factory.mktemp("pki"))
    ca.issue("server", "parent", server=True)
    ca.issue("vm1", "vm1", dns=("vm1.example",))
    return ca


def test_tls_urls() -> None:
    assert parse_endpoint("tls://127.0.0.1:6465") == ("tls", "127.0.0.1", 6465)
    url = "tls://h:1?ca=/a/ca.pem&cert=/a/c.pem&key=/a/k.pem&insecure=0"
    assert parse_endpoint(url) == ("tls", "h", 1)
    assert tls_query(url) == {"ca": "/a/ca.pem", "cert": "/a/c.pem", "key": "/a/k.pem", "insecure": "0"}
    assert without_query(url) == "tls://h:1"
    for bad, message in [("tcp://h:1?ca=x", "a tcp URL has no path"), ("tls://h:1?cafile=x", "unknown TLS option"),
                         ("tls://h:1?ca=x&ca=y", "given twice"), ("tls://h:1?ca", "the query is not KEY=VALUE")]:
        with pytest.raises(ValueError, match=message):
            parse_endpoint(bad)
    with pytest.raises(Exception, match="port 0 cannot be connected to"):
        connect_endpoint("tls://127.0.0.1:0")


def test_client_options_go_into_the_url_as_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = client_url("tls://h:1", ca="ca.pem", cert="c.pem", key="k.pem")
    assert ClientTls.from_url(url) == ClientTls(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"),
                                                str(tmp_path / "k.pem"))
    assert ClientTls.from_url(client_url("tls://h:1", insecure=True)).insecure
    assert client_url("tcp://h:1") == "tcp://h:1"
    with pytest.raises(ValueError, match="--tls-\\* options need a tls:// URL"):
        client_url("tcp://h:1", ca="ca.pem")


def test_client_context_errors_name_what_to_do(ca: Ca, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="tls:// needs --tls-ca FILE"):
        ClientTls().context()
    with pytest.raises(TlsConfigError, match="needs both --tls-cert and --tls-key"):
        ClientTls(ca=str(ca.pem), cert=str(ca.where / "vm1.pem")).context()
    with pytest.raises(TlsConfigError, match=f"CA file {tmp_path}/none.pem: no such file or directory"):
        ClientTls(ca=str(tmp_path / "none.pem")).context()
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="no PEM certificate in it; is it the right file"):
        ClientTls(ca=str(tmp_path / "junk.pem")).context()
    ctx = ClientTls(ca=str(ca.pem), cert=str(ca.where / "vm1.pem"), key=str(ca.where / "vm1.key")).context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    loose = ClientTls(insecure=True).context()
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname


def test_server_context_checks_its_files(ca: Ca, tmp_path: Path) -> None:
    cert, key = str(ca.where / "server.pem"), str(ca.where / "server.key")
    with pytest.raises(TlsConfigError, match=f"key file {ca.where}/vm1.key does not belong to certificate file"):
        server_context(cert, str(ca.where / "vm1.key"))
    with pytest.raises(TlsConfigError, match="no PEM private key in it"):
        server_context(cert, cert)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    open_key = shared / "server.key"
    open_key.write_bytes(Path(key).read_bytes())
    os.chmod(open_key, 0o644)
    with pytest.raises(TlsConfigError, match="permissions 0644 are too open"):
        server_context(cert, str(open_key))
    assert server_context(cert, key).verify_mode == ssl.CERT_NONE
    assert server_context(cert, key, str(ca.pem)).verify_mode == ssl.CERT_REQUIRED
    assert server_context(cert, key, str(ca.pem), client_cert_required=False).verify_mode == ssl.CERT_OPTIONAL


def test_tls_and_https_config_sections(ca: Ca, tmp_path: Path) -> None:
    cert, key = ca.where / "server.pem", ca.where / "server.key"
    path = tmp_path / "p.toml"
    path.write_text(f'[tls]\ncert_file = "{cert}"\n')
    with pytest.raises(ConfigError, match=r"p.toml: \[tls\]: needs both cert_file and key_file"):
        Config.load(str(path))
    path.write_text(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_ca = "x"\n')
    with pytest.raises(ConfigError, match=r"\[tls\] client_ca: unknown setting; known: cert_file, key_file, "
                                          r"client_ca_file"):
        Config.load(str(path))
    path.write_text(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{tmp_path}/no.pem"\n')
    with pytest.raises(ConfigError, match=rf"\[tls\]: client CA file {tmp_path}/no.pem: no such file"):
        Config.load(str(path))
    path.write_text(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{ca.pem}"\n'
                    f'[http]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\ntls_client_ca_file = "{ca.pem}"\n')
    cfg = Config.load(str(path))
    # The VMBus listener verifies a certificate that is presented and refuses a client without one itself
    # (TlsGate); the HTTPS listener lets a client without one come with the token.
    assert cfg.tls.context is not None and cfg.tls.context.verify_mode == ssl.CERT_OPTIONAL
    assert cfg.http.ssl_context is not None and cfg.http.client_certs
    path.write_text(f'[http]\ntls_key_file = "{key}"\n')
    with pytest.raises(ConfigError, match=r"\[http\]: HTTPS needs both tls_cert_file and tls_key_file"):
        Config.load(str(path))


class _Transport:
    def __init__(self, cert: Any) -> None:
        self.cert = cert

    def get_extra_info(self, name: str) -> Any:
        return self.cert if name == "peercert" else None


def test_certificate_names_and_partition_names() -> None:
    cert = {"subject": ((("countryName", "XX"),), (("commonName", "vm1"),)),
            "subjectAltName": (("DNS", "vm1"), ("DNS", "vm1.example"), ("IP Address", "10.0.0.1"))}
    assert peer_names(_Transport(cert)) == ["vm1", "vm1.example"]  # type: ignore[arg-type]
    assert peer_names(_Transport({})) is None  # type: ignore[arg-type]
    assert name_matches("vm1", ["vm1"]) and not name_matches("vm10", ["vm1"])
    assert name_matches("load-7-3", ["load-*"]) and not name_matches("lo", ["load-*"])


def test_handshake_failures_in_words() -> None:
    verify = ssl.SSLCertVerificationError(1, "x")
    verify.verify_message = "unable to get local issuer certificate"
    assert tls_reason(verify) == "the certificate is not trusted: unable to get local issuer certificate"
    wrong = ssl.SSLError(1, "x")
    wrong.reason = "WRONG_VERSION_NUMBER"
    assert tls_reason(wrong) == "the other side does not speak TLS (wrong version number)"
    assert tls_reason(ConnectionAbortedError("SSL handshake is taking longer than 10 seconds")) == \
        "no TLS handshake in time"
    assert tls_reason(ConnectionResetError()) == "the other side closed the connection during the TLS handshake"


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Log:
    def __init__(self) -> None:
        self.warnings: list[dict[str, Any]] = []

    def bind(self, **_: Any) -> _Log:
        return self

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append({"event": event, **fields})


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_gate_hands_over_a_connection_whose_client_spoke_first(ca: Ca, loop: str) -> None:
    """Client and server in one loop: the ClientHello reaches the gate before its handshake starts (uvloop reads
    right after connection_made). It must go to the handshake, and the data after it to the protocol."""
    server = server_context(str(ca.where / "server.pem"), str(ca.where / "server.key"), str(ca.pem),
                            client_cert_required=False)
    client = ClientTls(ca=str(ca.pem), cert=str(ca.where / "vm1.pem"), key=str(ca.where / "vm1.key")).context()
    log = _Log()

    async def main() -> tuple[bytes, list[str] | None]:
        ev = asyncio.get_running_loop()
        srv = await ev.create_server(lambda: TlsGate(server, _Echo, 10.0, log), "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"), 20)
            writer.write(b"hello over tls")
            echoed = await asyncio.wait_for(reader.readexactly(14), 20)
            names = peer_names(writer.transport)  # the parent's certificate, as the child sees it
            writer.close()
            return echoed, names
        finally:
            srv.close()

    runner = uvloop.run if loop == "uvloop" else asyncio.run
    assert runner(main()) == (b"hello over tls", ["parent", "localhost"])
    assert log.warnings == [], log.warnings
