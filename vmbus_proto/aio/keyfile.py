"""Reading and writing partition secret files (docs/protocol.md §3.1), shared by ``parent-partition`` (its
``[[auth.partition]] secret_file``, ``secret new``) and ``child-partition`` (``--secret-file``).

The rules are OpenSSH's for a private key: a secret file that other users may read is refused with a clear
error rather than used ("UNPROTECTED PRIVATE KEY FILE!"), and a new one is created with mode 0600. Two places
keep other users out where the file's own mode cannot, and there any mode is accepted:

* a directory only its owner (you, or root) may enter, mode 0700: nobody else can open a file in it. That is
  the layout for docker compose's file secrets, which compose (without swarm) bind-mounts with the host file's
  owner and mode, so the image's user (uid 10001) can read one only if its mode lets others read it: the
  host's ``secrets/`` is 0700 and its files 0644 (README "docker compose").
* ``/run/secrets/``, where Docker (compose and swarm) and Kubernetes mount secrets: inside the container's own
  filesystem, whose access the platform decides (compose: the host file's mode; swarm 0444; Kubernetes 0644).
"""

from __future__ import annotations

import argparse
import os
import secrets
import stat
from pathlib import Path

from ..auth import MIN_SECRET, parse_secret
from .cli import os_reason

LOOSE = 0o027  # group write, or any access by others: refused
SECRETS_MOUNT = "/run/secrets"  # the platform's secrets mount: any mode accepted below it


class SecretFileError(ValueError):
    """A secret file cannot be used; the message names it and says what to do."""


def read_secret_file(path: str | Path) -> bytes:
    """The secret in ``path``: a regular file no other user can read or write, of at least 32 random bytes
    or their hex (``vmbus_proto.auth.parse_secret``)."""
    data = _read_private(path, "secret file")
    try:
        return parse_secret(data, f"secret file {path}")
    except ValueError as exc:
        raise SecretFileError(str(exc)) from None


def read_token_file(path: str | Path) -> str:
    """The HTTP API token in ``path`` (``[http] token_file``, ``send-keys --token-file``): the file's text without
    surrounding whitespace, at least 32 visible ASCII characters; the file as private as a secret file."""
    token = _read_private(path, "token file").strip()
    if len(token) < MIN_SECRET or not all(0x21 <= c < 0x7F for c in token):
        raise SecretFileError(f"token file {path}: a token is at least {MIN_SECRET} visible ASCII characters "
                              f"with no spaces; make one with 'parent-partition secret new http'")
    return token.decode()


def _read_private(path: str | Path, what: str) -> bytes:
    """A small regular file that no other user may read or write (OpenSSH's rule for a private key)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: {_lower(os_reason(exc))}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{what} {path}: not a regular file")
        if st.st_mode & LOOSE and not _kept_from_others(path):
            raise SecretFileError(f"{what} {path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open "
                                  f"(other users may read or change it); chmod 600 {path}, or keep it in a "
                                  f"directory only you may enter (chmod 700)")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(64 * 1024 + 1)
    finally:
        os.close(fd)
    if len(data) > 64 * 1024:
        raise SecretFileError(f"{what} {path}: larger than 64 KiB; is it the right file?")
    return data


def _kept_from_others(path: str | Path) -> bool:
    """Whether other users cannot reach ``path`` whatever its mode: it is under ``SECRETS_MOUNT``, or the
    directory holding it (links resolved) belongs to us or root and lets nobody else in."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, SECRETS_MOUNT]) == SECRETS_MOUNT:
        return True
    try:
        st = os.stat(os.path.dirname(real))
    except OSError:
        return False
    return st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o077


def new_secret_file(path: str | Path) -> Path:
    """Write a new secret (32 random bytes, as 64 hex digits and a newline) to ``path``, mode 0600; an existing
    file is never overwritten."""
    where = Path(path)
    try:
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SecretFileError(f"secret file {where} already exists; it is kept (remove it to make a new one)") from None
    except OSError as exc:
        raise SecretFileError(f"secret file {where}: {_lower(os_reason(exc))}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(MIN_SECRET) + "\n")
    return where


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def secret_file_arg(text: str) -> bytes:
    """argparse type: ``--secret-file PATH``, read and checked at once (a bad file is a usage error)."""
    try:
        return read_secret_file(text)
    except SecretFileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def token_file_arg(text: str) -> str:
    """argparse type: ``--token-file PATH``, read and checked at once."""
    try:
        return read_token_file(text)
    except SecretFileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_key_file(path: str | Path) -> bytes:
    """A TLS private key file (``[tls] key_file``, ``--tls-key``): as private as a secret file."""
    return _read_private(path, "key file")
