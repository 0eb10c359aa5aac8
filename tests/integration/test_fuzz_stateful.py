"""Stateful fuzzing of the host state machine over a real socket (issue 12, "Bad input, at scale").

Hypothesis drives a raw guest (tests/integration/rawclient.py) through random but well-framed sequences of
control messages (INITIATE_CONTACT with good and bad versions, REQUESTOFFERS, GPADL_HEADER/BODY well formed
or not, OPENCHANNEL, CLOSECHANNEL, GPADL_TEARDOWN, RELID_RELEASED, UNLOAD, undecodable bodies) and packets and
signals on random relids, against the real parent daemon of this module. After every step: the daemon is
alive, an observer partition on the same daemon still gets a GPADL round trip answered, and each request a
guest waits on got its answer as the protocol gives it (VERSION_RESPONSE, ALLOFFERS_DELIVERED, GPADL_CREATED,
OPENCHANNEL_RESULT, GPADL_TORNDOWN, UNLOAD_RESPONSE). A connection the daemon ends must end with a CLOSE frame
that says why. The module's bystander child must never notice; at the end no file descriptor or asyncio task
(``vmbus_parent_tasks``) is left over.

Bounded for CI (derandomized, no database): ``FUZZ_STATEFUL_EXAMPLES`` sequences (default 8) of
``FUZZ_STATEFUL_STEPS`` steps (default 30); raise both for a longer run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
import urllib.request
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bench.soak import scrape
from vmbus_proto import messages as m
from vmbus_proto.envelope import Signal, encode_packet
from vmbus_proto.framing import FrameKind
from vmbus_proto.gpadl import split
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, Packet, PacketType

from .conftest import FAST_LIMITS, OFFERED, Parent, Proc
from .rawclient import Closed, RawClient

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FUZZ_STATEFUL_EXAMPLES", "8"))
STEPS = int(os.environ.get("FUZZ_STATEFUL_STEPS", "30"))
VERSIONS = [0x50003, 0x50002, 0x50001, 0x50000, 0x40001, 0x40000, 0x30000, 0x20004, 0x60000, 0x10001, 0xDEADBEEF]
ANSWER = 30.0  # generous: the machine is loaded; an answer that never comes fails the test
_names = itertools.count()
_gpadl_ids = itertools.count(0x100000)

relids = st.one_of(st.integers(1, len(OFFERED)), st.integers(0, 4096))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tasks(url: str) -> float:
    """The parent's asyncio tasks (``vmbus_parent_tasks`` in /metrics; this scrape's own request is one)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=ANSWER) as answer:
        return scrape(answer.read().decode())["vmbus_parent_tasks"]


class Observer:
    """A well-behaved partition on the same daemon: its GPADL round trip proves the daemon serves others."""

    def __init__(self, parent: Parent) -> None:
        self.client = RawClient(parent.unix)
        self.name = f"fuzz-observer-{os.getpid()}"
        self.offers = self.client.negotiate(self.name)
        self.relid = min(self.offers)

    def round_trip(self) -> None:
        gid = next(_gpadl_ids)
        header, bodies = split(self.relid, gid, [0x2000, 0x2001])
        for msg in [header, *bodies]:
            self.client.send(msg)
        created = _expect(self.client, m.GpadlCreated, lambda c: c.gpadl == gid)
        assert created.creation_status == 0, f"the observer's GPADL was refused: {created}"
        self.client.send(m.GpadlTeardown(child_relid=self.relid, gpadl=gid))
        _expect(self.client, m.GpadlTorndown, lambda t: t.gpadl == gid)


def _expect(c: RawClient, cls: type[m.Message], match: object = None) -> m.Message:
    """The next ``cls`` message (that ``match`` accepts), skipping others; fails after ``ANSWER`` seconds."""
    deadline = time.monotonic() + ANSWER
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {cls.__name__} came in {ANSWER:g}s")
        try:
            msg = c.expect(cls, left)
        except TimeoutError:
            raise AssertionError(f"no {cls.__name__} came in {ANSWER:g}s") from None
        if match is None or match(msg):  # type: ignore[operator]
            return msg


@pytest.fixture(scope="module")
def shared_parent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parent]:
    """This module's parent (with its bystander, conftest's): disks close as soon as their last channel does
    (by default they stay open 30 s for a returning partition), so what a partition held is released at once."""
    p = Parent(tmp_path_factory.mktemp("shared") / "parent", FAST_LIMITS + "\n[storage]\nidle_close = 0\n",
               extra=["--http", "127.0.0.1:0"])
    yield p
    p.stop()


@pytest.fixture
def observer(shared_parent: Parent, bystander: Proc) -> Iterator[Observer]:
    obs = Observer(shared_parent)
    yield obs
    obs.client.close()


