"""Slow and silent peers (issue 12): real sockets against a real parent daemon, real kernel TCP.

* A slow-loris peer dribbles a byte a second. Before the handshake the handshake timeout ends it; after it, the
  frame deadline (``frame_timeout``): CLOSE code ``frame-timeout`` and one log line. A quiet partition, which
  sends nothing at all after its handshake, stays: keepalive probes are answered by its kernel.
* 200 slow-loris peers at once, while a bystander child runs storage I/O and answers heartbeats: it sees no
  error, every slow peer is closed by its deadline, and the parent's file descriptors return to their baseline.
* Half-open TCP: a child in its own network namespace, reached through a router namespace whose forwarding is
  then cut with nftables (packets vanish: no FIN, no RST, no local error on either side). The parent, with a
  short keepalive, drops the partition and releases its channels, GPADLs and disk; the reverse, a parent gone
  silent, is noticed by the child's own keepalive and it reconnects with backoff once the path returns.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmbus_proto.aio.keyfile import new_secret_file
from vmbus_proto.aio.transport import FRAME_TIMEOUT_CODE
from vmbus_proto.envelope import Hello, decode_close_code
from vmbus_proto.framing import ENVELOPE_VERSION, FrameDecoder, FrameKind, encode_frame

from .conftest import BIN, FAST_LIMITS, Parent, Proc, child
from .load_driver import Api
from .netns import Netns, run
from .rawclient import RawClient
from .test_faults import fds, gone, nbd, qemu_io

pytestmark = pytest.mark.integration

# A CONTROL frame of 100 bytes: dribbled a byte a second it would take 100 s.
SLOW_FRAME = encode_frame(FrameKind.CONTROL, 0, b"\xc4\x54" + bytes(84))


def config(frame_timeout: float, keepalive: str = "[10, 5, 3]", extra: str = "") -> str:
    return f"{FAST_LIMITS}frame_timeout = {frame_timeout}\nkeepalive = {keepalive}\n{extra}"


class Dribbler(threading.Thread):
    """Sends ``data`` a byte a second on every socket until the parent closes each; ``closes`` holds each one's
    CLOSE (reason, code), or (None, None) for a close without one."""

    def __init__(self, socks: dict[str, socket.socket], data: bytes, timeout: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.socks, self.data, self.timeout = socks, data, timeout
        self.closes: dict[str, tuple[str | None, str | None]] = {}
        self.started_all = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        decoders = {}
        for name, s in self.socks.items():
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, name)
            decoders[name] = FrameDecoder()
        deadline = time.monotonic() + self.timeout
        pos, next_byte = 0, time.monotonic()
        while len(self.closes) < len(self.socks):
            now = time.monotonic()
            if now > deadline:
                left = sorted(set(self.socks) - set(self.closes))
                self.error = f"{len(left)} slow peers still connected after {self.timeout:g}s: {left[:5]}"
                return
            if now >= next_byte and pos < len(self.data):
                for name, s in self.socks.items():
                    if name not in self.closes:
                        with contextlib.suppress(OSError):  # closed meanwhile: the read says how
                            s.send(self.data[pos:pos + 1])
                pos, next_byte = pos + 1, now + 1.0
                self.started_all.set()
            for key, _ in sel.select(max(0.01, min(next_byte, deadline) - time.monotonic())):
                name = key.data
                try:
                    chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                frames = decoders[name].feed(chunk) if chunk else []
                close = next((decode_close_code(f.body) for f in frames if f.kind == FrameKind.CLOSE), None)
                if close is not None or not chunk:
                    self.closes.setdefault(name, close or (None, None))
                if not chunk:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]

    def finish(self) -> dict[str, tuple[str | None, str | None]]:
        self.join(self.timeout + 30)
        assert not self.is_alive() and self.error is None, self.error or "the dribbler did not finish"
        return self.closes


def test_a_slow_loris_before_the_handshake_is_ended_by_the_handshake_timeout(tmp_path: Path) -> None:
    p = Parent(tmp_path / "parent", config(30.0))
    try:
        hello = encode_frame(FrameKind.HELLO, 0, Hello(ENVELOPE_VERSION, "loris").encode())
        d = Dribbler({"loris": RawClient(p.tcp).sock}, hello)
        d.start()
        (reason, code), = d.finish().values()
        assert reason == "handshake timeout: no HELLO within 3s", (reason, code)
        assert not p.events("frame deadline missed; closing the connection")
    finally:
        p.stop()


def keepalive_timer(port: int, peer_port: int) -> str:
    """The kernel's timer on the parent's end of one loopback connection, as ``ss -o`` shows it."""
    out = run(["ss", "-Htno", "state", "established", f"( sport = :{port} and dport = :{peer_port} )"]).stdout
    return out.strip()


def test_a_slow_loris_after_the_handshake_misses_its_frame_deadline_and_a_quiet_partition_stays(
        tmp_path: Path) -> None:
    # keepalive [1, 1, 1]: an unanswered peer is given up after 2 s; the slow peer lasts 3 s, all of which the
    # quiet partition spends in silence.
    p = Parent(tmp_path / "parent", config(3.0, "[1, 1, 1]"))
    try:
        quiet = RawClient(p.tcp)
        offers = quiet.negotiate("quiet")
        loris = RawClient(p.tcp)
        loris.negotiate("loris")
        mark = p.mark()
        d = Dribbler({"loris": loris.sock}, SLOW_FRAME)
        d.start()
        (reason, code), = d.finish().values()
        assert code == FRAME_TIMEOUT_CODE and reason is not None and reason.startswith("frame timeout: "), \
            (reason, code)
        assert reason.endswith("bytes of a frame came, and not the rest within 3s"), reason
        line = p.wait_event("frame deadline missed; closing the connection", start=mark, partition="loris")
        assert line["level"] == "info" and line["frame_timeout"] == 3.0 and line["buffered"] >= 1, line
        assert len([r for r in p.events("frame deadline missed; closing the connection")]) == 1
        p.wait_event("partition disconnected", start=mark, partition="loris")
        # The quiet one sent nothing for longer than the frame deadline and than keepalive's 2 s: the kernel
        # keeps probing it (the timer is keepalive's), its kernel answers, and it opens a channel at once.
        port, quiet_port = int(p.tcp.rsplit(":", 1)[1]), quiet.sock.getsockname()[1]
        assert "timer:(keepalive," in keepalive_timer(port, quiet_port), keepalive_timer(port, quiet_port)
        quiet.open(min(offers), 4, 0x77)
        assert not [r for r in p.events("partition disconnected") if r.get("partition") == "quiet"]
        quiet.close()
    finally:
        p.stop()


HEARTBEATS = """
[parent]
log_level = "debug"

