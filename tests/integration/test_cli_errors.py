"""What a person can get wrong with the two commands: each mistake is one line on stderr that says what is
wrong and what to do, and a non-zero exit; never a traceback, never a retry that cannot succeed. Real
processes, real sockets, real files."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbus_proto.envelope import Hello, encode_close
from vmbus_proto.framing import ENVELOPE_VERSION, HEADER, FrameKind, encode_frame

from .conftest import BIN, Parent, Proc, child

pytestmark = pytest.mark.integration
TIMEOUT = 60.0


def run_cli(cwd: Path, *argv: str) -> tuple[int, str, str]:
    done = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=TIMEOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return done.returncode, done.stdout, done.stderr


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, f"expected one error line, got:\n{stderr}"
    return lines[0]


def serve(workdir: Path, *argv: str, config: str | None = None) -> tuple[int, str]:
    """parent-partition serve that must fail at start: (exit status, its one stderr line)."""
    workdir.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if config is not None:
        (workdir / "parent.toml").write_text(config)
        extra = ["--config", "parent.toml"]
    listen = [] if "--listen" in argv else ["--listen", "tcp://127.0.0.1:0", "--listen", "unix:run/p.sock"]
    code, _, err = run_cli(workdir, "parent-partition", "serve", *extra, *listen, *argv)
    return code, one_line(err)


def exited(vm: Proc) -> int:
    code = vm.proc.wait(TIMEOUT)
    vm.stop()  # joins the reader: every stderr line is in vm.raw
    return code


def last_line(vm: Proc) -> str:
    assert "Traceback" not in "".join(vm.raw), "".join(vm.raw)
    return vm.raw[-1].rstrip() if vm.raw else ""


# ---- parent-partition: flags, TOML, start-up checks ------------------------------------------------------

@pytest.mark.parametrize(("listen", "needle"), [
    ("foo", "'foo' is not an endpoint URL"),
    ("tcp://127.0.0.1:99999", "port '99999' is not a number in 0-65535"),
    ("http://127.0.0.1:80", "unknown scheme 'http'"),
    ("tcp://127.0.0.1", "no port"),
])
def test_bad_listen_flag_is_one_line_and_exit_2(workdir: Path, listen: str, needle: str) -> None:
    code, line = serve(workdir, "--listen", listen)
    assert code == 2, line
    assert line.startswith("parent-partition serve: error: argument --listen:") and needle in line, line


@pytest.mark.parametrize(("toml", "needle"), [
    ('[parent]\nlisten = ["foo"]\n', "[parent] listen: 'foo' is not an endpoint URL"),
    ('[parent]\nlisten = ["tcp://127.0.0.1:99999"]\n', "[parent] listen: 'tcp://127.0.0.1:99999': port"),
    ('[parent]\nlisten = "tcp://127.0.0.1:1"\n', "[parent] listen: must be a non-empty list of URLs"),
    ("[parent]\nlisen = []\n", "[parent] lisen: unknown setting"),
    ("[parent]\nmax_frame = -1\n", "[parent] max_frame: must be an integer of at least"),
    ('[parent]\nlog_level = "loud"\n', "[parent] log_level: must be one of"),
    ('[parent]\nvmbus_versions = ["9.9"]\n', "[parent] vmbus_versions: '9.9' is not a VMBus version"),
    ("[parent]\nhandshake_timeout = true\n", "[parent] handshake_timeout: must be a positive number"),
    ("parent = 3\n", "parent must be a table"),
    ("[storage]\ndisk_size = 1000\n", "[storage] disk_size: must be a positive multiple of 512"),
    ("[storage]\nqueue = 3\n", "[storage] queue: unknown setting"),
    ("[[storage.lun]]\nlun = 300\n", "[[storage.lun]] #1 lun: must be an integer in 0-254"),
    ("[[storage.lun]]\nsize = 512\n", "[[storage.lun]] #1 needs lun = N"),
    ('[[storage.lun]]\nlun = 1\nread_only = "yes"\n', "[[storage.lun]] #1 read_only: must be true or false"),
    ("[devices]\nprinter = true\n", "[devices] printer: unknown device"),
    ("[devices]\nstorage = 1\n", "[devices] storage must be true or false"),
    ("[printer]\n", "[printer]: unknown section"),
])
def test_bad_toml_setting_names_the_file_and_key(workdir: Path, toml: str, needle: str) -> None:
    code, line = serve(workdir, config=toml)
    assert code == 2, line
    assert line.startswith("parent-partition: error: parent.toml: ") and needle in line, line


@pytest.mark.parametrize(("toml", "where"), [
    ("[parent]\ntrace = tru\n", "(at line 2, column 9)"),
    ('[parent]\ntrace = true\nlisten = ["tcp://127.0.0.1:0"\n', "(at end of document, line 4)"),
])
def test_toml_syntax_error_names_the_file_and_line(workdir: Path, toml: str, where: str) -> None:
    code, line = serve(workdir, config=toml)
    assert code == 2, line
    assert line.startswith("parent-partition: error: parent.toml: not valid TOML: ") and where in line, line


def test_missing_config_file(workdir: Path) -> None:
    code, line = serve(workdir, "--config", "nowhere.toml")
    assert code == 2 and "cannot read config file nowhere.toml: No such file or directory" in line, line


@pytest.mark.parametrize(("kind", "needle"), [
    ("missing", "does not exist; create the image (qemu-img create"),
    ("directory", "is not a regular file or block device"),
    ("odd-size", "image size 1000 is not a positive multiple of 512"),
])
def test_unusable_lun_image_stops_the_parent_at_start(workdir: Path, kind: str, needle: str) -> None:
    image = workdir / "disk.img"
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        image.mkdir()
    elif kind == "odd-size":
        image.write_bytes(b"\0" * 1000)
    code, line = serve(workdir, config=f'[[storage.lun]]\nlun = 1\npath = "{image}"\n')
    assert code == 2, line
    assert f"parent.toml: [[storage.lun]] lun 1: path '{image}'" in line and needle in line, line


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """``path`` cannot be opened for writing, even by root (immutable), for the block's duration."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        return
    if subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without the immutable attribute")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_lun_image_must_be_read_only(workdir: Path) -> None:
    image = workdir / "disk.img"
    workdir.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"\0" * 4096)
    with unwritable(image):
        code, line = serve(workdir, config=f'[[storage.lun]]\nlun = 1\npath = "{image}"\n')
        assert code == 2 and line.endswith("; make it writable or set read_only = true"), line
        p = Parent(workdir / "ro", f'[[storage.lun]]\nlun = 1\npath = "{image}"\nread_only = true\n')
        assert p.stop() == 0, "a read-only LUN on an unwritable image did not start and stop cleanly"


