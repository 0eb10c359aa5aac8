"""Tier 1: issue 12's limits, sans-IO: the control-message token bucket, abuse strikes, the parent-wide memory
budget, the per-connection GPADL page limit in the host core, the sub-channel cap, [limits] parsing and the
switch's MAC-spoofing drop."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from parent_partition.config import Config, ConfigError, tables_help
from parent_partition.connection import ABUSE, Subchannels
from parent_partition.devices.network.switch import Switch
from vmbus_proto import messages as m
from vmbus_proto import server as s
from vmbus_proto.framing import Frame, FrameKind
from vmbus_proto.gpadl import split
from vmbus_proto.limits import MemoryBudget, Strikes, TokenBucket
from vmbus_proto.messages import STATUS_SUCCESS, STATUS_UNSUCCESSFUL
from vmbus_proto.versions import Version

from .test_host_core import NET, STORAGE, Host, _connection, kinds, loop, sends  # noqa: F401  (loop: a fixture)


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    b = TokenBucket(rate=10, burst=5)
    assert all(b.take(100.0) for _ in range(5)), "a full bucket gives its whole burst"
    assert not b.take(100.0), "an empty bucket refuses"
    assert sum(b.take(100.25) for _ in range(5)) == 2, "0.25 s at 10/s earns two"
    assert sum(b.take(1000.0) for _ in range(10)) == 5, "a long pause refills to the burst, no more"


def test_strikes_count_within_the_window_only() -> None:
    st = Strikes(limit=3, window=10.0)
    assert not st.strike(0.0) and not st.strike(1.0)
    assert not st.strike(20.0), "strikes older than the window are forgotten"
    assert not st.strike(21.0)
    assert st.strike(22.0), "the third strike within 10 s is abuse"


def _connected(budget: MemoryBudget | None = None, total_pages: int = 1 << 18) -> s.HostConnection:
    core = s.HostConnection([STORAGE, NET], limits=s.Limits(total_gpadl_pages=total_pages, budget=budget))
    core.receive(m.InitiateContact(vmbus_version_requested=Version.WIN10_V5_3, interrupt_page=2))
    core.receive(m.RequestOffers())
    core.actions()
    return core


def _gpadl(core: s.HostConnection, relid: int, gid: int, pages: int) -> list[s.Action]:
    header, bodies = split(relid, gid, list(range(0x1000, 0x1000 + pages)))
    acts: list[s.Action] = []
    for msg in (header, *bodies):
        core.receive(m.decode(msg.encode()))
        acts += core.actions()
    return acts


def _status(acts: list[s.Action]) -> int:
    created = [x for x in sends(acts) if isinstance(x, m.GpadlCreated)]
    assert len(created) == 1, f"expected one GPADL_CREATED, got {sends(acts)}"
    return created[0].creation_status


def test_gpadl_pages_per_connection_are_limited_and_given_back() -> None:
    core = _connected(total_pages=100)
    assert _status(_gpadl(core, 1, 1, 60)) == STATUS_SUCCESS
    acts = _gpadl(core, 1, 2, 50)
    assert _status(acts) == STATUS_UNSUCCESSFUL, "a GPADL past the connection's page limit must fail"
    assert kinds(acts)[0] == s.DropKind.GPADL_PAGES_LIMIT  # then its bodies name a GPADL not in progress
    assert s.DropKind.GPADL_PAGES_LIMIT in s.LIMIT_KINDS
    assert core.gpadl_pages == 60
    core.receive(m.GpadlTeardown(child_relid=1, gpadl=1))
    for act in core.actions():
        if isinstance(act, s.TeardownGpadl):
            core.gpadl_released(act.relid, act.gpadl)
    assert core.gpadl_pages == 0, "a torn-down GPADL's pages must be given back"
    assert _status(_gpadl(core, 1, 2, 50)) == STATUS_SUCCESS


def test_the_memory_budget_is_shared_and_refuses_when_spent() -> None:
    budget = MemoryBudget(100 * s.PFN_BYTES)
    a, b = _connected(budget), _connected(budget)
    assert _status(_gpadl(a, 1, 1, 80)) == STATUS_SUCCESS
    assert budget.used == 80 * s.PFN_BYTES
    acts = _gpadl(b, 1, 7, 30)
    assert _status(acts) == STATUS_UNSUCCESSFUL, "B's GPADL must be refused while A holds the budget"
    assert kinds(acts)[0] == s.DropKind.MEMORY_BUDGET
    a.release()
    assert budget.used == 0, "a gone connection must give its bytes back"
    assert _status(_gpadl(b, 1, 7, 30)) == STATUS_SUCCESS


def test_in_progress_gpadls_count_and_an_unload_gives_them_back() -> None:
    budget = MemoryBudget(1 << 20)
    core = _connected(budget)
    header, _bodies = split(1, 9, list(range(0x1000, 0x1000 + 200)))
    core.receive(m.decode(header.encode()))
    assert core.gpadl_pages == 200 and budget.used == 200 * s.PFN_BYTES, "a GPADL in progress holds its pages"
    core.receive(m.Unload())
    core.actions()
    assert budget.used == 0, "an unload must give every GPADL's bytes back"


def test_limits_section_parses_and_names_bad_values(tmp_path: Path) -> None:
    cfg_file = tmp_path / "p.toml"
    cfg_file.write_text("[limits]\ngpadl_pages = 1000\ncontrol_per_second = 5\nstrikes = 2\n"
                        "memory_budget = 65536\nsubchannels = 0\n")
    cfg = Config.load(str(cfg_file))
    assert (cfg.limits.gpadl_pages, cfg.limits.control_per_second, cfg.limits.strikes) == (1000, 5, 2)
    assert (cfg.limits.memory_budget, cfg.limits.subchannels) == (65536, 0)
    assert "[limits] (gpadl_pages, subchannels, control_per_second" in tables_help()
    cfg_file.write_text("[limits]\nstrikes = 0\n")
    with pytest.raises(ConfigError, match=r"\[limits\] strikes: must be an integer of at least 1"):
        Config.load(str(cfg_file))


def test_defaults_never_bother_a_real_guest() -> None:
    lim = Config().limits
    assert lim.gpadl_pages >= 1 << 18 and lim.control_burst >= 1000 and lim.subchannels >= 64
    assert lim.memory_budget >= 1 << 30


def test_a_port_without_mac_spoofing_drops_frames_from_other_macs() -> None:
    sw = Switch()
    a, b = sw.attach("a", spoof_check=True), sw.attach("b")
    spoofed = bytes(6 * [0xFF]) + b.mac + b"\x08\x00" + bytes(50)
    assert not a.send_nowait(spoofed), "a frame with b's source MAC from a's port must be dropped"
    assert a.counters.drops["mac_spoofed"] == 1 and sw.counters.drops["mac_spoofed"] == 1
    assert b.pending() == 0
    own = bytes(6 * [0xFF]) + a.mac + b"\x08\x00" + bytes(50)
    assert a.send_nowait(own) and b.pending() == 1, "a frame from the port's own MAC must be forwarded"


@pytest.mark.usefixtures("loop")
def test_subchannels_past_the_partition_limit_are_not_offered() -> None:
    conn, _sent, _spawned = _connection()
    conn.daemon.config.limits.subchannels = 3
    h = Host([STORAGE])
    conn.core = h.core
    primary = next(iter(h.core.channels))
    subs = Subchannels(conn, primary, STORAGE)
    with structlog.testing.capture_logs() as logs:
        assert len(subs.offer(2)) == 2
        assert len(subs.offer(4)) == 1, "only the room left under [limits] subchannels is offered"
        assert subs.offer(1) == []
    limited = [e for e in logs if e["event"] == "sub-channels limited"]
    assert [(e["asked"], e["offered"]) for e in limited] == [(4, 1), (1, 0)]


@pytest.mark.usefixtures("loop")
def test_a_control_flood_is_dropped_then_ends_the_connection_as_abuse() -> None:
    conn, _sent, _spawned = _connection()
    lim = conn.daemon.config.limits
    lim.control_per_second, lim.control_burst, lim.strikes = 1, 3, 2
    conn._control_rate, conn._strikes = TokenBucket(1, 3), Strikes(2, 60.0)  # as built from these limits
    closed: list[tuple[str, str | None]] = []
    conn.close = lambda reason="", code=None: closed.append((reason, code))  # type: ignore[method-assign]
    conn.core = Host([STORAGE]).core
    frame = Frame(FrameKind.CONTROL, 0, m.RequestOffers().encode(), b"")
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            conn.on_control(frame)
    assert conn.limit_refusals == 2 and closed, "the 4th and 5th message are over the burst: two strikes"
    assert closed[0][0].startswith("abuse: control messages per second") and closed[0][1] == ABUSE
    assert any(e["event"].startswith("control message dropped: over 1 a second") for e in logs)
