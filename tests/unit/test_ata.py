"""The IDE controller (sans-IO) and the IOPORT codec and port bus, without sockets."""

from __future__ import annotations

import pytest

from vmbus_proto.devices.ata.controller import PORTS, AtaController, OpKind, Phase
from vmbus_proto.devices.ata.registers import (
    COMMAND,
    CTRL,
    CTRL_SRST,
    DATA,
    DEVICE,
    ERROR,
    LBA_HIGH,
    LBA_LOW,
    LBA_MID,
    NSECTOR,
    STATUS,
    Command,
    Error,
    Status,
    parse_identify,
)
from vmbus_proto.errors import FrameError
from vmbus_proto.ioport import Direction, IoRequest, PortBus, decode_reply, decode_request, encode_reply, string_exits

SECTORS = 2048


def drive() -> tuple[AtaController, PortBus]:
    ctl = AtaController()
    bus = PortBus()
    for first, count in PORTS:
        bus.register(first, count, ctl)
    ctl.attach(SECTORS)
    return ctl, bus


def command(bus: PortBus, cmd: int, lba: int = 0, count: int = 1) -> None:
    for port, value in ((NSECTOR, count), (LBA_LOW, lba & 0xFF), (LBA_MID, lba >> 8 & 0xFF),
                        (LBA_HIGH, lba >> 16 & 0xFF), (DEVICE, 0xE0 | lba >> 24)):
        bus.write(port, 1, value)
    bus.write(COMMAND, 1, cmd)


def test_power_on_busy_until_the_disk_is_attached() -> None:
    ctl = AtaController()
    assert ctl.io_read(STATUS, 1) & Status.BSY
    ctl.attach(SECTORS)
    assert ctl.io_read(STATUS, 1) == Status.DRDY | Status.DSC
    assert (ctl.io_read(NSECTOR, 1), ctl.io_read(LBA_LOW, 1), ctl.io_read(ERROR, 1)) == (1, 1, 1), "reset signature"


def test_identify() -> None:
    _ctl, bus = drive()
    command(bus, Command.IDENTIFY_DEVICE)
    assert bus.read(STATUS, 1) & Status.DRQ
    data = b"".join(bus.read(DATA, 2).to_bytes(2, "little") for _ in range(256))
    info = parse_identify(data)
    assert (info.sectors, info.lba, info.flush_cache) == (SECTORS, True, True)
    assert bus.read(STATUS, 1) == Status.DRDY | Status.DSC, "DRQ must clear after the last word"


def test_read_sectors_one_drq_block_per_sector() -> None:
    ctl, bus = drive()
    command(bus, Command.READ_SECTORS, lba=5, count=2)
    for n in range(2):
        assert bus.read(STATUS, 1) & Status.BSY, "BSY while the disk reads"
        op = ctl.take_op()
        assert op is not None and (op.kind, op.lba, op.sectors) == (OpKind.READ, 5 + n, 1)
        ctl.complete(op, bytes([n]) * 512)
        assert bus.read(STATUS, 1) == Status.DRDY | Status.DSC | Status.DRQ
        words = [bus.read(DATA, 2) for _ in range(256)]
        assert words == [n * 0x101] * 256
    assert ctl.phase is Phase.IDLE and bus.read(STATUS, 1) == Status.DRDY | Status.DSC
    assert bus.read(LBA_LOW, 1) == 7, "the task file points past the last sector"


def test_write_sectors_then_flush() -> None:
    ctl, bus = drive()
    command(bus, Command.WRITE_SECTORS, lba=9)
    assert bus.read(STATUS, 1) & Status.DRQ
    for i in range(128):
        bus.write(DATA, 4, 0x01020304 + i)  # 32-bit PIO
    op = ctl.take_op()
    assert op is not None and op.kind is OpKind.WRITE and op.lba == 9 and op.data[:4] == b"\x04\x03\x02\x01"
    assert bus.read(STATUS, 1) & Status.BSY
    ctl.complete(op)
    assert bus.read(STATUS, 1) == Status.DRDY | Status.DSC
    bus.write(COMMAND, 1, Command.FLUSH_CACHE)
    op = ctl.take_op()
    assert op is not None and op.kind is OpKind.FLUSH
    ctl.complete(op)
    assert ctl.counters.flushes == 1 and bus.read(STATUS, 1) == Status.DRDY | Status.DSC


@pytest.mark.parametrize(("lba", "count"), [(SECTORS, 1), (SECTORS - 1, 2), (0, 0)])
def test_address_beyond_the_disk_is_idnf(lba: int, count: int) -> None:
    ctl, bus = drive()
    command(bus, Command.READ_SECTORS, lba=lba, count=count)  # count 0 means 256 sectors
    if count == 0:
        assert ctl.take_op() is not None, "256 sectors from LBA 0 fit"
        return
    assert bus.read(STATUS, 1) == Status.DRDY | Status.ERR and bus.read(ERROR, 1) == Error.IDNF
    assert ctl.take_op() is None