[heartbeat]
interval = 0.2
lost_after = 50

[storage]
idle_close = 0
"""


def test_200_slow_loris_peers_are_all_closed_while_a_bystander_does_io_and_answers_heartbeats(
        tmp_path: Path) -> None:
    count = 200
    cfg = config(10.0) + HEARTBEATS.replace("[parent]\n", "")
    p = Parent(tmp_path / "parent", cfg)
    sock = tmp_path / "bystander.nbd"
    vm: Proc | None = None
    try:
        vm = child(tmp_path, p.unix, "bystander", "--nbd", f"unix:{sock}")
        vm.wait_event("nbd server listening")
        vm.wait_event("all offered channels open")
        p.wait_event("heartbeat started", partition="bystander")
        baseline = fds(p.proc.pid)
        clients = {}
        for i in range(count):
            c = RawClient(p.tcp)
            c.negotiate(f"loris-{i}")
            clients[f"loris-{i}"] = c.sock
        mark = p.mark()
        d = Dribbler(clients, SLOW_FRAME)
        d.start()
        assert d.started_all.wait(60), "the dribbler did not start"
        # While the slow peers hold their connections: heartbeats keep coming back and a disk round trip works.
        seq = max(r["seq"] for r in p.events("heartbeat") if r.get("partition") == "bystander")
        p.wait_for(lambda r: r.get("event") == "heartbeat" and r.get("partition") == "bystander"
                   and r["seq"] >= seq + 10, timeout=60, start=mark)
        for offset in range(0, 8 << 20, 1 << 20):
            status, out = qemu_io(nbd(sock, "bystander"), f"write -P 0x5a {offset} 1M", f"read -P 0x5a {offset} 1M")
            assert status == 0 and "Pattern verification failed" not in out, f"bystander I/O at {offset}: {out}"
        still = count - len(d.closes)
        assert still > 0, "the slow peers were all gone before the bystander's checks ran (machine too slow?)"
        closes = d.finish()
        assert len(closes) == count
        wrong = {n: c for n, c in closes.items() if c[1] != FRAME_TIMEOUT_CODE}
        assert not wrong, f"{len(wrong)} closed otherwise than by the deadline: {list(wrong.items())[:3]}"
        lines = p.wait_count("frame deadline missed; closing the connection", count)  # (the log comes by pipe)
        assert sorted(r["partition"] for r in lines) == sorted(clients), "not one deadline line per slow peer"
        deadline = time.monotonic() + 60
        while fds(p.proc.pid) > baseline:
            assert time.monotonic() < deadline, f"the parent holds {fds(p.proc.pid)} fds, baseline {baseline}"
            time.sleep(0.1)
        assert not [r for r in p.events("heartbeat lost") if r.get("partition") == "bystander"]
        assert not vm.events("session with the parent ended"), "the bystander noticed the slow peers"
        assert not [r for r in vm.lines if r.get("level") in ("warning", "error")], vm.complaints()
        assert vm.stop() == 0
    finally:
        if vm is not None:
            vm.stop()
        p.stop()


# -- half-open TCP through a real network path ------------------------------------------------------------------

class Path3:
    """parent (this namespace) ─ veth ─ router namespace ─ veth ─ the child's namespace. ``cut()`` makes the
    router drop everything it forwards (nftables): no FIN, no RST, no error on either end; ``mend()`` undoes it."""

    def __init__(self, router: Netns, guest: Netns) -> None:
        if shutil.which("nft") is None:
            pytest.fail("nft is missing (apt-get install nftables, as `make test` does)", pytrace=False)
        self.router, self.guest = router, guest
        k = secrets.randbelow(200) + 20
        tag = secrets.token_hex(3)
        self.host_if = f"vsh{tag}"
        self.parent_ip, self.router_a, self.router_b, self.child_ip = (f"10.211.{k}.1", f"10.211.{k}.2",
                                                                       f"10.211.{k}.5", f"10.211.{k}.6")
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", f"vra{tag}", "netns", router.name])
        run(["ip", "link", "add", f"vrb{tag}", "netns", router.name, "type", "veth", "peer", "name", f"vsg{tag}",
             "netns", guest.name])
        run(["ip", "addr", "add", f"{self.parent_ip}/30", "dev", self.host_if])
        run(["ip", "link", "set", "dev", self.host_if, "up"])
        run(["ip", "route", "add", f"10.211.{k}.4/30", "via", self.router_a])
        router.address(f"vra{tag}", f"{self.router_a}/30")
        router.address(f"vrb{tag}", f"{self.router_b}/30")
        router.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        guest.address(f"vsg{tag}", f"{self.child_ip}/30")
        guest.ip("route", "add", "default", "via", self.router_b)

    def cut(self) -> None:
        self.router.run(["nft", "add table ip cut; add chain ip cut forward { type filter hook forward priority 0; "
                                "policy drop; }"])

    def mend(self) -> None:
        self.router.run(["nft", "delete table ip cut"])

    def close(self) -> None:
        run(["ip", "link", "del", self.host_if], check=False)  # its route goes with it


@pytest.fixture
def path3(netns_factory: Callable[[], Netns]) -> Iterator[Path3]:
    path = Path3(netns_factory(), netns_factory())
    try:
        yield path
    finally:
        path.close()


def silent_pair(tmp_path: Path, path: Path3, parent_keepalive: str, child_keepalive: str,
                ) -> tuple[Parent, Api, Proc, Path]:
    """A parent listening on ``path``'s address and a child in the guest namespace that opened every channel and
    exports its disks at the returned NBD socket; the partition's secret makes the non-loopback listener take it."""
    key = new_secret_file(tmp_path / "vm1.key")
    p = Parent(tmp_path / "parent", config(30.0, parent_keepalive, "\n[storage]\nidle_close = 0\n"),
               extra=["--listen", f"tcp://{path.parent_ip}:0", "--http", "127.0.0.1:0",
                      "--partition-secret", f"vm1={key}"])
    api = Api(p.wait_event("web console and API listening")["url"])
    url = next(u for u in p.events("parent partition listening")[0]["listen"] if path.parent_ip in u)
    sock = tmp_path / "vm1.nbd"
    vm = Proc(path.guest.argv([str(BIN / "child-partition"), "run", "--connect", url, "--name", "vm1",
                               "--secret-file", str(key), "--json-logs", "--nbd", f"unix:{sock}",
                               "--keepalive", child_keepalive]), tmp_path, "vm1")
    vm.wait_event("all offered channels open", timeout=60)
    p.wait_event("partition connected", partition="vm1", authenticated=True)
    status, out = qemu_io(nbd(sock, "vm1"), "write -P 0x7e 0 4M", "read -P 0x7e 0 4M")
    assert status == 0 and "Pattern verification failed" not in out, f"vm1's disk before the cut: {out}"
    return p, api, vm, sock


