"""TLS under VMBus and for the web API, with real processes and certificates made by ``openssl`` (docs/protocol.md
§1, §3.3; README "TLS"): a parent in ``[auth] mode = "required"`` whose TLS listener requires client certificates
takes a child whose certificate names it (every device opens, its disk writes and reads back) and refuses, once
and in one line, a child without a certificate, with a certificate another CA signed, with one naming another
partition, one that does not trust the parent, and plain TCP on the TLS port (and TLS on a plain port); the
bystanders on TLS and on the Unix socket never notice. The HTTPS API takes its token or a client certificate."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from child_partition.runner import EXIT_LOST
from vmbus_proto.aio.keyfile import new_secret_file, read_token_file
from vmbus_proto.devices.registry import ALL as OFFERED

from ..tlscerts import Ca
from .conftest import BIN, FAST_LIMITS, Parent, Proc, child, gave_up

pytestmark = pytest.mark.integration


class Pki:
    """The test's CA with the parent's certificate and client certificates, and a CA nobody configured."""

    def __init__(self, where: Path) -> None:
        self.ca = Ca.make(where / "ca")
        self.other = Ca.make(where / "other", "other")
        self.server = self.ca.issue("parent", "parent", server=True)
        self.clients = {name: self.ca.issue(name, name) for name in ("vm1", "bystander", "vm2")}
        self.clients["probe-*"] = self.ca.issue("probe", "probe-*")
        self.clients["tlsload-*"] = self.ca.issue("tlsload", "tlsload-*")
        self.stranger = self.other.issue("vm3", "vm3")

    def args(self, name: str, *, ca: Path | None = None) -> list[str]:
        """A child's --tls-* options: this CA, and the client certificate made for ``name`` if any."""
        out = ["--tls-ca", str(ca or self.ca.pem)]
        if name in self.clients:
            cert, key = self.clients[name]
            out += ["--tls-cert", str(cert), "--tls-key", str(key)]
        return out

    def config(self) -> str:
        cert, key = self.server
        return (f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{self.ca.pem}"\n')


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class TlsParent(Parent):
    """A parent with ``tls://`` listeners besides its TCP and Unix ones: on 127.0.0.1, which its certificate
    names, and on 127.0.0.2, which it does not."""

    def __init__(self, workdir: Path, config: str) -> None:
        super().__init__(workdir, config, ["--listen", "tls://127.0.0.1:0", "--listen", "tls://127.0.0.2:0"])
        listening = self.events("parent partition listening")[0]["listen"]
        self.tls = next(u for u in listening if u.startswith("tls://127.0.0.1:"))
        self.unnamed = next(u for u in listening if u.startswith("tls://127.0.0.2:"))


@pytest.fixture(scope="module")
def tls_parent(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsParent, Path]]:
    """Authenticated partitions only: by a client certificate on TLS, by the secret of "plain" elsewhere."""
    where = tmp_path_factory.mktemp("tls-parent")
    secrets = where / "secrets"
    secrets.mkdir(mode=0o700)
    plain = new_secret_file(secrets / "plain.key")
    config = (f'{FAST_LIMITS}\n[auth]\nmode = "required"\n[[auth.partition]]\nname = "plain"\n'
              f'secret_file = "{plain}"\n{pki.config()}')
    p = TlsParent(where / "parent", config)
    yield p, plain
    p.stop()


