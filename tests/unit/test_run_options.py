"""``child-partition run``'s options for unattended VMs (the docker-compose demo): the partition name from
``$VMBUS_NAME`` or the host name, ``--disk-writes`` (write, flush, read back a ring of blocks), and the
``probe`` command's own partition name; and the log format (console by default, JSON on request)."""

from __future__ import annotations

import errno
import io
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest

from child_partition import cli
from child_partition.devices.storage.blockdev import BlockDeviceError, MemoryBlockDevice
from child_partition.devices.storage.writes import BLOCK, SLOTS, DiskWriteService, stamped_block
from child_partition.probe import probe_name
from child_partition.runner import CONNECT_TIMEOUT, ChildPartition
from child_partition.vsc import GuestContext
from parent_partition import cli as parent_cli
from vmbus_proto.aio import logs


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)


def writer(interval: float = 1.0) -> tuple[DiskWriteService, Log]:
    log = Log()
    return DiskWriteService(GuestContext("vm1", log, {"disk_writes": interval})), log


# -- the partition name -------------------------------------------------------------------------------------------

def test_the_name_defaults_to_vmbus_name_then_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMBUS_NAME", "vm-from-env")
    assert cli.default_name() == "vm-from-env"
    monkeypatch.delenv("VMBUS_NAME")
    monkeypatch.setattr(socket, "gethostname", lambda: "3f2a9c1b7d4e")
    assert cli.default_name() == "3f2a9c1b7d4e", "the host name is not the default"
    monkeypatch.setenv("VMBUS_NAME", "x" * 65)  # not a name the parent takes: the host name instead
    assert cli.default_name() == "3f2a9c1b7d4e"
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert cli.default_name() is None


def test_run_without_a_usable_name_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("VMBUS_NAME", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--connect", "unix:/nowhere"])
    assert exc.value.code == 2
    assert "give --name: neither $VMBUS_NAME nor the host name is a partition name" in capsys.readouterr().err


def test_the_probe_has_a_name_of_its_own_within_64_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 64)
    name = probe_name()
    assert name.startswith("probe-hhh") and len(name) == 64, name


# -- --disk-writes --------------------------------------------------------------------------------------------------

def test_disk_writes_option_takes_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["run", "--connect", "unix:/x", "--disk-writes", "5"])
    assert args.disk_writes == 5.0
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--connect", "unix:/x", "--disk-writes", "0"])
    assert "must be at least 0.01 seconds" in capsys.readouterr().err


def test_stamped_blocks_differ_by_writer_and_round() -> None:
    a, b, c = stamped_block("vm1", 1), stamped_block("vm1", 2), stamped_block("vm2", 1)
    assert len(a) == BLOCK and a.startswith(b"vmbus-emu vm1 write 1 at ")
    assert a[100:] != b[100:] and a[100:] != c[100:], "the fill does not tell rounds or writers apart"


async def test_disk_writes_go_round_the_last_blocks_and_are_verified() -> None:
    svc, log = writer()
    disk = MemoryBlockDevice(4 << 20)
    for seq in range(1, SLOTS + 3):
        await svc._round(disk, seq)  # type: ignore[arg-type]  # a block device as the GuestDisk
    offsets = [f["offset"] for level, event, f in log.lines if event == "disk write"]
    assert len(offsets) == SLOTS + 2 and svc.rounds == SLOTS + 2 and svc.errors == 0, log.lines[-3:]
    assert min(offsets) == disk.size - SLOTS * BLOCK and max(offsets) == disk.size - BLOCK, "outside the ring"
    assert offsets[SLOTS] == offsets[0], "the ring does not wrap round"
    assert disk.counts["write"] == disk.counts["flush"] == disk.counts["read"] == SLOTS + 2
    assert disk.data[:disk.size - SLOTS * BLOCK].count(0) == disk.size - SLOTS * BLOCK, "wrote outside the ring"


class Flaky(MemoryBlockDevice):
    def __init__(self, fail: str) -> None:
        super().__init__(4 << 20)
        self.fail = fail

    async def read(self, offset: int, length: int) -> bytes:
        data = await super().read(offset, length)
        if self.fail == "eio":
            raise BlockDeviceError(errno.EIO, "medium error")
        return b"\xff" + data[1:] if self.fail == "corrupt" else data