def connected_gauge(api: Api) -> float:
    """``vmbus_partitions_connected`` from ``/metrics``."""
    text = api.get("/metrics").decode()
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("vmbus_partitions_connected ")))


def test_a_child_gone_silent_is_dropped_by_keepalive_and_everything_it_held_released(
        tmp_path: Path, path3: Path3) -> None:
    p, api, vm, sock = silent_pair(tmp_path, path3, "[1, 1, 2]", "5,1,3")
    try:
        api.until(lambda: "vm1" in api.names(), "vm1 is listed")
        assert api.get("/api/partitions/vm1/gpadls"), "vm1 holds no GPADL before the cut"
        assert connected_gauge(api) == 1
        baseline = fds(p.proc.pid)
        disk = next((tmp_path / "parent" / "var" / "vm1").glob("lun0.img"))
        assert any(os.path.realpath(f"/proc/{p.proc.pid}/fd/{fd}") == str(disk.resolve())
                   for fd in os.listdir(f"/proc/{p.proc.pid}/fd")), "the parent does not hold vm1's disk open"
        mark, child_mark = p.mark(), vm.mark()
        path3.cut()
        line = p.wait_event("partition disconnected", start=mark, partition="vm1", timeout=60)
        assert str(line["reason"]).startswith("the peer went silent: TCP had no answer to keepalive probes or "
                                              "acknowledgement of data for 3s (keepalive [1, 1, 2])"), line
        assert line["channels_released"] >= 1, line
        gone(p, api, "vm1", mark, baseline)
        # The disk is flushed and closed after the partition went (its own log line, once the pool is done).
        p.wait_for(lambda r: r.get("event") == "disk closed" and str(r.get("path", "")).endswith("vm1/lun0.img"),
                   start=mark)
        assert not any(os.path.realpath(f"/proc/{p.proc.pid}/fd/{fd}") == str(disk.resolve())
                       for fd in os.listdir(f"/proc/{p.proc.pid}/fd")), "vm1's disk is still open"
        assert connected_gauge(api) == 0, "/metrics still counts vm1 as connected"
        assert len([r for r in p.lines[mark:] if r.get("partition") == "vm1" and r.get("level") != "debug"
                    and r.get("event") == "partition disconnected"]) == 1
        # The path returns: the child (its own keepalive, or the parent's RST to its next segment) finds its
        # session gone and connects again; its disk has what it wrote.
        path3.mend()
        vm.wait_event("all offered channels open", start=child_mark, timeout=120)
        status, out = qemu_io(nbd(sock, "vm1"), "read -P 0x7e 0 4M")
        assert status == 0 and "Pattern verification failed" not in out, f"vm1's disk after reconnecting: {out}"
        assert vm.stop() == 0
    finally:
        vm.stop()
        p.stop()