@pytest.fixture(scope="module")
def bystanders(tls_parent: tuple[TlsParent, Path], pki: Pki,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    """A child on TLS and one on the Unix socket, which must never notice the refused ones."""
    parent, plain = tls_parent
    where = tmp_path_factory.mktemp("bystanders")
    vms = [child(where, parent.tls, "bystander", *pki.args("bystander")),
           child(where, parent.unix, "plain", "--secret-file", str(plain))]
    for vm in vms:
        vm.wait_event("all offered channels open")
    yield vms
    for vm in vms:
        assert not vm.events("session with the parent ended"), f"{vm.name} noticed another partition's trouble"
        assert vm.stop() == 0, f"{vm.name} did not unload cleanly"


def test_a_child_over_tls_opens_every_device_and_its_disk_reads_back(
        tls_parent: tuple[TlsParent, Path], pki: Pki, bystanders: list[Proc], tmp_path: Path) -> None:
    parent, _ = tls_parent
    vm = child(tmp_path, parent.tls, "vm1", "--disk-writes", "0.2", *pki.args("vm1"))
    ready = vm.wait_event("all offered channels open")
    assert sorted(ready["devices"]) == sorted(s.name for s in OFFERED), ready
    vm.wait_for(lambda r: r.get("event") == "disk write" and r.get("verified") is True and r.get("seq", 0) >= 3)
    # Authenticated by its certificate alone: mode "required", and no secret is configured for vm1.
    connected = parent.wait_event("partition connected", partition="vm1")
    assert connected["authenticated"] is True and connected["transport"] == "tls", connected
    assert not vm.events("disk write failed") and not vm.events("disk write read back differs")
    assert vm.stop() == 0
    # The probe, with a certificate for the names probe-* (its name is probe-HOST-PID).
    cert, key = pki.clients["probe-*"]
    probe = subprocess.run([str(BIN / "child-partition"), "probe", "--connect", parent.tls, "--tls-ca",
                            str(pki.ca.pem), "--tls-cert", str(cert), "--tls-key", str(key), "--timeout", "30"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode == 0 and "negotiated with the parent at tls://127.0.0.1:" in probe.stdout, probe.stderr


def test_the_load_tool_over_tls_in_two_processes(
        tls_parent: tuple[TlsParent, Path], pki: Pki, bystanders: list[Proc], tmp_path: Path) -> None:
    """Its worker processes get the TLS options with the rest of the command line; its partitions' names
    (tlsload-storage-PID-N) match the certificate's prefix name tlsload-*."""
    parent, _ = tls_parent
    out = tmp_path / "load.json"
    done = subprocess.run([str(BIN / "child-partition"), "load", "storage", "--connect", parent.tls,
                           *pki.args("tlsload-*"), "--name-prefix", "tlsload", "--partitions", "2", "--processes",
                           "2", "--rw", "randrw", "--bs", "4k", "--size", "8M", "--count", "100", "--warmup", "0",
                           "--runtime", "600", "--quiet", "--json", str(out)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["errors"] == [], doc["errors"]
    ops = doc["workloads"]["storage"]["ops"]
    assert ops["read"]["ops"] + ops["write"]["ops"] == 200, ops
    connected = [r for r in parent.events("partition connected") if str(r.get("partition")).startswith("tlsload-")]
    assert len(connected) == 2 and all(r["authenticated"] and r["transport"] == "tls" for r in connected), connected


def test_a_child_without_a_client_certificate_is_refused_in_words(
        tls_parent: tuple[TlsParent, Path], pki: Pki, bystanders: list[Proc], tmp_path: Path) -> None:
    parent, _ = tls_parent
    mark = parent.mark()
    line = gave_up(child(tmp_path, parent.tls, "vm1", "--tls-ca", str(pki.ca.pem)))
    assert line == (f"child-partition: error: the parent at {parent.tls} refused this child: this listener takes "
                    f"only clients with a certificate ([tls] client_ca_file); give --tls-cert and --tls-key: a "
                    f"certificate signed by the parent's [tls] client_ca_file whose CN or DNS subjectAltName is "
                    f"this --name"), line
    parent.wait_event("TLS client without a certificate refused", start=mark)
    assert len(parent.events("TLS client without a certificate refused")) == 1, "the child retried a refusal"


def test_a_client_certificate_of_another_ca_is_refused(
        tls_parent: tuple[TlsParent, Path], pki: Pki, bystanders: list[Proc], tmp_path: Path) -> None:
    parent, _ = tls_parent
    mark = parent.mark()
    cert, key = pki.stranger
    line = gave_up(child(tmp_path, parent.tls, "vm3", "--tls-ca", str(pki.ca.pem), "--tls-cert", str(cert),
                         "--tls-key", str(key)))
    assert line.startswith(f"child-partition: error: the parent at {parent.tls} dropped the TLS connection without "
                           f"a word, twice: it does not accept this child's certificate"), line
    failed = parent.wait_event("TLS handshake failed; connection dropped", start=mark)
    assert failed["reason"] == "the certificate is not trusted: unable to get local issuer certificate", failed


def test_a_certificate_naming_another_partition_is_refused(
        tls_parent: tuple[TlsParent, Path], pki: Pki, bystanders: list[Proc], tmp_path: Path) -> None:
    parent, _ = tls_parent
    line = gave_up(child(tmp_path, parent.tls, "vm1", *pki.args("vm2")))
    assert ("refused this child: the client certificate is for 'vm2', not partition 'vm1'; give --tls-cert"
            in line), line
    refused = parent.wait_for(lambda r: r.get("event") == "partition refused" and r.get("partition") == "vm1")
    assert refused["code"] == "auth-cert", refused


def test_a_child_that_does_not_trust_the_parent_gives_up(
        tls_parent: tuple[TlsParent, Path], pki: Pki, bystanders: list[Proc], tmp_path: Path) -> None:
    parent, _ = tls_parent
    line = gave_up(child(tmp_path, parent.tls, "vm1", *pki.args("vm1", ca=pki.other.pem)))
    assert line == (f"child-partition: error: cannot connect to the parent at {parent.tls}: TLS: the certificate is "
                    f"not trusted: self-signed certificate in certificate chain"), line
    # A host name the parent's certificate does not have (it names 127.0.0.1 and localhost).
    line = gave_up(child(tmp_path, parent.unnamed, "vm1", *pki.args("vm1")))
    assert "TLS: the certificate is not trusted: IP address mismatch" in line, line


def test_plain_tcp_and_tls_on_the_wrong_ports_fail_cleanly(
        tls_parent: tuple[TlsParent, Path], pki: Pki, bystanders: list[Proc], tmp_path: Path) -> None:
    parent, plain = tls_parent
    mark = parent.mark()
    plain_url = parent.tls.replace("tls://", "tcp://")
    line = gave_up(child(tmp_path, plain_url, "plain", "--secret-file", str(plain), "--no-reconnect"), EXIT_LOST)
    assert line.endswith("the parent closed the connection before answering HELLO: if it listens with TLS, "
                         "connect with tls:// (and --tls-ca)"), line
    failed = parent.wait_event("TLS handshake failed; connection dropped", start=mark)
    assert failed["reason"].startswith("the other side does not speak TLS"), failed

    line = gave_up(child(tmp_path, parent.tcp.replace("tcp://", "tls://"), "vm1", *pki.args("vm1")))
    assert "TLS: the other side does not speak TLS" in line and "is it a tcp:// listener?" in line, line
    assert parent.proc.poll() is None


def test_tls_settings_are_checked_at_start_up(pki: Pki, tmp_path: Path) -> None:
    """A tls:// listener without [tls], and a [tls] key that is not the certificate's: one line, exit 2."""
    cert, _ = pki.server
    _, wrong_key = pki.clients["vm1"]
    cases = {"": "listener tls://127.0.0.1:0 needs the parent's certificate: [tls] cert_file and key_file",
             f'[tls]\ncert_file = "{cert}"\nkey_file = "{wrong_key}"\n':
                 f"key file {wrong_key} does not belong to certificate file {cert}"}
    for n, (config, message) in enumerate(cases.items()):
        (tmp_path / f"p{n}.toml").write_text(config)
        done = subprocess.run([str(BIN / "parent-partition"), "serve", "--config", str(tmp_path / f"p{n}.toml"),
                               "--listen", "tls://127.0.0.1:0", "--http", "none", "--data-dir", str(tmp_path / "v")],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and message in done.stderr, (done.returncode, done.stderr)


# ---- HTTPS -----------------------------------------------------------------------------------------------

def client_ssl(pki: Pki, name: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.pem))
    if name is not None:
        cert, key = pki.clients[name]
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _get(url: str, ctx: ssl.SSLContext | bool, **kw: Any) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=ctx, allow_redirects=False, **kw) as resp:
        await resp.read()
        return resp.status


def test_https_api_takes_its_token_or_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    token_file = new_secret_file(tmp_path / "http.token")
    token = read_token_file(token_file)
    cert, key = pki.server
    config = (f'{FAST_LIMITS}\n[http]\ntoken_file = "{token_file}"\ntls_cert_file = "{cert}"\n'
              f'tls_key_file = "{key}"\ntls_client_ca_file = "{pki.ca.pem}"\n')
    # On a wildcard address, reached over loopback: off loopback, the API must be protected.
    parent = Parent(tmp_path / "parent", config, extra=["--http", "0.0.0.0:0"])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        assert url.startswith("https://0.0.0.0:"), url
        api = url.replace("0.0.0.0", "127.0.0.1") + "/api/partitions"
        assert asyncio.run(_get(api, client_ssl(pki))) == 401
        assert asyncio.run(_get(api, client_ssl(pki), headers={"Authorization": f"Bearer {token}"})) == 200
        assert asyncio.run(_get(api, client_ssl(pki, "vm1"))) == 200
        # A certificate another CA signed fails the handshake; plain HTTP to the HTTPS port gets no answer.
        stranger = client_ssl(pki)
        stranger.load_cert_chain(*(str(p) for p in pki.stranger))
        with pytest.raises(aiohttp.ClientError):
            asyncio.run(_get(api, stranger))
        with pytest.raises(aiohttp.ClientError):
            asyncio.run(_get(api.replace("https://", "http://"), False))
        # curl, as an operator would, with the client certificate.
        cert_file, key_file = pki.clients["vm1"]
        done = subprocess.run(["curl", "-sS", "--cacert", str(pki.ca.pem), "--cert", str(cert_file), "--key",
                               str(key_file), api], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and done.stdout == "[]", (done.returncode, done.stdout, done.stderr)
        assert parent.proc.poll() is None
    finally:
        parent.stop()


def test_https_with_only_client_certificates_may_listen_off_loopback(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.server
    config = f'[http]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\ntls_client_ca_file = "{pki.ca.pem}"\n'
    parent = Parent(tmp_path / "parent", config, extra=["--http", "0.0.0.0:0"])
    try:
        api = parent.wait_event("web console and API listening")["url"].replace("0.0.0.0", "127.0.0.1") + "/api/"
        assert asyncio.run(_get(api, client_ssl(pki))) == 401
        assert asyncio.run(_get(api, client_ssl(pki, "bystander"))) == 200
    finally:
        parent.stop()
