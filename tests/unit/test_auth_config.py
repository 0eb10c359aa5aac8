"""Authentication settings around the exchange: secret and token files (their permissions and contents), the
``[auth]`` and ``[http] token_file`` tables, which listeners take unauthenticated partitions, ``secret new``,
and a child that is refused (or replaced) ending its run at once with one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from child_partition.runner import EXIT_REFUSED
from parent_partition import cli
from parent_partition.auth import AuthSettings, listener_is_local
from parent_partition.config import Config, ConfigError
from vmbus_proto.aio import keyfile
from vmbus_proto.aio.keyfile import SecretFileError, new_secret_file, read_secret_file, read_token_file

from .test_child_retry import RefusingBus, run_child

HEX = "5a" * 32 + "\n"


def private(path: Path, text: str = HEX, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def shared(tmp_path: Path, name: str = "shared") -> Path:
    """A directory everyone may enter (pytest's own are 0700, which would keep any file in them private)."""
    d = tmp_path / name
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666, 0o602])
def test_a_secret_file_others_may_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    f = private(shared(tmp_path) / "vm1.key", mode=mode)
    with pytest.raises(SecretFileError, match=f"permissions {mode:04o} are too open .*; chmod 600 {f}"):
        read_secret_file(f)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_a_private_secret_file_is_read(tmp_path: Path, mode: int) -> None:
    assert read_secret_file(private(tmp_path / "vm1.key", mode=mode)) == bytes([0x5A]) * 32


def test_a_loose_file_in_a_directory_only_its_owner_may_enter_is_read(tmp_path: Path) -> None:
    """The layout of the compose demo's secrets/ (0700, files 0644 for the container's user): nobody else can
    open the file, so its mode does not matter; the same directory opened to others makes it refused."""
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700)
    f = private(d / "vmbus.key", mode=0o644)
    assert read_secret_file(f) == bytes([0x5A]) * 32
    assert read_token_file(private(d / "http.key", "x" * 40, 0o644)) == "x" * 40
    d.chmod(0o711)  # others may pass through it: refused
    with pytest.raises(SecretFileError, match="permissions 0644 are too open"):
        read_secret_file(f)
    if os.geteuid() == 0:  # a 0700 directory of another user: that user can open the file
        d.chmod(0o700)
        os.chown(d, 12345, -1)
        with pytest.raises(SecretFileError, match="permissions 0644 are too open"):
            read_secret_file(f)


def test_any_mode_is_read_under_the_platforms_secrets_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/run/secrets/ (compose bind-mounts the host file with its own mode there); a link from it to a loose file
    elsewhere is judged where it leads."""
    mount = shared(tmp_path, "run-secrets")
    monkeypatch.setattr(keyfile, "SECRETS_MOUNT", str(mount))
    assert read_secret_file(private(mount / "vmbus", mode=0o644)) == bytes([0x5A]) * 32
    outside = private(shared(tmp_path) / "loose.key", mode=0o644)
    (mount / "elsewhere").symlink_to(outside)
    with pytest.raises(SecretFileError, match="permissions 0644 are too open"):
        read_secret_file(mount / "elsewhere")


def test_what_is_not_a_secret_file_says_why(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="no such file"):
        read_secret_file(tmp_path / "missing.key")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_secret_file(tmp_path / "dir")
    with pytest.raises(SecretFileError, match="at least 32 bytes"):
        read_secret_file(private(tmp_path / "short.key", "abcd\n"))


def test_a_new_secret_is_private_random_and_never_overwrites(tmp_path: Path) -> None:
    a, b = new_secret_file(tmp_path / "a.key"), new_secret_file(tmp_path / "b.key")
    assert (os.stat(a).st_mode & 0o777) == 0o600
    assert len(read_secret_file(a)) == 32 and read_secret_file(a) != read_secret_file(b)
    before = a.read_bytes()
    with pytest.raises(SecretFileError, match="already exists; it is kept"):
        new_secret_file(a)
    assert a.read_bytes() == before


def test_a_token_file_holds_visible_ascii(tmp_path: Path) -> None:
    assert read_token_file(private(tmp_path / "t", "  " + "x" * 40 + "\n")) == "x" * 40
    with pytest.raises(SecretFileError, match="at least 32 visible ASCII"):
        read_token_file(private(tmp_path / "s", "with a space " * 4))
    with pytest.raises(SecretFileError, match="too open"):
        read_token_file(private(shared(tmp_path) / "o", "x" * 40, 0o644))


@pytest.mark.parametrize(("url", "local"), [
    ("unix:./run/vmbus.sock", True), ("tcp://127.0.0.1:6464", True), ("tcp://127.0.0.2:1", True),
    ("tcp://[::1]:6464", True), ("tcp://localhost:6464", True), ("tcp://0.0.0.0:6464", False),
    ("tcp://[::]:6464", False), ("tcp://10.1.2.3:6464", False), ("tcp://parent.example:6464", False),
])
def test_which_listeners_are_local(url: str, local: bool) -> None:
    assert listener_is_local(url) is local
    assert AuthSettings().open_allowed(url) is local  # the default mode, open-on-loopback
    assert AuthSettings(mode="required").open_allowed(url) is False


def load(tmp_path: Path, text: str) -> Config:
    f = tmp_path / "p.toml"
    f.write_text(text)
    return Config.load(str(f))


def test_secrets_by_name_and_by_prefix(tmp_path: Path) -> None:
    private(tmp_path / "vm1.key", "11" * 32)
    private(tmp_path / "load.key", "22" * 32)
    private(tmp_path / "loadx.key", "33" * 32)
    private(tmp_path / "all.key", "44" * 32)
    cfg = load(tmp_path, f"""