def test_a_parent_gone_silent_is_noticed_by_the_childs_keepalive_and_it_reconnects_when_the_path_returns(
        tmp_path: Path, path3: Path3) -> None:
    # The parent's own keepalive is long: it is the child that must notice.
    p, api, vm, sock = silent_pair(tmp_path, path3, "[30, 10, 3]", "1,1,2")
    try:
        mark, child_mark = p.mark(), vm.mark()
        path3.cut()
        ended = vm.wait_event("session with the parent ended", start=child_mark, timeout=60)
        assert "the peer went silent" in str(ended["error"]) and "keepalive [1, 1, 2]" in str(ended["error"]), ended
        again = vm.wait_event("reconnecting", start=child_mark)
        assert again["retry_in"] > 0, again
        path3.mend()
        vm.wait_event("all offered channels open", start=child_mark, timeout=120)
        p.wait_for(lambda r: r.get("event") == "partition connected" and r.get("partition") == "vm1", start=mark)
        status, out = qemu_io(nbd(sock, "vm1"), "read -P 0x7e 0 4M")
        assert status == 0 and "Pattern verification failed" not in out, f"vm1's disk after reconnecting: {out}"
        assert vm.stop() == 0
        api.until(lambda: "vm1" not in api.names(), "vm1 leaves /api/partitions after its clean exit")
    finally:
        vm.stop()
        p.stop()

