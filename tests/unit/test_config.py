"""Settings and the command lines' argument checks: every mistake is a ConfigError or ValueError whose
message names the file, the key or the argument and says what it must be."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from child_partition.bus import refusal_kind
from parent_partition.config import Config, ConfigError
from parent_partition.daemon import check_paths
from vmbus_proto.aio.cli import HelpFormatter, vmbus_version
from vmbus_proto.aio.endpoint import parse_endpoint
from vmbus_proto.devices.storage import vstor


def load(tmp_path: Path, text: str) -> Config:
    f = tmp_path / "p.toml"
    f.write_text(text)
    return Config.load(str(f))


def test_a_full_file_is_applied(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
[parent]
listen = ["tcp://127.0.0.1:7000", "unix:/tmp/x.sock"]
vmbus_versions = ["5.3", "4.0"]
handshake_timeout = 2
log_level = "debug"
[storage]
disk_size = 4096
idle_close = 0
protocol_versions = ["6.2"]
[[storage.lun]]
lun = 2
size = 1024
read_only = true
partitions = ["vm1"]
[devices]
echo = true
""")
    assert cfg.listen == ["tcp://127.0.0.1:7000", "unix:/tmp/x.sock"]
    assert cfg.vmbus_versions == [0x50003, 0x40000]
    assert cfg.handshake_timeout == 2.0 and isinstance(cfg.handshake_timeout, float)
    assert cfg.log_level == "debug" and cfg.devices["echo"] is True
    assert cfg.section("storage").disk_size == 4096 and cfg.section("storage").idle_close == 0.0
    assert cfg.section("storage").protocol_versions == [vstor.Version.WIN10]
    assert cfg.section("storage").luns_for("vm1") == [(0, 4096, None, False), (2, 1024, None, True)]
    assert cfg.section("storage").luns_for("vm2") == [(0, 4096, None, False)]
    assert cfg.source == str(tmp_path / "p.toml")


@pytest.mark.parametrize(("text", "message"), [
    ("[parent\n", "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"),
    ('[parent]\nlisten = ["x"\n', "not valid TOML: Unclosed array (at end of document, line 3)"),
    ("[parent]\nnope = 1\n", "[parent] nope: unknown setting; known: listen, data_dir"),
    ("[parent]\nlisten = [1]\n", "[parent] listen: must be a non-empty list of URLs"),
    ("[parent]\nlisten = []\n", "[parent] listen: must be a non-empty list of URLs"),
    ('[parent]\nlisten = ["unix:"]\n', "[parent] listen: 'unix:': unix: needs a socket path"),
    ("[parent]\ntrace = 1\n", "[parent] trace: must be true or false, not 1"),
    ("[parent]\nvmbus_versions = [5.3]\n", "[parent] vmbus_versions: must be a non-empty list of version strings"),
    ('[parent]\nvmbus_versions = ["x"]\n', "[parent] vmbus_versions: 'x' is not a VMBus version (known: 0.13,"),
    ("[parent]\nstall_timeout = 0\n", "[parent] stall_timeout: must be a positive number of seconds, not 0"),
    ("[parent]\nmax_partitions = 0\n", "[parent] max_partitions: must be an integer of at least 1, not 0"),
    ("[parent]\nmax_gpadls = 1.5\n", "[parent] max_gpadls: must be an integer of at least 1, not 1.5"),
    ('[parent]\ndata_dir = ""\n', "[parent] data_dir: must be a non-empty string"),
    ("storage = []\n", "storage must be a table ([storage])"),
    ("[bogus]\n", "[bogus]: unknown section; known: parent, devices, http, auth, limits, tls, storage, network, video, "
                   "heartbeat"),
    ("[storage]\nidle_close = -1\n", "[storage] idle_close: must be a number of seconds (0 or more), not -1"),
    ('[storage]\nprotocol_versions = ["9.9"]\n', "[storage] protocol_versions: must be a non-empty list of"),
    ("[storage]\nlun = 1\n", "[storage] lun must be an array of tables ([[storage.lun]])"),
    ("[[storage.lun]]\nlun = 1\n[[storage.lun]]\nlun = -1\n", "[[storage.lun]] #2 lun: must be an integer in 0-254"),
    ("[[storage.lun]]\nlun = 1\npath = 3\n", "[[storage.lun]] #1 path: must be the path of an existing disk image"),
    ("[[storage.lun]]\nlun = 1\npartitions = \"vm1\"\n", "[[storage.lun]] #1 partitions: must be a list of"),
    ("[[storage.lun]]\nlun = 1\nsize = 100\n", "[[storage.lun]] #1 size: must be a positive multiple of 512"),
    ("[devices]\nstorage = \"on\"\n", "[devices] storage must be true or false, not 'on'"),
])
def test_each_mistake_names_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert str(err.value).startswith(f"{tmp_path / 'p.toml'}: ") and message in str(err.value), str(err.value)


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_bytes(b"[parent]\ntrace = \xff\n")
    with pytest.raises(ConfigError, match=r"p.toml: not valid TOML: not UTF-8 \(invalid start byte at byte 17\)"):
        Config.load(str(tmp_path / "p.toml"))