[auth]
mode = "required"
replace = true
[[auth.partition]]
name = "vm1"
secret_file = "{tmp_path}/vm1.key"
[[auth.partition]]
name = "load-*"
secret_file = "{tmp_path}/load.key"
[[auth.partition]]
name = "load-x*"
secret_file = "{tmp_path}/loadx.key"
[[auth.partition]]
name = "*"
secret_file = "{tmp_path}/all.key"
""")
    auth = cfg.auth
    assert (auth.mode, auth.replace, auth.configured) == ("required", True, True)
    assert auth.lookup("vm1") == bytes([0x11]) * 32
    assert auth.lookup("load-storage-1-0") == bytes([0x22]) * 32
    assert auth.lookup("load-x-1") == bytes([0x33]) * 32  # the longest prefix wins
    assert auth.lookup("vm2") == bytes([0x44]) * 32  # "*": every other name
    assert AuthSettings().lookup("vm1") is None and not AuthSettings().configured


@pytest.mark.parametrize(("text", "message"), [
    ('[auth]\nmode = "closed"\n', "[auth] mode: must be one of 'required', 'open-on-loopback', not 'closed'"),
    ("[auth]\nreplace = 1\n", "[auth] replace: must be true or false"),
    ('[[auth.partition]]\nname = "vm1"\n', '[[auth.partition]] #1 needs secret_file = "secrets/vm1.key"'),
    ('[[auth.partition]]\nsecret_file = "x"\n', '[[auth.partition]] #1 needs name = "vm1"'),
    ('[[auth.partition]]\nname = "a*b"\nsecret_file = "x"\n', "#1 name: must be a partition name"),
    ('[[auth.partition]]\nname = "vm1"\nsecret_file = "/nonexistent/vm1.key"\n',
     "[[auth.partition]] #1: secret file /nonexistent/vm1.key: no such file"),
    ('[http]\ntoken_file = "/nonexistent/t"\n', "[http] token_file: token file /nonexistent/t: no such file"),
])
def test_each_auth_mistake_names_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert str(err.value).startswith(f"{tmp_path / 'p.toml'}: ") and message.lower() in str(err.value).lower(), \
        str(err.value)


def test_a_world_readable_secret_in_the_config_stops_the_parent(tmp_path: Path) -> None:
    f = private(shared(tmp_path) / "vm1.key", mode=0o644)
    with pytest.raises(ConfigError, match=r"\[\[auth.partition\]\] #1: secret file .* permissions 0644 are too open"):
        load(tmp_path, f'[[auth.partition]]\nname = "vm1"\nsecret_file = "{f}"\n')


def test_a_name_configured_twice_is_a_mistake(tmp_path: Path) -> None:
    f = private(tmp_path / "vm1.key")
    with pytest.raises(ConfigError, match=r"#2: name 'vm1' is configured twice"):
        load(tmp_path, f'[[auth.partition]]\nname = "vm1"\nsecret_file = "{f}"\n' * 2)


def test_secret_new_prints_the_table_to_append(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["secret", "new", "vm1", "--dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    key = tmp_path / "s" / "vm1.key"
    assert f'[[auth.partition]]\nname = "vm1"\nsecret_file = "{key}"' in out
    assert (os.stat(tmp_path / "s").st_mode & 0o777) == 0o700 and len(read_secret_file(key)) == 32
    (tmp_path / "p.toml").write_text(out)  # appendable as it is
    assert Config.load(str(tmp_path / "p.toml")).auth.lookup("vm1") == read_secret_file(key)
    assert cli.main(["secret", "new", "vm1", "--dir", str(tmp_path / "s")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["secret", "new", "*", "--dir", str(tmp_path / "s")]) == 0
    assert 'name = "*"' in capsys.readouterr().out and len(read_secret_file(tmp_path / "s" / "all.key")) == 32


@pytest.mark.parametrize(("kind", "hint"), [
    ("auth", "give this child --secret-file"),
    ("auth-failed", "check --secret-file"),
    ("auth-parent", "the parent does not hold this partition's secret"),
    ("replaced", "another child authenticated under this name took over"),
])
def test_an_authentication_refusal_ends_the_run_at_once(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                        hint: str) -> None:
    """Not retried, even after a session of our own (unlike name-taken): retrying cannot change the answer."""
    status, child, calls = run_child(monkeypatch, lambda: RefusingBus(kind, "authentication failed"), negotiated=True)
    assert (status, calls) == (EXIT_REFUSED, 1)
    assert child.failure is not None and "\n" not in child.failure and hint in child.failure, child.failure


@pytest.mark.parametrize(("argv", "message"), [
    (["--partition-secret", "vm1"], "'vm1': must be NAME=FILE"),
    (["--partition-secret", "a*b=x"], "'a*b=x': must be a partition name"),
    (["--auth-mode", "closed"], "invalid choice: 'closed'"),
])
def test_serve_auth_flags_refuse_mistakes(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", *argv])
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_a_partition_secret_flag_with_a_loose_file_stops_the_parent(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = private(shared(tmp_path) / "vm1.key", mode=0o644)
    assert cli.main(["serve", "--partition-secret", f"vm1={f}", "--listen", f"unix:{tmp_path}/s"]) == 2
    assert "--partition-secret: [[auth.partition]] #1: secret file" in capsys.readouterr().err