def test_unusable_data_dir(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "file").write_text("not a directory")
    code, line = serve(workdir, "--data-dir", "file/var")
    assert code == 2, line
    assert "data directory file/var: Not a directory; choose another --data-dir" in line, line


def test_port_in_use_is_one_line_and_cleans_up(parent: Parent, workdir: Path) -> None:
    sock = workdir / "second" / "run" / "p.sock"
    code, line = serve(workdir / "second", "--listen", f"unix:{sock}", "--listen", parent.tcp)
    assert code == 1, line
    assert f"cannot listen on {parent.tcp}: address already in use" in line, line
    assert not sock.exists(), "the socket bound before the failing listener was left behind"


def test_unix_socket_of_a_running_parent_is_not_stolen(parent: Parent, workdir: Path) -> None:
    code, line = serve(workdir / "second", "--listen", parent.unix)
    assert code == 1 and "another parent is listening there" in line, line


# ---- child-partition: arguments -------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "needle"), [
    (["--connect", "foo", "--name", "a"], "argument --connect: 'foo' is not an endpoint URL"),
    (["--connect", "tcp://127.0.0.1:0", "--name", "a"], "port 0 cannot be connected to"),
    (["--connect", "unix:x", "--name", "a" * 65], "partition name must be 1-64 printable characters"),
    (["--connect", "unix:x", "--name", "a", "--vmbus-version", "9.9"], "'9.9' is not a VMBus version"),
    (["--connect", "unix:x", "--name", "a", "--vmbus-version", "x"], "'x' is not a VMBus version"),
    (["--connect", "unix:x", "--name", "a", "--nbd", "nowhere"], "argument --nbd"),
    (["--name", "a"], "the following arguments are required: --connect"),
])
def test_bad_child_arguments_are_one_line_and_exit_2(workdir: Path, argv: list[str], needle: str) -> None:
    code, _, err = run_cli(workdir, "child-partition", "run", *argv)
    line = one_line(err)
    assert code == 2 and line.startswith("child-partition run: error: ") and needle in line, line


