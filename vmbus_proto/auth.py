"""Challenge-response authentication of a partition at connect time, sans-IO (docs/protocol.md §3.1).

Not Hyper-V's: there, a guest is whichever VM the host started. Over a socket anyone can connect and claim a
partition name, so a partition the parent knows shares a secret with it and proves that it holds it before its
INITIATE_CONTACT is accepted, and the parent proves it back (mutual). The shape is CHAP's (RFC 1994) and
SCRAM's (RFC 5802) nonce exchange: each side puts a fresh random nonce in its HELLO; each proves with
HMAC-SHA256(secret, role label || transcript), where the transcript binds the method, the envelope version,
both names and both nonces. The secret never travels; a recorded proof is worthless on another connection (the
other side's nonce is new); the role label keeps one side's proof from being reflected as the other's.

``GuestAuth`` and ``HostAuth`` are the two sides' state machines: HELLOs and AUTH bodies in, HELLOs and AUTH
bodies out, refusals raised as ``AuthError`` with the CLOSE code to send (``envelope.REFUSAL_CODES``). Nonces
come from ``os.urandom`` unless a test passes its own source.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from .envelope import AUTH_HMAC, AUTH_NONE, DEFAULT_DATA_WINDOW, NONCE_SIZE, Hello, decode_auth, encode_auth
from .errors import FrameError
from .framing import ENVELOPE_VERSION

LABEL = b"vmbus-emu auth hmac-sha256 v1"  # the transcript's first bytes: the method and its version
MIN_SECRET = 32  # bytes; shorter secrets are refused where they are read
GUEST, HOST = b"guest", b"host"  # the role labels

Random = Callable[[int], bytes]


class AuthError(FrameError):
    """An authentication step failed: ``code`` is the CLOSE code (or, on the guest, the kind of refusal),
    ``reason`` the words the peer is told, ``detail`` what only the local log says (which of unknown name or
    wrong proof it was: the peer is not told)."""

    def __init__(self, code: str, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.detail = detail

    @property
    def log_fields(self) -> dict[str, str]:
        return {"detail": self.detail} if self.detail else {}


def transcript(envelope: int, guest: str, host: str, guest_nonce: bytes, host_nonce: bytes) -> bytes:
    """LABEL, 0x00, u32le envelope, u16le length + UTF-8 guest name, u16le length + UTF-8 host name, the
    guest's nonce, the host's nonce."""
    g, h = guest.encode(), host.encode()
    return b"".join((LABEL, b"\0", struct.pack("<IH", envelope, len(g)), g, struct.pack("<H", len(h)), h,
                     guest_nonce, host_nonce))


def proof(secret: bytes, role: bytes, script: bytes) -> bytes:
    """HMAC-SHA256(secret, role || 0x00 || transcript)."""
    return hmac.new(secret, role + b"\0" + script, hashlib.sha256).digest()


def parse_secret(data: bytes, where: str) -> bytes:
    """A secret file's bytes as the secret: hex text (an even number of hex digits, surrounding whitespace
    ignored) is decoded, anything else is used as it is; either way at least ``MIN_SECRET`` bytes."""
    text = data.strip()
    secret = data
    if text and len(text) % 2 == 0 and all(c in b"0123456789abcdefABCDEF" for c in text):
        secret = bytes.fromhex(text.decode())
    if len(secret) < MIN_SECRET:
        raise ValueError(f"{where}: a secret must be at least {MIN_SECRET} bytes ({2 * MIN_SECRET} hex digits); "
                         f"this one is {len(secret)}; make one with 'parent-partition secret new NAME'")
    return secret


class GuestAuth:
    """The child's side. ``hello()`` is its HELLO; ``receive_hello`` takes the parent's and returns the AUTH
    body to send (or None: no authentication, the handshake is done); ``receive_auth`` checks the parent's
    proof. ``done`` once the parent is accepted. Refusals raise AuthError with kind ``auth`` (the parent
    offers no authentication, which a child holding a secret never accepts) or ``auth-parent`` (its proof is
    wrong: it does not know this partition's secret)."""

    def __init__(self, name: str, secret: bytes | None, *, data_window: int = DEFAULT_DATA_WINDOW,
                 envelope: int = ENVELOPE_VERSION, random: Random = os.urandom) -> None:
        self.name, self.secret, self.envelope, self.data_window = name, secret, envelope, data_window
        self.nonce = random(NONCE_SIZE) if secret is not None else None
        self.host: Hello | None = None
        self._script = b""
        self.done = False

    def hello(self) -> Hello:
        return Hello(self.envelope, self.name, AUTH_NONE if self.secret is None else AUTH_HMAC, self.data_window,
                     self.nonce)

    def receive_hello(self, hello: Hello) -> bytes | None:
        if self.host is not None:
            raise FrameError("second HELLO from the host")
        self.host = hello
        if self.secret is None or self.nonce is None:
            if hello.auth != AUTH_NONE:
                raise AuthError("auth", f"the parent asks for authentication ({hello.auth!r}) unasked")
            self.done = True
            return None
        if hello.auth != AUTH_HMAC or hello.nonce is None:
            raise AuthError("auth", f"the parent answered with auth {hello.auth!r}: it cannot prove that it holds "
                                    f"this partition's secret (this child insists on {AUTH_HMAC!r})")
        self._script = transcript(self.envelope, self.name, hello.partition, self.nonce, hello.nonce)
        return encode_auth(proof(self.secret, GUEST, self._script))

    def receive_auth(self, body: bytes | memoryview) -> None:
        if self.secret is None or not self._script or self.done:
            raise FrameError("AUTH frame from the host when none was due")
        theirs = decode_auth(body)
        if not hmac.compare_digest(theirs, proof(self.secret, HOST, self._script)):
            raise AuthError("auth-parent", "the parent's proof is wrong: it does not hold this partition's secret")
        self.done = True


class HostAuth:
    """The parent's side for one connection. ``lookup(name)`` is the secret configured for a partition name
    (or None); ``open_allowed`` whether a partition with no secret configured may connect unauthenticated
    (the open mode, on a loopback or Unix listener).

    ``receive_hello`` returns the HELLO to answer with at once (the challenge: auth "hmac-sha256" and the
    parent's nonce), or None when the guest is accepted without authentication (answer with ``reply()``);
    ``receive_proof`` checks the guest's AUTH and returns the parent's AUTH body. ``authenticated`` after a
    good proof. Refusals raise AuthError with the CLOSE code: ``auth`` (no method in common: this name or this
    address needs a secret, or an unknown method) or ``auth-failed`` (a wrong proof, or a name with no secret
    configured: the guest is told the same for both, the log says which)."""

    def __init__(self, host_name: str, lookup: Callable[[str], bytes | None], open_allowed: bool, *,
                 data_window: int = DEFAULT_DATA_WINDOW, envelope: int = ENVELOPE_VERSION,
                 random: Random = os.urandom) -> None:
        self.host_name, self.lookup, self.open_allowed = host_name, lookup, open_allowed
        self.data_window, self.envelope, self._random = data_window, envelope, random
        self.guest: Hello | None = None
        self.authenticated = False
        self._secret = b""
        self._known = False
        self._script = b""

    def reply(self, nonce: bytes | None = None) -> Hello:
        return Hello(self.envelope, self.host_name, AUTH_NONE if nonce is None else AUTH_HMAC, self.data_window,
                     nonce)

    def receive_hello(self, hello: Hello) -> Hello | None:
        if self.guest is not None:
            raise FrameError("second HELLO on one connection")
        self.guest = hello
        secret = self.lookup(hello.partition)
        if hello.auth == AUTH_NONE:
            if secret is not None:
                raise AuthError("auth", f"authentication required: partition {hello.partition!r} has a secret on "
                                        f"this parent")
            if not self.open_allowed:
                raise AuthError("auth", f"authentication required: this parent accepts only authenticated "
                                        f"partitions ({AUTH_HMAC}) on this address")
            return None
        if hello.auth != AUTH_HMAC or hello.nonce is None:
            raise AuthError("auth", f"authentication method {hello.auth!r} is not offered by this parent "
                                    f"(it offers {AUTH_NONE!r} and {AUTH_HMAC!r})")
        # A name with no secret is challenged all the same (with a key nobody holds), so that the answer to an
        # unknown name and to a wrong secret look alike to the guest.
        self._known = secret is not None
        self._secret = secret if secret is not None else self._random(MIN_SECRET)
        nonce = self._random(NONCE_SIZE)
        self._script = transcript(self.envelope, hello.partition, self.host_name, hello.nonce, nonce)
        return self.reply(nonce)

    def receive_proof(self, body: bytes | memoryview) -> bytes:
        if not self._script or self.authenticated or self.guest is None:
            raise FrameError("AUTH frame when none was due")
        theirs = decode_auth(body)
        good = hmac.compare_digest(theirs, proof(self._secret, GUEST, self._script))
        if not (good and self._known):
            name = self.guest.partition
            raise AuthError("auth-failed", f"authentication failed for partition {name!r}",
                            "no secret is configured for this name" if not self._known else "wrong proof")
        self.authenticated = True
        return encode_auth(proof(self._secret, HOST, self._script))
