"""The challenge-response of docs/protocol.md §3.1, sans-IO: the guest's and the parent's state machines wired
together in memory, every refusal, malformed fields, the bytes on the wire, and the transcript as documented."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Iterator

import msgpack
import pytest

from vmbus_proto.auth import GUEST, HOST, AuthError, GuestAuth, HostAuth, parse_secret, proof, transcript
from vmbus_proto.envelope import AUTH_HMAC, Hello, decode_auth, encode_auth
from vmbus_proto.errors import FrameError
from vmbus_proto.framing import ENVELOPE_VERSION

SECRET = bytes(range(32, 64))
OTHER = bytes(range(64, 96))


def counter_random() -> Callable[[int], bytes]:
    """Deterministic 'random' bytes, different on every call (a fresh nonce each time)."""
    calls: Iterator[int] = iter(range(1, 1 << 16))

    def random(n: int) -> bytes:
        return bytes([next(calls) % 256]) * n
    return random


def host(secrets: dict[str, bytes], *, open_allowed: bool = False, random: Callable[[int], bytes] | None = None
         ) -> HostAuth:
    return HostAuth("parent", secrets.get, open_allowed, random=random or counter_random())


class Wire:
    """Every body either side put on the wire, as encoded bytes."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def hello(self, h: Hello) -> Hello:
        body = h.encode()
        self.sent.append(body)
        return Hello.decode(body)  # what the peer decodes

    def auth(self, body: bytes) -> bytes:
        self.sent.append(body)
        return body


def handshake(guest: GuestAuth, parent: HostAuth, wire: Wire) -> None:
    """HELLO, HELLO (challenge), AUTH, AUTH, as the connection runs them."""
    challenge = parent.receive_hello(wire.hello(guest.hello()))
    assert challenge is not None, "the parent did not challenge a guest that offered hmac-sha256"
    guest_proof = guest.receive_hello(wire.hello(challenge))
    assert guest_proof is not None
    guest.receive_auth(wire.auth(parent.receive_proof(wire.auth(guest_proof))))


def test_a_good_proof_authenticates_both_sides() -> None:
    wire = Wire()
    guest, parent = GuestAuth("vm1", SECRET, random=counter_random()), host({"vm1": SECRET})
    handshake(guest, parent, wire)
    assert parent.authenticated and guest.done
    assert [len(b) for b in wire.sent[2:]] == [len(encode_auth(bytes(32)))] * 2


def test_the_secret_never_appears_on_the_wire() -> None:
    wire = Wire()
    handshake(GuestAuth("vm1", SECRET), host({"vm1": SECRET}, random=None), wire)
    on_wire = b"".join(wire.sent)
    assert len(wire.sent) == 4
    for form in (SECRET, SECRET.hex().encode(), SECRET[:16], SECRET[16:]):
        assert form not in on_wire, f"the secret (or half of it) was sent: {form!r}"


def test_a_wrong_secret_is_refused_and_the_log_says_why() -> None:
    guest, parent = GuestAuth("vm1", OTHER), host({"vm1": SECRET})
    challenge = parent.receive_hello(guest.hello())
    assert challenge is not None
    bad = guest.receive_hello(challenge)
    assert bad is not None
    with pytest.raises(AuthError) as refused:
        parent.receive_proof(bad)
    assert (refused.value.code, refused.value.reason, refused.value.detail) == (
        "auth-failed", "authentication failed for partition 'vm1'", "wrong proof")
    assert not parent.authenticated


def test_an_unknown_name_is_challenged_and_refused_like_a_wrong_secret() -> None:
    """The guest cannot tell a name the parent has no secret for from a wrong secret; the parent's log can."""
    guest, parent = GuestAuth("nobody", SECRET), host({"vm1": SECRET})
    challenge = parent.receive_hello(guest.hello())
    assert challenge is not None and challenge.auth == AUTH_HMAC
    answer = guest.receive_hello(challenge)
    assert answer is not None
    with pytest.raises(AuthError) as refused:
        parent.receive_proof(answer)
    assert (refused.value.code, refused.value.reason) == ("auth-failed", "authentication failed for partition 'nobody'")
    assert refused.value.detail == "no secret is configured for this name"