@pytest.mark.parametrize("argv", [["--bs", "x"], ["--iodepth", "0"], ["--rwmixread", "101"], ["--runtime", "-1"],
                                  ["--json", "/nonexistent-dir/out.json"]])
def test_bad_load_arguments_are_one_line_and_exit_2(workdir: Path, argv: list[str]) -> None:
    code, _, err = run_cli(workdir, "child-partition", "load", "storage", "--connect", "unix:x", *argv)
    line = one_line(err)
    assert code == 2 and "error: argument " in line and argv[0] in line, line


# ---- child-partition: a parent that refuses, and one that is not there yet -------------------------------

def test_duplicate_name_exits_at_once_with_the_reason(parent: Parent, workdir: Path) -> None:
    vm1 = child(workdir, parent.tcp, "vm1")
    vm1.wait_event("all offered channels open")
    mark = parent.mark()
    dup = child(workdir, parent.tcp, "vm1")
    assert exited(dup) == 3, "".join(dup.raw)
    assert last_line(dup) == (f"child-partition: error: partition name 'vm1' is already connected to the parent "
                              f"at {parent.tcp}; choose another --name (or stop the child that uses this one)")
    assert not dup.events("reconnecting") and not dup.events("session with the parent ended"), "".join(dup.raw)
    refusals = [r for r in parent.lines[mark:] if "already connected" in str(r)]
    assert len(refusals) == 1, f"the parent refused the duplicate {len(refusals)} times"
    assert not vm1.events("session with the parent ended") and vm1.stop() == 0


def test_no_vmbus_version_in_common_exits_with_the_reason(workdir: Path) -> None:
    p = Parent(workdir / "old", '[parent]\nvmbus_versions = ["4.0"]\n')
    try:
        vm = child(workdir, p.unix, "vm1", "--vmbus-version", "6.0", "--vmbus-version", "5.3")
        assert exited(vm) == 3, "".join(vm.raw)
        line = last_line(vm)
        assert line.startswith(f"child-partition: error: the parent at {p.unix} refused this child: "
                               f"host refused every VMBus version tried (6.0, 5.3); drop --vmbus-version"), line
        assert not vm.events("reconnecting")
    finally:
        p.stop()