@pytest.mark.parametrize(("fail", "event"), [("eio", "disk write failed"), ("corrupt", "disk write read back differs")])
async def test_a_failed_or_wrong_read_back_is_logged_and_the_writer_carries_on(fail: str, event: str) -> None:
    svc, log = writer()
    disk = Flaky(fail)
    await svc._round(disk, 1)  # type: ignore[arg-type]
    disk.fail = ""
    await svc._round(disk, 2)  # type: ignore[arg-type]
    assert [e for _, e, _ in log.lines] == [event, "disk write"] and svc.errors == 1 and svc.rounds == 1, log.lines


async def test_a_disk_too_small_or_read_only_is_said_once_and_left_alone() -> None:
    svc, log = writer()
    disk = MemoryBlockDevice(SLOTS * BLOCK, read_only=True)
    for seq in (1, 2, 3):
        await svc._round(disk, seq)  # type: ignore[arg-type]
    assert [e for _, e, _ in log.lines] == ["no disk writes: LUN 0 is too small or read-only"]
    assert disk.counts["write"] == 0


# -- the log format -----------------------------------------------------------------------------------------------

def log_one(monkeypatch: pytest.MonkeyPatch, env: str | None, json_flag: bool | None) -> str:
    if env is None:
        monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    else:
        monkeypatch.setenv(logs.FORMAT_ENV, env)
    out = io.StringIO()  # not a terminal, as a container's log
    logs.setup("info", stream=out, json=json_flag)
    logs.get(partition="vm1").info("VMBus negotiated", version="5.3")
    return out.getvalue()


def test_logs_are_readable_lines_by_default_even_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    line = log_one(monkeypatch, None, None)
    assert "[info     ] VMBus negotiated" in line and "partition=vm1" in line and "version=5.3" in line, line
    assert "\x1b[" not in line, f"colours off a terminal: {line!r}"


@pytest.mark.parametrize(("env", "flag"), [(None, True), ("json", None), ("JSON", None), ("console", True)])
def test_json_lines_when_asked(monkeypatch: pytest.MonkeyPatch, env: str | None, flag: bool | None) -> None:
    record = json.loads(log_one(monkeypatch, env, flag))
    assert record["event"] == "VMBus negotiated" and record["partition"] == "vm1", record


def test_the_console_format_when_the_environment_asks_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not log_one(monkeypatch, "console", None).startswith("{")


@pytest.mark.parametrize(("main", "argv"), [(cli.main, ["probe", "--connect", "unix:/x"]),
                                            (parent_cli.main, ["serve", "--listen", "unix:/x"])])
def test_an_unknown_log_format_is_a_usage_error(main: Callable[[list[str]], int], argv: list[str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(logs.FORMAT_ENV, "xml")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "VMBUS_LOG_FORMAT='xml': must be one of console, json" in capsys.readouterr().err


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_health_probes_info_lines_show_only_at_debug(level: str) -> None:
    out = io.StringIO()
    logs.setup(level, out, json=True)
    try:
        probe = logs.get(partition=probe_name()).bind(probe=True)
        probe.info("partition connected")
        probe.warning("frame for a channel that is not open dropped")
        logs.get(partition="vm1").info("partition connected")
    finally:
        logs.setup("warning")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    seen = [(e["partition"].startswith(logs.PROBE_PREFIX), e["level"]) for e in lines]
    quiet = [(True, "warning"), (False, "info")]
    assert seen == (quiet if level == "info" else [(True, "info"), *quiet]), seen
    assert not any("probe" in e for e in lines), "the marker leaked into the log lines"


def test_a_connect_with_no_answer_is_tried_again() -> None:
    """A path that drops SYNs ends in CONNECT_TIMEOUT, not the kernel's two minutes, and is retried."""
    reason, retry = ChildPartition("tcp://192.0.2.1:6464", "vm1")._connect_failed(TimeoutError())
    assert retry and f"no answer within {CONNECT_TIMEOUT:g} s" in reason, (reason, retry)