def test_random_control_sequences_over_a_real_socket(shared_parent: Parent, bystander: Proc,
                                                    observer: Observer) -> None:
    parent = shared_parent
    pid = parent.proc.pid
    fds_before = _fds(pid)
    url = parent.wait_event("web console and API listening")["url"]
    tasks_before = _tasks(url)
    closes: list[str] = []

    class HostMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.client: RawClient | None = None
            self.reconnect()

        def reconnect(self) -> None:
            if self.client is not None:
                self.client.close()
            n = next(_names)
            self.client = RawClient(parent.unix if n % 2 else parent.tcp)
            self.client.hello(f"fuzz-{os.getpid()}-{n}")
            self.connected = False
            self.offers_requested = False
            self.offers: set[int] = set()
            self.gpadls: set[tuple[int, int]] = set()  # (relid, gpadl) created
            self.open: set[int] = set()

        @contextlib.contextmanager
        def guest(self) -> Iterator[RawClient]:
            """The raw guest; if the daemon ends the connection, it must have said why (then reconnect)."""
            assert self.client is not None
            try:
                yield self.client
            except Closed as exc:
                assert exc.reason, "the daemon closed the connection without a CLOSE frame saying why"
                closes.append(exc.reason)
                self.reconnect()
            except (ConnectionResetError, BrokenPipeError) as exc:
                closes.append(repr(exc))
                self.reconnect()

        def teardown(self) -> None:
            if self.client is not None:
                self.client.close()

        @initialize()
        def negotiate(self) -> None:
            """Most sequences start as a guest does, so that they reach the channel and GPADL states."""
            self.initiate_contact(0x50003)
            self.request_offers()

        @rule(version=st.sampled_from(VERSIONS))
        def initiate_contact(self, version: int) -> None:
            with self.guest() as c:
                c.send(m.InitiateContact(vmbus_version_requested=version, interrupt_page=2))
                resp = _expect(c, m.VersionResponse)
                assert isinstance(resp, m.VersionResponse)
                self.connected = bool(resp.version_supported)
                self.offers_requested = False
                self.offers, self.gpadls, self.open = set(), set(), set()

        @rule()
        def request_offers(self) -> None:
            with self.guest() as c:
                c.send(m.RequestOffers())
                if self.connected and not self.offers_requested:
                    deadline = time.monotonic() + ANSWER
                    while not isinstance(msg := c.recv_message(max(0.01, deadline - time.monotonic())),
                                         m.AllOffersDelivered):
                        if isinstance(msg, m.OfferChannel):
                            self.offers.add(msg.child_relid)
                    assert len(self.offers) == len(OFFERED), f"offers {sorted(self.offers)}"
                    self.offers_requested = True

        @rule(relid=relids, pages=st.integers(1, 70), malformed=st.booleans(), reuse=st.booleans())
        def gpadl(self, relid: int, pages: int, malformed: bool, reuse: bool) -> None:
            gid = min(self.gpadls)[1] if reuse and self.gpadls else next(_gpadl_ids)
            if malformed and self.offers:
                relid = min(self.offers) + relid % len(self.offers)  # refused for its shape, not its relid
            header, bodies = split(relid, gid, list(range(0x1000, 0x1000 + pages)))
            if malformed:
                header.range_buflen += 8  # one page more than the PFNs: the host fails the GPADL
            with self.guest() as c:
                for msg in [header, *bodies]:
                    c.send(msg)
                if self.connected:
                    created = _expect(c, m.GpadlCreated, lambda g: g.gpadl == gid)
                    assert isinstance(created, m.GpadlCreated)
                    if malformed or relid not in self.offers:
                        assert created.creation_status != 0, f"bad GPADL accepted: {created}"
                    if created.creation_status == 0:
                        self.gpadls.add((relid, gid))

        @precondition(lambda self: self.connected and self.offers)
        @rule(index=st.integers(0, 64), pages=st.integers(2, 40))
        def open_ring(self, index: int, pages: int) -> None:
            """GPADL and OPENCHANNEL as a guest opens a channel, so that sequences reach open channels."""
            relid = sorted(self.offers)[index % len(self.offers)]
            self.gpadl(relid, pages, False, False)
            mine = [g for r, g in self.gpadls if r == relid]
            if mine:
                self.open_channel(relid, None, max(mine), pages // 2)

        @rule(relid=relids, data=st.data())
        def open_channel(self, relid: int, data: st.DataObject | None, gid: int | None = None,
                         downstream: int | None = None) -> None:
            if data is not None:
                mine = sorted(g for r, g in self.gpadls if r == relid)
                gid = data.draw(st.sampled_from(mine)) if mine else data.draw(st.integers(0, 0xFFFFFFFF))
                downstream = data.draw(st.integers(0, 40))
            with self.guest() as c:
                c.send(m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gid or 0,
                                     downstream_ringbuffer_pageoffset=downstream or 0))
                if self.connected and relid in self.offers:
                    result = _expect(c, m.OpenChannelResult, lambda r: r.child_relid == relid)
                    assert isinstance(result, m.OpenChannelResult)
                    if result.status == 0:
                        self.open.add(relid)

        @rule(relid=relids)
        def close_channel(self, relid: int) -> None:
            with self.guest() as c:
                c.send(m.CloseChannel(child_relid=relid))
                self.open.discard(relid)

        @rule(data=st.data())
        def gpadl_teardown(self, data: st.DataObject) -> None:
            known = sorted(self.gpadls)
            relid, gid = data.draw(st.sampled_from(known)) if known else (data.draw(relids), 1)
            with self.guest() as c:
                c.send(m.GpadlTeardown(child_relid=relid, gpadl=gid))
                if (relid, gid) in self.gpadls:
                    self.gpadls.discard((relid, gid))
                    if relid not in self.open:  # a ring in use is torn down once its channel closes
                        _expect(c, m.GpadlTorndown, lambda t: t.gpadl == gid)

        @rule(relid=relids)
        def relid_released(self, relid: int) -> None:
            with self.guest() as c:
                c.send(m.RelidReleased(child_relid=relid))
                if relid in self.offers and relid not in self.open:
                    # Released (Linux's vmbus_release_relid): the host forgets the relid for this connection,
                    # drops its GPADLs and answers nothing more for it (an OPENCHANNEL would wait forever).
                    self.offers.discard(relid)
                    self.gpadls = {(r, g) for r, g in self.gpadls if r != relid}

        @rule()
        def unload(self) -> None:
            with self.guest() as c:
                c.send(m.Unload())
                if self.connected:
                    _expect(c, m.UnloadResponse)
                    self.connected = False
                    self.offers, self.gpadls, self.open = set(), set(), set()

        @rule(body=st.one_of(st.binary(max_size=64),
                             st.dictionaries(st.sampled_from(["msgtype", "child_relid", "gpadl", "pfns", "x"]),
                                             st.one_of(st.integers(-5, 40), st.binary(max_size=4), st.none()),
                                             max_size=4).map(msgpack.packb)))
        def garbage_control(self, body: bytes) -> None:
            with self.guest() as c:
                c.send_frame(FrameKind.CONTROL, 0, body)

        @rule(relid=relids, ptype=st.sampled_from([PacketType.DATA_INBAND, PacketType.COMP]),
              payload=st.binary(max_size=64), flags=st.sampled_from([0, FLAG_COMPLETION_REQUESTED]))
        def packet(self, relid: int, ptype: int, payload: bytes, flags: int) -> None:
            if self.open and relid not in self.open and relid % 3 == 0:
                relid = min(self.open)
            with self.guest() as c:
                c.send_frame(FrameKind.PACKET, relid, encode_packet(Packet(ptype, flags, 1, payload)))

        @rule(relid=relids, ring=st.integers(0, 1), index=st.integers(0, 1 << 20).map(lambda i: i * 8))
        def signal(self, relid: int, ring: int, index: int) -> None:
            with self.guest() as c:
                c.signal(relid, Signal(ring, read_index=index, interrupt_mask=0))

        @invariant()
        def daemon_serves_others(self) -> None:
            assert parent.proc.poll() is None, f"the parent exited with {parent.proc.returncode}"
            observer.round_trip()

    run_state_machine_as_test(HostMachine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, derandomize=True, database=None, deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each replay waits on a real daemon
        suppress_health_check=list(HealthCheck)))

    # Every fuzzing connection is gone: the daemon holds no more descriptors than before (the observer's and
    # the bystander's are still open). Waited for: the daemon notices closed sockets asynchronously.
    deadline = time.monotonic() + ANSWER
    while (now := _fds(pid)) > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now <= fds_before, f"the parent holds {now} file descriptors, {fds_before} before the fuzzing"
    # ... nor more asyncio tasks: every connection's reader, writer and timers ended with it.
    while (tasks := _tasks(url)) > tasks_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tasks <= tasks_before, f"the parent runs {tasks:g} asyncio tasks, {tasks_before:g} before the fuzzing"
    # ... and keeps no partition of theirs: only the bystander and the observer are left (the JSON API).
    with urllib.request.urlopen(f"{url}/api/partitions", timeout=ANSWER) as answer:
        left = sorted(p["name"] for p in json.load(answer))
    assert left == sorted(["bystander", observer.name]), f"partitions left on the parent: {left}"
    observer.round_trip()
