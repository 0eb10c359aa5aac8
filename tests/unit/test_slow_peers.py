"""The transport's frame deadline and keepalive settings, on a hand-driven clock: a slow-loris peer is closed
``frame_timeout`` after the first byte of its incomplete frame, a steady stream (whose reads always end
mid-frame) and a quiet peer never are, and no timer is made per frame."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from child_partition.cli import build_parser
from parent_partition.config import Config, ConfigError
from vmbus_proto.aio.transport import (
    FRAME_TIMEOUT_CODE,
    KEEPALIVE,
    FramedConnection,
    check_keepalive,
    set_keepalive,
    silence_limit,
)
from vmbus_proto.envelope import decode_close_code
from vmbus_proto.framing import Frame, FrameDecoder, FrameKind, encode_frame


class Timer:
    def __init__(self, when: float, cb: Callable[[], None]) -> None:
        self.when, self.cb, self.cancelled = when, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The connection's loop as far as timers go: time moves only when the test says."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 0.0
        self.timers: list[Timer] = []
        self.loop = loop

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, cb: Callable[[], None]) -> Timer:
        return self.call_at(self.now + delay, cb)

    def call_at(self, when: float, cb: Callable[[], None]) -> Timer:
        self.timers.append(Timer(when, cb))
        return self.timers[-1]

    def call_soon(self, cb: Callable[..., None], *args: Any) -> Any:
        return self.loop.call_soon(cb, *args)

    def advance(self, seconds: float) -> None:
        """Move time on by ``seconds``, firing each timer due at its own time, in order."""
        end = self.now + seconds
        while due := [t for t in self.timers if not t.cancelled and t.when <= end]:
            t = min(due, key=lambda t: t.when)
            self.now = max(self.now, t.when)
            t.cancelled = True  # fired
            t.cb()
        self.now = end

    @property
    def armed(self) -> int:
        return sum(not t.cancelled for t in self.timers)


class Wire:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.out += data

    def writelines(self, parts: Any) -> None:
        for p in parts:
            self.out += p

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def frames(self) -> list[Frame]:
        return FrameDecoder().feed(bytes(self.out))


class Peer(FramedConnection):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.got: list[Frame] = []

    def on_control(self, frame: Frame) -> None:
        self.got.append(frame)


def frame(body: bytes = b"\xc0" * 40) -> bytes:
    return encode_frame(FrameKind.CONTROL, 0, body)


def connected(frame_timeout: float = 30.0) -> tuple[Peer, Clock, Wire]:
    conn = Peer(frame_timeout=frame_timeout)
    clock, wire = Clock(asyncio.get_running_loop()), Wire()
    conn._loop = clock  # type: ignore[assignment]
    conn.connection_made(wire)  # type: ignore[arg-type]
    return conn, clock, wire


def feed(conn: FramedConnection, data: bytes) -> None:
    """``data`` as one socket read."""
    buf = conn.get_buffer(len(data))
    buf[:len(data)] = data
    conn.buffer_updated(len(data))


def close_of(wire: Wire) -> tuple[str, str | None]:
    closes = [f for f in wire.frames() if f.kind == FrameKind.CLOSE]
    assert len(closes) == 1 and wire.closed, f"expected one CLOSE frame and a closed transport: {closes}"
    return decode_close_code(closes[0].body)


async def test_a_frame_dribbled_a_byte_a_second_is_closed_at_its_deadline_with_one_line() -> None:
    conn, clock, wire = connected(frame_timeout=30.0)
    data = frame()
    with capture_logs() as logs:
        sent = 0
        while not wire.closed and sent < len(data):
            feed(conn, data[sent:sent + 1])
            sent += 1
            clock.advance(1.0)
        assert wire.closed, "a frame dribbled over more than frame_timeout was not closed"
        assert sent == 30, f"closed after {sent} bytes ({sent} s), not at the 30 s deadline"
    reason, code = close_of(wire)
    assert code == FRAME_TIMEOUT_CODE and reason == "frame timeout: 30 bytes of a frame came, and not the rest " \
                                                      "within 30s", (reason, code)
    lines = [e for e in logs if "frame deadline" in e["event"]]
    assert len(lines) == 1 and lines[0]["buffered"] == 30 and lines[0]["frame_timeout"] == 30.0, logs
    assert not conn.got, "the incomplete frame was handled"


async def test_a_steady_stream_whose_reads_end_mid_frame_is_never_closed_and_makes_no_timer_per_frame() -> None:
    conn, clock, wire = connected(frame_timeout=30.0)
    stream = frame() * 20_000
    step = 1000 + 7  # every read completes frames and leaves the next one incomplete
    for pos in range(0, len(stream), step):
        feed(conn, stream[pos:pos + step])
        clock.advance(0.01)
    assert not wire.closed and len(conn.got) == 20_000
    assert len(clock.timers) == 1, f"{len(clock.timers)} timers for one frame deadline"
    # Reads 20 s apart, each completing the frame the previous one began: every frame took 20 s, under 30.
    for pos in range(0, 20 * len(frame()), len(frame()) + 5):
        feed(conn, frame()[5:] + frame()[:5] if pos else frame()[:5])
        clock.advance(20.0)
    assert not wire.closed, f"a stream of frames each within the deadline was closed: {close_of(wire)}"


async def test_a_quiet_peer_is_never_closed_and_leaves_no_timer_armed() -> None:
    conn, clock, wire = connected(frame_timeout=5.0)
    feed(conn, frame()[:10])
    feed(conn, frame()[10:])  # complete: nothing pending
    clock.advance(3600.0)
    assert not wire.closed and clock.armed == 0 and len(conn.got) == 1


async def test_time_we_hold_reading_is_not_counted_against_the_peer() -> None:
    conn, clock, wire = connected(frame_timeout=10.0)
    feed(conn, frame()[:10])
    conn._hold_reading("test")
    clock.advance(95.0)  # we did not read: the peer could not send
    assert not wire.closed and not wire.reading
    conn._release_reading("test")
    clock.advance(9.0)
    assert not wire.closed, "the time reading was held counted against the peer"
    clock.advance(1.0)
    assert close_of(wire)[1] == FRAME_TIMEOUT_CODE


@pytest.mark.parametrize("value", [[10, 5], [0, 5, 3], [10, 5, 128], [10, 5.0, 3], [True, 5, 3], "10,5,3",
                                   [10, 32768, 3]])
def test_a_bad_keepalive_is_refused_saying_what_it_must_be(value: Any) -> None:
    with pytest.raises(ValueError, match=r"must be \[idle, interval, count\]: seconds of silence"):
        check_keepalive(value)


def test_keepalive_and_frame_timeout_in_the_parent_config(tmp_path: Path) -> None:
    assert Config().keepalive == KEEPALIVE and Config().frame_timeout == 30.0
    f = tmp_path / "p.toml"
    f.write_text("[parent]\nkeepalive = [2, 1, 4]\nframe_timeout = 5\n")
    cfg = Config.load(str(f))
    assert cfg.keepalive == (2, 1, 4) and cfg.frame_timeout == 5.0
    f.write_text("[parent]\nkeepalive = [2, 1]\n")
    with pytest.raises(ConfigError, match=r"\[parent\] keepalive: must be \[idle, interval, count\]"):
        Config.load(str(f))


def test_the_child_takes_keepalive_as_idle_interval_count(capsys: pytest.CaptureFixture[str]) -> None:
    run = ["run", "--connect", "unix:/x"]
    assert build_parser().parse_args(run).keepalive == KEEPALIVE
    assert build_parser().parse_args([*run, "--keepalive", "1,2,3"]).keepalive == (1, 2, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*run, "--keepalive", "1,x,3"])
    assert "'1,x,3': must be IDLE,INTERVAL,COUNT: seconds of silence" in capsys.readouterr().err


def test_the_kernel_gets_keepalive_and_a_user_timeout_of_the_same_total() -> None:
    assert silence_limit((10, 5, 3)) == 25
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        set_keepalive(s, (7, 2, 4))
        got = [s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
               s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
               s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
               s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
               s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)]
    assert got == [1, 7, 2, 4, 15_000], got


async def test_a_peer_gone_silent_is_said_in_words() -> None:
    conn = Peer(keepalive=(1, 1, 2))
    why = conn.loss_reason(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
    assert why.startswith("the peer went silent: TCP had no answer to keepalive probes or acknowledgement of "
                          "data for 3s (keepalive [1, 1, 2]): it is gone without a FIN or RST"), why
    assert conn.loss_reason(None) == "closed"
    assert conn.loss_reason(ConnectionResetError(errno.ECONNRESET, "reset")) == "[Errno 104] reset"