def test_a_replayed_proof_fails_on_a_new_connection() -> None:
    """An eavesdropper resends the guest's HELLO and its proof: the parent's nonce is new, so the proof is stale."""
    random = counter_random()
    guest = GuestAuth("vm1", SECRET, random=random)
    first = host({"vm1": SECRET}, random=random)
    challenge = first.receive_hello(guest.hello())
    assert challenge is not None
    recorded = guest.receive_hello(challenge)
    assert recorded is not None
    first.receive_proof(recorded)  # the real guest got in
    second = host({"vm1": SECRET}, random=random)
    replay_challenge = second.receive_hello(guest.hello())  # the same guest nonce, replayed
    assert replay_challenge is not None and replay_challenge.nonce != challenge.nonce
    with pytest.raises(AuthError, match="authentication failed"):
        second.receive_proof(recorded)


def test_a_parent_without_the_secret_cannot_prove_itself() -> None:
    """Mutual: a parent that answers the challenge with another secret is refused by the guest."""
    guest, fake = GuestAuth("vm1", SECRET), host({"vm1": OTHER})
    challenge = fake.receive_hello(guest.hello())
    assert challenge is not None and fake.guest is not None and challenge.nonce and guest.nonce
    guest.receive_hello(challenge)
    # The fake parent cannot verify the guest, but answers with the proof its own secret makes.
    script = transcript(ENVELOPE_VERSION, "vm1", "parent", guest.nonce, challenge.nonce)
    with pytest.raises(AuthError) as refused:
        guest.receive_auth(encode_auth(proof(OTHER, HOST, script)))
    assert refused.value.code == "auth-parent" and not guest.done


def test_the_guests_own_proof_reflected_back_is_not_the_parents() -> None:
    guest, parent = GuestAuth("vm1", SECRET), host({"vm1": SECRET})
    challenge = parent.receive_hello(guest.hello())
    assert challenge is not None
    mine = guest.receive_hello(challenge)
    assert mine is not None
    with pytest.raises(AuthError, match="proof is wrong"):
        guest.receive_auth(mine)


def test_a_guest_with_a_secret_refuses_a_parent_that_skips_authentication() -> None:
    guest = GuestAuth("vm1", SECRET)
    with pytest.raises(AuthError) as refused:
        guest.receive_hello(Hello(ENVELOPE_VERSION, "parent"))
    assert refused.value.code == "auth"


@pytest.mark.parametrize(("secrets", "open_allowed", "hello", "expected"), [
    ({"vm1": SECRET}, True, Hello(ENVELOPE_VERSION, "vm1"), "authentication required: partition 'vm1' has a secret"),
    ({}, False, Hello(ENVELOPE_VERSION, "vm2"), "authentication required: this parent accepts only authenticated"),
    ({}, True, Hello(ENVELOPE_VERSION, "vm2", "kerberos"), "authentication method 'kerberos' is not offered"),
], ids=["configured-name-without-proof", "unauthenticated-where-not-open", "unknown-method"])
def test_missing_authentication_is_refused(secrets: dict[str, bytes], open_allowed: bool, hello: Hello,
                                           expected: str) -> None:
    with pytest.raises(AuthError) as refused:
        host(secrets, open_allowed=open_allowed).receive_hello(hello)
    assert refused.value.code == "auth" and refused.value.reason.startswith(expected), refused.value.reason


def test_the_open_mode_takes_an_unconfigured_name_without_authentication() -> None:
    parent = host({"vm1": SECRET}, open_allowed=True)
    assert parent.receive_hello(Hello(ENVELOPE_VERSION, "vm2")) is None
    assert parent.reply() == Hello(ENVELOPE_VERSION, "parent")
    assert not parent.authenticated
    guest = GuestAuth("vm2", None)
    assert guest.hello().auth == "none" and guest.hello().nonce is None
    assert guest.receive_hello(parent.reply()) is None and guest.done


