"""Test certificates made with the ``openssl`` command (Debian package ``openssl``): a small CA, a server
certificate for 127.0.0.1 (IP subjectAltName) and localhost, and client certificates named after partitions."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}"


def _key_and_request(where: Path, stem: str, cn: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={cn}", cwd=where)
    os.chmod(where / f"{stem}.key", 0o600)


@dataclass(frozen=True)
class Ca:
    """A CA in ``where``: ``ca.pem`` (its certificate) and ``ca.key``; ``issue`` makes certificates it signs."""

    where: Path
    name: str = "ca"

    @classmethod
    def make(cls, where: Path, name: str = "ca") -> Ca:
        where.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", DAYS, "-subj", f"/CN=vmbus-emu test {name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)
        os.chmod(where / f"{name}.key", 0o600)
        return cls(where, name)

    @property
    def pem(self) -> Path:
        return self.where / f"{self.name}.pem"

    def issue(self, stem: str, cn: str, *, server: bool = False, dns: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """A certificate (and its key, mode 0600) for ``cn``: a server's names 127.0.0.1 and localhost; a client's
        its CN and ``dns`` as DNS subjectAltNames. Returns (certificate, key)."""
        _key_and_request(self.where, stem, cn)
        if server:
            ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        else:
            sans = ",".join(f"DNS:{n}" for n in (cn, *dns))
            ext = f"subjectAltName={sans}\nextendedKeyUsage=clientAuth\n"
        (self.where / f"{stem}.ext").write_text(ext + "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", self.pem.name, "-CAkey", f"{self.name}.key",
                 "-CAcreateserial", "-out", f"{stem}.pem", "-days", DAYS, "-extfile", f"{stem}.ext", cwd=self.where)
        return self.where / f"{stem}.pem", self.where / f"{stem}.key"