def test_unknown_command_aborts_and_stray_accesses_change_nothing() -> None:
    ctl, bus = drive()
    bus.write(COMMAND, 1, 0x00)
    assert bus.read(STATUS, 1) == Status.DRDY | Status.ERR and bus.read(ERROR, 1) == Error.ABRT
    assert bus.read(DATA, 2) == 0 and bus.read(DATA, 1) == 0xFF, "the data port without DRQ"
    bus.write(DATA, 2, 0xBEEF)
    assert ctl.counters.stray_data == 2
    command(bus, Command.READ_SECTORS, lba=1)
    bus.write(LBA_LOW, 1, 0x77)  # BSY: ignored
    bus.write(COMMAND, 1, Command.IDENTIFY_DEVICE)  # BSY: ignored
    assert ctl.counters.ignored_writes == 2 and ctl.io_read(LBA_LOW, 1) == 1


def test_absent_device_1_reads_zero_and_ignores_commands() -> None:
    ctl, bus = drive()
    bus.write(DEVICE, 1, 0xB0)
    assert bus.read(STATUS, 1) == 0 and bus.read(ERROR, 1) == 0
    bus.write(COMMAND, 1, Command.IDENTIFY_DEVICE)
    assert ctl.counters.commands == 0


def test_soft_reset_drops_the_command_in_flight() -> None:
    ctl, bus = drive()
    command(bus, Command.READ_SECTORS, lba=3)
    op = ctl.take_op()
    assert op is not None
    bus.write(CTRL, 1, CTRL_SRST)
    assert bus.read(CTRL, 1) & Status.BSY
    bus.write(CTRL, 1, 0)
    ctl.complete(op, b"\x00" * 512)  # stale: ignored
    assert bus.read(STATUS, 1) == Status.DRDY | Status.DSC and ctl.phase is Phase.IDLE


def test_read_failure_is_unc() -> None:
    ctl, bus = drive()
    command(bus, Command.READ_SECTORS, lba=3)
    op = ctl.take_op()
    assert op is not None
    ctl.complete(op, failed=True)
    assert bus.read(STATUS, 1) & Status.ERR and bus.read(ERROR, 1) == Error.UNC


def test_bus_defaults() -> None:
    bus = PortBus()
    assert bus.read(0x80, 1) == 0xFF and bus.read(0x80, 4) == 0xFFFFFFFF
    bus.write(0x80, 2, 0)
    assert bus.unclaimed == 1 + 4 + 2
    with pytest.raises(ValueError):
        bus.register(0xFFFF, 2, AtaController())


def test_string_exits_follow_kvm() -> None:
    assert string_exits(Direction.IN, 2, 256) == [256], "a sector with rep insw: one exit"
    assert string_exits(Direction.IN, 2, 1024) == [512, 512], "1 KiB of read-ahead an exit"
    assert string_exits(Direction.IN, 2, 256, page_offset=4096 - 64) == [32, 224], "stops at the page end"
    assert string_exits(Direction.OUT, 2, 3) == [1, 1, 1], "rep outs: one exit a unit"


def test_ioport_codec() -> None:
    req = IoRequest(5, Direction.OUT, 2, DATA, 2, b"abcd")
    assert decode_request(*req.encode()) == req
    assert decode_reply(encode_reply(77)) == 77
    for body, data in ((IoRequest(1, 0, 1, 1).encode()[0], b"x"), (b"\x91\x01", b""),
                       (IoRequest(1, 0, 8, 1).encode()[0], b"")):
        with pytest.raises(FrameError):
            decode_request(body, data)


def test_bus_counts_exits_by_port_and_direction() -> None:
    """One ``access`` is one exit, whatever its count; the bytes are what it moved (the /metrics source)."""
    _, bus = drive()
    bus.access(IoRequest(1, Direction.IN, 1, STATUS))
    bus.access(IoRequest(2, Direction.OUT, 2, DATA, 3, b"\0" * 6))
    bus.access(IoRequest(3, Direction.IN, 2, DATA, 256))
    bus.access(IoRequest(4, Direction.IN, 1, 0x80))  # unclaimed: counted all the same (it still exited)
    assert dict(bus.exits) == {(STATUS, Direction.IN): 1, (DATA, Direction.OUT): 1, (DATA, Direction.IN): 1,
                               (0x80, Direction.IN): 1}
    assert bus.data_bytes[(DATA, Direction.IN)] == 512 and bus.data_bytes[(DATA, Direction.OUT)] == 6