def test_proof_and_hello_out_of_order_are_frame_errors() -> None:
    parent = host({"vm1": SECRET})
    with pytest.raises(FrameError, match="AUTH frame when none was due"):
        parent.receive_proof(encode_auth(bytes(32)))  # a proof before any HELLO
    parent.receive_hello(GuestAuth("vm1", SECRET).hello())
    with pytest.raises(FrameError, match="second HELLO"):
        parent.receive_hello(GuestAuth("vm1", SECRET).hello())
    guest = GuestAuth("vm1", None)
    with pytest.raises(FrameError, match="AUTH frame from the host when none was due"):
        guest.receive_auth(encode_auth(bytes(32)))


@pytest.mark.parametrize(("body", "needle"), [
    ({"envelope": 2, "partition": "vm1", "auth": "hmac-sha256"}, "needs a nonce of 32 bytes"),
    ({"envelope": 2, "partition": "vm1", "auth": "hmac-sha256", "nonce": bytes(31)}, "needs a nonce of 32 bytes"),
    ({"envelope": 2, "partition": "vm1", "auth": "hmac-sha256", "nonce": "x" * 32}, "needs a nonce of 32 bytes"),
    ({"envelope": 2, "partition": "vm1", "auth": 7}, "auth (str)"),
], ids=["no-nonce", "short-nonce", "str-nonce", "auth-not-str"])
def test_a_malformed_hello_is_a_frame_error(body: dict[str, object], needle: str) -> None:
    with pytest.raises(FrameError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Hello.decode(msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize("body", [
    b"\xc1", msgpack.packb([1, 2]), msgpack.packb({}), msgpack.packb({"proof": "a" * 32}),
    msgpack.packb({"proof": bytes(31)}, use_bin_type=True), msgpack.packb({"proof": bytes(33)}, use_bin_type=True),
], ids=["not-msgpack", "array", "no-proof", "str-proof", "short", "long"])
def test_a_malformed_auth_body_is_a_frame_error(body: bytes) -> None:
    with pytest.raises(FrameError):
        decode_auth(body)
    parent = host({"vm1": SECRET})
    parent.receive_hello(GuestAuth("vm1", SECRET).hello())
    with pytest.raises(FrameError):
        parent.receive_proof(body)
    assert not parent.authenticated


def test_the_transcript_and_proofs_are_the_documented_bytes() -> None:
    """docs/protocol.md §3.1, built here by hand from the table: a second implementation computes the same."""
    g_nonce, h_nonce = bytes([0xAA]) * 32, bytes([0xBB]) * 32
    by_hand = (b"vmbus-emu auth hmac-sha256 v1\x00" + struct.pack("<I", 2) + struct.pack("<H", 3) + b"vm1"
               + struct.pack("<H", 6) + b"parent" + g_nonce + h_nonce)
    assert transcript(2, "vm1", "parent", g_nonce, h_nonce) == by_hand
    assert proof(SECRET, GUEST, by_hand) == hmac.new(SECRET, b"guest\x00" + by_hand, hashlib.sha256).digest()
    assert proof(SECRET, HOST, by_hand) == hmac.new(SECRET, b"host\x00" + by_hand, hashlib.sha256).digest()
    assert proof(SECRET, GUEST, by_hand) != proof(SECRET, HOST, by_hand)


def test_the_hello_without_authentication_is_byte_for_byte_what_it_was() -> None:
    """A guest without a secret sends the envelope-2 HELLO older parents know (no nonce key)."""
    assert msgpack.unpackb(GuestAuth("vm1", None).hello().encode()) == {
        "envelope": 2, "partition": "vm1", "auth": "none", "data_window": 8 * 1024 * 1024}


@pytest.mark.parametrize(("data", "expected"), [
    (b"ab" * 32 + b"\n", bytes([0xAB]) * 32),  # hex, as 'secret new' writes it
    (bytes(range(40)), bytes(range(40))),  # raw bytes
    (b"  " + b"0F" * 40 + b"\r\n", bytes([0x0F]) * 40),
])
def test_a_secret_is_hex_or_raw_bytes(data: bytes, expected: bytes) -> None:
    assert parse_secret(data, "f") == expected


@pytest.mark.parametrize("data", [b"ab" * 31, b"short secret", b""])
def test_a_short_secret_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        parse_secret(data, "f")
