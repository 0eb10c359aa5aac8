"""Every decoder under bad input, in the normal suite (issue 12, "Bad input, at scale"): the fuzz targets of
tests/fuzz run on their whole stored corpus (real traffic, inputs atheris found, former crashes), on random
mutations of it and on plain random bytes, through Hypothesis; plus round trips where encoders exist.

Bounded for CI: ``FUZZ_EXAMPLES`` (default 60) examples per target and property, derandomized, no example
database, so a run is reproducible. More: ``FUZZ_EXAMPLES=5000 pytest tests/unit/test_fuzz_decoders.py``.
Coverage-guided runs are ``make fuzz`` (atheris)."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import seeds
from tests.fuzz.targets import TARGETS, Target
from vmbus_proto import envelope, gpadl, messages
from vmbus_proto.errors import MessageError
from vmbus_proto.packets import GpaRange, Packet, PacketType

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def mutated(draw: st.DrawFn, corpus: tuple[bytes, ...]) -> bytes:
    """A corpus input with a few byte-level mutations (as libFuzzer's: flip, set, insert, erase, cut)."""
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 4))
        at = draw(st.integers(0, len(data)))
        if op == 0 and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and at < len(data):
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3:
            del data[at:at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def _corpus(target: Target) -> tuple[bytes, ...]:
    return tuple(seeds.corpus(target.name)) or tuple(seeds.SEEDS[target.name]())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_stored_corpus_replays_cleanly(name: str) -> None:
    """Every stored input (seeds, found coverage, former crashes) gives a value or the layer's own error."""
    target = TARGETS[name]
    stored = seeds.corpus(name)
    assert stored, f"no stored corpus for {name}: run python -m tests.fuzz --seed"
    for data in stored:
        target(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_corpus(name: str) -> None:
    target = TARGETS[name]

    @FUZZ
    @given(mutated(_corpus(target)))
    def run(data: bytes) -> None:
        target(data)

    run()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_random_bytes(name: str) -> None:
    target = TARGETS[name]

    @FUZZ
    @given(st.binary(max_size=512))
    def run(data: bytes) -> None:
        target(data)

    run()


def test_seeds_are_real_traffic() -> None:
    """The seeds decode: a fuzz run starts from inputs that reach deep into each decoder, not from errors."""
    for name, make in seeds.SEEDS.items():
        made = list(make())
        clean = 0
        for data in made:
            try:
                TARGETS[name].run(data)
                clean += 1
            except TARGETS[name].expected:
                pass
        assert clean * 2 >= len(made), f"{name}: only {clean} of {len(made)} seeds decode without error"


# ---- round trips where encoders exist ------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def _message_strategy() -> st.SearchStrategy[messages.Message]:
    kinds = {"B": st.integers(0, 0xFF), "H": u16, "I": u32, "Q": u64, "i": st.integers(-(1 << 31), (1 << 31) - 1),
             "guid": st.builds(lambda b: uuid.UUID(bytes_le=b), st.binary(min_size=16, max_size=16)),
             "bytes120": st.binary(max_size=120),
             "pfns": st.lists(u64, max_size=messages.GPADL_BODY_MAX_PFNS).map(tuple),
             "ranges": st.lists(st.tuples(u32, u32), max_size=4).map(tuple)}
    options = []
    for cls in set(messages._REGISTRY.values()):
        fields = {name: kinds[kind] for name, kind in cls.LAYOUT}
        options.append(st.builds(cls, **fields))
    return st.one_of(options)


@FUZZ
@given(_message_strategy())
def test_control_messages_round_trip(msg: messages.Message) -> None:
    assert messages.decode(msg.encode()) == msg


def _range() -> st.SearchStrategy[GpaRange]:
    return st.builds(lambda off, count: GpaRange(count, off, tuple(range(0x100, 0x100 + (off + count + 4095) // 4096))),
                     st.integers(0, 4095), st.integers(1, 5 * 4096))


packets = st.one_of(
    st.builds(Packet, st.sampled_from([PacketType.DATA_INBAND, PacketType.COMP]),
              st.integers(0, 1), u64, st.binary(max_size=300)),
    st.builds(lambda f, tid, p, rs: Packet(PacketType.DATA_USING_GPA_DIRECT, f, tid, p, tuple(rs)),
              st.integers(0, 1), u64, st.binary(max_size=64), st.lists(_range(), min_size=1, max_size=3)),
    st.builds(lambda tid, p, ps, xr: Packet(PacketType.DATA_USING_XFER_PAGES, 0, tid, p, xfer_pageset_id=ps,
                                            xfer_ranges=tuple(xr)),
              u64, st.binary(max_size=64), u16, st.lists(st.tuples(u32, u32), min_size=1, max_size=4)))


@FUZZ
@given(packets)
def test_packets_round_trip_with_their_ring_size(pkt: Packet) -> None:
    again = envelope.decode_packet(envelope.encode_packet(pkt), b"", 1 << 16)
    assert again == pkt
    assert again.ring_size == pkt.ring_size, "the decoder's fast path disagrees with the ring-size formula"


@FUZZ
@given(st.integers(0, 1), st.dictionaries(st.sampled_from(["read_index", "interrupt_mask", "data_read_index"]),
                                          u32))
def test_signals_round_trip(ring: int, fields: dict[str, int]) -> None:
    sig = envelope.Signal(ring, **fields)
    assert envelope.Signal.decode(sig.encode()) == sig


@FUZZ
@given(st.text(min_size=1, max_size=64).filter(str.isprintable), st.text(max_size=20),
       st.integers(envelope.MIN_DATA_WINDOW // 8, envelope.MAX_DATA_WINDOW // 8).map(lambda n: n * 8))
def test_hello_round_trips(name: str, auth: str, window: int) -> None:
    hello = envelope.Hello(2, name, auth, window)
    assert envelope.Hello.decode(hello.encode()) == hello


@FUZZ
@given(st.lists(u64, min_size=1, max_size=300), st.integers(0, 4095))
def test_gpadl_split_then_assembled_is_the_same_pages(pfns: list[int], offset: int) -> None:
    count = len(pfns) * 4096 - offset
    header, bodies = gpadl.split(3, 0xE1E10, pfns, count, offset)
    asm = gpadl.GpadlAssembly.from_header(messages.decode(header.encode()))  # type: ignore[arg-type]
    for body in bodies:
        decoded = messages.decode(body.encode())
        assert isinstance(decoded, messages.GpadlBody)
        asm.add(decoded.pfns)
    assert asm.complete and asm.pfns == pfns


def test_gpadl_body_beyond_its_pages_is_refused() -> None:
    header, bodies = gpadl.split(3, 0xE1E10, list(range(30)))
    asm = gpadl.GpadlAssembly.from_header(header)
    asm.add(bodies[0].pfns)
    with pytest.raises(MessageError, match="PFNs for 30 pages"):
        asm.add((1,))