@pytest.mark.parametrize(("url", "message"), [
    ("foo", "'foo' is not an endpoint URL; expected tcp://HOST:PORT, tls://HOST:PORT or unix:PATH"),
    ("tcp://127.0.0.1:99999", "'tcp://127.0.0.1:99999': port '99999' is not a number in 0-65535"),
    ("tcp://127.0.0.1:-1", "port '-1' is not a number"),
    ("tcp://127.0.0.1", "'tcp://127.0.0.1': no port"),
    ("tcp://:80", "'tcp://:80': no host"),
    ("tcp://h:1/path", "a tcp URL has no path"),
    ("udp://h:1", "unknown scheme 'udp'"),
    ("unix://", "unix: needs a socket path"),
])
def test_bad_endpoints(url: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_endpoint(url)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize(("url", "parsed"), [
    ("tcp://127.0.0.1:0", ("tcp", "127.0.0.1", 0)), ("tcp://[::1]:6464", ("tcp", "::1", 6464)),
    ("tcp://localhost:65535/", ("tcp", "localhost", 65535)), ("unix:run/a.sock", ("unix", "run/a.sock", 0)),
    ("unix:///tmp/a.sock", ("unix", "/tmp/a.sock", 0)),
])
def test_good_endpoints(url: str, parsed: tuple[str, str, int]) -> None:
    assert parse_endpoint(url) == parsed


def test_vmbus_version_errors_list_the_known_versions() -> None:
    assert vmbus_version("5.3") == 0x50003 and vmbus_version("WIN10_V5_3") == 0x50003
    for bad in ("9.9", "x", "5.x", ""):
        with pytest.raises(ValueError, match=r"is not a VMBus version \(known: 0.13, .*, 6.0\)"):
            vmbus_version(bad)


@pytest.mark.parametrize(("reason", "kind"), [
    ("partition name 'vm1' is already connected", "name-taken"),
    ("envelope version 2 is not supported (this parent speaks 1)", "envelope"),
    ("authentication method 'psk' is not offered by this parent", "auth"),
    ("FrameError: HELLO partition name must be 1-64 printable characters", "hello"),
    ("parent is shutting down", None),
    ("partition limit of 4096 reached", None),
    ("handshake timeout: no HELLO within 10s", None),
    ("FrameError: unknown frame kind 9", None),
])
def test_which_close_reasons_are_permanent(reason: str, kind: str | None) -> None:
    assert refusal_kind(reason) == kind


def test_start_up_checks_of_data_dir_and_lun_images(tmp_path: Path) -> None:
    cfg = Config(data_dir=str(tmp_path / "var"), source="p.toml")
    check_paths(cfg)
    assert (tmp_path / "var").is_dir()
    good = tmp_path / "good.img"
    good.write_bytes(bytes(4096))
    cfg = load(tmp_path, f'[parent]\ndata_dir = "{tmp_path / "var"}"\n[[storage.lun]]\nlun = 1\npath = "{good}"\n')
    check_paths(cfg)
    good.unlink()
    with pytest.raises(ConfigError, match=r"p.toml: \[\[storage.lun\]\] lun 1: path '.*good.img' does not exist"):
        check_paths(cfg)
    (tmp_path / "blocker").write_text("")
    with pytest.raises(ConfigError, match=r"data directory .*blocker/var: Not a directory; choose another --data-dir"):
        check_paths(Config(data_dir=str(tmp_path / "blocker" / "var")))


def test_help_shows_real_defaults_only() -> None:
    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    p.add_argument("--depth", type=int, default=32, help="requests in flight")
    p.add_argument("--name", help="a name")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--said", default=1, help="one (default: %(default)s)")
    text = " ".join(p.format_help().split())
    assert "requests in flight (default: 32)" in text
    assert "a name --flag" in text and "a flag" in text and "None" not in text and "False" not in text
    assert text.count("(default: 1)") == 1