class FakeParent:
    """A listener that answers every HELLO with ``reply`` frames (as a parent of another release would)."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.url = f"unix:{path}"
        self.reply = reply
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.accepted += 1
                conn.settimeout(TIMEOUT)
                head = conn.recv(HEADER.size, socket.MSG_WAITALL)
                if len(head) == HEADER.size:
                    conn.recv(HEADER.unpack(head)[0], socket.MSG_WAITALL)
                    conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the thread (Linux)
        self.sock.close()
        self.thread.join(TIMEOUT)


def close_frame(reason: str, code: str | None = None) -> bytes:
    return encode_frame(FrameKind.CLOSE, 0, encode_close(reason, code))


@pytest.fixture
def fake(workdir: Path, request: pytest.FixtureRequest) -> Iterator[FakeParent]:
    f = FakeParent(workdir / "fake.sock", request.param)
    yield f
    f.close()


@pytest.mark.parametrize(("fake", "needle"), [
    (close_frame("envelope version 1 is not supported (this parent speaks 2)"),
     "envelope version 1 is not supported (this parent speaks 2); run a parent-partition and a child-partition "
     "of the same release"),
    (close_frame("authentication method 'none' is not offered by this parent"), "is not offered by this parent"),
    (close_frame("FrameError: HELLO partition name must be 1-64 printable characters"), "check --name"),
    (encode_frame(FrameKind.HELLO, 0, Hello(ENVELOPE_VERSION + 1, "parent").encode()),
     f"the parent speaks envelope {ENVELOPE_VERSION + 1}; this child speaks envelope {ENVELOPE_VERSION}"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
     "what answers there is no VMBus parent (FrameError: frame of "),
], indirect=["fake"], ids=["envelope", "auth", "name", "parent-envelope", "not-a-parent"])
def test_permanent_refusal_is_not_retried(fake: FakeParent, workdir: Path, needle: str) -> None:
    vm = child(workdir, fake.url, "vm1")
    assert exited(vm) == 3, "".join(vm.raw)
    line = last_line(vm)
    assert line.startswith(f"child-partition: error: the parent at {fake.url} refused this child: "), line
    assert needle in line, line
    assert fake.accepted == 1 and not vm.events("reconnecting"), "".join(vm.raw)


@pytest.mark.parametrize("fake", [close_frame("ce nom est déjà pris", "name-taken")], indirect=True, ids=["coded"])
def test_refusal_code_is_read_not_the_wording(fake: FakeParent, workdir: Path) -> None:
    vm = child(workdir, fake.url, "vm1")
    assert exited(vm) == 3, "".join(vm.raw)
    assert last_line(vm).endswith("is already connected to the parent at " + fake.url +
                                  "; choose another --name (or stop the child that uses this one)"), last_line(vm)


@pytest.mark.parametrize("fake", [close_frame("parent is shutting down")], indirect=True, ids=["shutting-down"])
def test_transient_refusal_is_retried_and_no_reconnect_exits_1(fake: FakeParent, workdir: Path) -> None:
    vm = child(workdir, fake.url, "vm1")
    vm.wait_event("reconnecting")
    vm.wait_for(lambda r: r.get("event") == "session with the parent ended" and r.get("error") ==
                "parent is shutting down" and fake.accepted >= 2)
    assert vm.stop() == 0
    once = child(workdir, fake.url, "vm2", "--no-reconnect")
    assert exited(once) == 1
    assert last_line(once) == (f"child-partition: error: the session with the parent at {fake.url} ended: "
                               "parent is shutting down")
    assert "retry_in" not in "".join(once.raw)


def test_no_parent_with_no_reconnect_exits_1_without_retry(workdir: Path) -> None:
    vm = child(workdir, "unix:run/nobody.sock", "vm1", "--no-reconnect")
    assert exited(vm) == 1
    assert "retry_in" not in "".join(vm.raw)
    assert last_line(vm) == ("child-partition: error: no parent at unix:run/nobody.sock (no socket file there); "
                             "start one with 'parent-partition serve --listen unix:run/nobody.sock'")


def test_address_that_is_not_a_socket_is_permanent(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "plain-file").write_text("")
    vm = child(workdir, "unix:plain-file", "vm1")
    assert exited(vm) == 3
    assert last_line(vm) == ("child-partition: error: cannot connect to the parent at unix:plain-file: "
                             "that path is not a socket")


def test_child_waits_for_a_parent_that_starts_later(workdir: Path) -> None:
    sock = workdir / "parent" / "run" / "vmbus.sock"
    vm = child(workdir, f"unix:{sock}", "vm1")
    first = vm.wait_event("waiting for the parent", error="no socket file there")
    assert first["hint"] == f"start one with: parent-partition serve --listen unix:{sock}"
    p = Parent(workdir / "parent")
    try:
        vm.wait_event("all offered channels open", timeout=30)
        assert vm.stop() == 0
    finally:
        p.stop()


def test_nbd_address_in_use_is_one_line_before_connecting(parent: Parent, workdir: Path) -> None:
    address = parent.tcp.removeprefix("tcp://")
    vm = child(workdir, parent.tcp, "vm1", "--nbd", address)
    assert exited(vm) == 1, "".join(vm.raw)
    assert last_line(vm) == (f"child-partition: error: cannot listen for NBD on {address}: "
                             "Address already in use")
    assert not vm.events("VMBus negotiated"), "the child brought the VM up before binding its NBD address"


# ---- one device's failure costs that device only ---------------------------------------------------------

def test_a_lun_image_gone_after_start_costs_only_the_storage_channel(workdir: Path) -> None:
    image = workdir / "shared.img"
    workdir.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as fh:
        fh.truncate(1 << 20)
    p = Parent(workdir / "parent", f'[[storage.lun]]\nlun = 1\npath = "{image}"\n')
    try:
        image.unlink()  # passed the start-up check; the open at the first storage OPENCHANNEL fails
        vm = child(workdir, p.tcp, "vm1", "--no-reconnect")
        failed = vm.wait_event("device failed to attach; continuing without it")
        assert failed["device"] == "storage" and "OPENCHANNEL" in failed["error"], failed
        up = vm.wait_event("offered channels open except the failed devices")
        assert sorted(up["devices"]) == ["heartbeat", "keyboard", "mouse", "network", "video"], up
        assert up["failed"] == ["storage"], up
        p.wait_for(lambda r: r.get("event") == "device failed to open" and "No such file" in r.get("error", ""))
        opened = p.wait_for(lambda r: r.get("event") == "channel open" and r.get("device") == "video")
        assert opened["partition"] == "vm1"
        assert vm.stop() == 0, "".join(vm.raw)
        assert not vm.events("session with the parent ended") and "Traceback" not in "".join(vm.raw)
    finally:
        p.stop()


# ---- --help and --version ----------------------------------------------------------------------------------

HELP_COMMANDS = [["parent-partition"], ["parent-partition", "serve"], ["child-partition"],
                 ["child-partition", "run"], ["child-partition", "load"], ["child-partition", "load", "storage"]]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_help_is_plain_text_with_defaults(workdir: Path, command: list[str]) -> None:
    code, out, err = run_cli(workdir, *command, "--help")
    assert code == 0 and not err, err
    assert "``" not in out and "usage:" in out, out
    assert "--version" in out, out
    options = [line for line in out.splitlines() if line.strip().startswith("--") and "--help" not in line]
    if len(command) > 1 and command[-1] != "load":
        assert "default" in out, out
        assert options, out


def test_serve_config_help_names_every_table(workdir: Path) -> None:
    _, out, _ = run_cli(workdir, "parent-partition", "serve", "--help")
    flat = " ".join(out.split())
    for table in ("[parent]", "[storage]", "[[storage.lun]]", "[devices]"):
        assert table in flat, f"serve --help does not name {table}"
    assert "default: tcp://127.0.0.1:6464 and unix:./run/vmbus.sock" in flat, flat


@pytest.mark.parametrize("command", ["parent-partition", "child-partition"])
def test_version(workdir: Path, command: str) -> None:
    code, out, _ = run_cli(workdir, command, "--version")
    assert code == 0 and out.strip() == f"{command} {importlib.metadata.version('vmbus-emu')}", out


def test_probe_wait_tries_until_a_parent_listens(tmp_path: Path) -> None:
    """``probe`` alone says at once that nothing serves; ``probe --wait`` keeps trying while nothing listens,
    so a script can start a parent and go on."""
    sock = tmp_path / "p" / "run" / "vmbus.sock"
    code, out, err = run_cli(tmp_path, "child-partition", "probe", "--connect", f"unix:{sock}", "--timeout", "30")
    assert code == 1 and "does not serve VMBus" in one_line(err), (code, err)
    waiting = subprocess.Popen([str(BIN / "child-partition"), "probe", "--wait", "--connect", f"unix:{sock}",
                                "--timeout", "120"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        parent = Parent(tmp_path / "p")
        out, err = waiting.communicate(timeout=150)
        parent.stop()
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0 and "negotiated with the parent" in out, (waiting.returncode, out, err)
