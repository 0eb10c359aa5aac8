"""The IDE controller of a primary channel with one ATA disk (device 0), as a sans-IO state machine.

Mirrors QEMU hw/ide/core.c: ``ide_ioport_read``/``ide_ioport_write`` (the task-file registers; writes to the
command block ignored while BSY or DRQ is set; the error register and status of an absent device 1 read
as 0), ``ide_data_readw``/``writew``/``readl``/``writel`` (the data port moves the PIO buffer only while
DRQ is set: otherwise a read gives 0 and a write is dropped; a byte access to it reads 0xFF),
``ide_ctrl_write`` (SRST), ``ide_exec_cmd``/``ide_abort_command`` (an unknown command or bad parameter:
DRDY|ERR with ABRT), and PIO READ/WRITE SECTORS one sector per DRQ block (``ide_sector_read``,
``ide_sector_write``: BSY while the disk works, then DRQ for the next sector, DRDY at the end). The
registers and their bits are ATA/ATAPI-6 §7-§8 (``registers``). Where QEMU reports an address beyond the
disk as ABRT, this drive follows the standard: IDNF (ATA/ATAPI-6 §8.27.5, READ SECTORS "Error outputs").

Sans-IO: port accesses are method calls that answer at once; disk work comes out as :class:`DiskOp`
(:meth:`AtaController.take_op`), and the shell reports it done with :meth:`complete`. Until the shell
attaches the medium (:meth:`attach`), the drive reads BSY, as a drive spinning up after power-on does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .registers import (
    CMD_BASE,
    CTRL,
    CTRL_NIEN,
    CTRL_SRST,
    DATA,
    DEV_LBA,
    DEV_OBSOLETE,
    DEV_SLAVE,
    DEVICE,
    ERROR,
    LBA_HIGH,
    LBA_LOW,
    LBA_MID,
    NSECTOR,
    SECTOR,
    STATUS,
    Command,
    Error,
    Feature,
    Status,
    chs_to_lba,
    identify_data,
    lba28,
)

_READY = Status.DRDY | Status.DSC
_READS = (Command.READ_SECTORS, Command.READ_SECTORS_NORETRY)
_WRITES = (Command.WRITE_SECTORS, Command.WRITE_SECTORS_NORETRY)


class OpKind(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"


@dataclass(eq=False, slots=True)
class DiskOp:
    """Disk work for the shell: read or write ``sectors`` at ``lba`` (``data`` for a write), or flush
    (``fua``: the write must be durable before it completes, with the write cache off)."""

    kind: OpKind
    lba: int = 0
    sectors: int = 0
    data: bytes = b""
    fua: bool = False

    @property
    def offset(self) -> int:
        return self.lba * SECTOR

    @property
    def length(self) -> int:
        return self.sectors * SECTOR


class Phase(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"  # the disk works (a DiskOp is out), or the drive is spinning up or resetting
    DATA_IN = "data-in"  # DRQ: the host reads the buffer
    DATA_OUT = "data-out"  # DRQ: the host fills the buffer


@dataclass(slots=True)
class Counters:
    commands: int = 0
    aborted: int = 0  # commands ended with ERR
    sectors_read: int = 0
    sectors_written: int = 0
    flushes: int = 0
    ignored_writes: int = 0  # register writes dropped while BSY or DRQ (QEMU: ignored)
    stray_data: int = 0  # data-port accesses without DRQ
    by_command: dict[int, int] = field(default_factory=dict)


class AtaController:
    """One primary channel: device 0 is the disk, device 1 absent."""

    def __init__(self, *, serial: str = "VMBUSEMU0001", model: str = "vmbus-emu ATA disk",
                 firmware: str = "1.0") -> None:
        self.serial, self.model, self.firmware = serial, model, firmware
        self.sectors = 0
        self.read_only = False
        self.write_cache = True
        self.present = True  # False once attaching the medium failed: the channel reads as empty
        self.phase = Phase.BUSY  # spinning up until attach()
        self.status = int(Status.BSY)
        self.error = 0x01  # diagnostics passed
        self.features = 0
        self.nsector, self.lba_low, self.lba_mid, self.lba_high = 1, 1, 0, 0
        self.device = DEV_OBSOLETE
        self.control = 0
        self.intrq = False  # INTRQ asserted (a polling driver sets nIEN and never sees it)
        self.counters = Counters()
        self._buf = bytearray()
        self._pos = 0
        self._cmd = 0
        self._lba = 0
        self._left = 0  # sectors of the command still to move
        self._pending: DiskOp | None = None  # made, not yet taken by the shell
        self._inflight: DiskOp | None = None  # taken, not completed

    # ---- the medium -------------------------------------------------------------------------------------

    def attach(self, sectors: int, read_only: bool = False) -> None:
        """The disk is ready: ``sectors`` of 512 bytes; the drive leaves its power-on BSY."""
        self.sectors, self.read_only = sectors, read_only
        self._reset_done()

    def attach_failed(self) -> None:
        """No disk could be opened: the channel reads as one with no device (status 0)."""
        self.present = False
        self.phase, self.status = Phase.IDLE, 0

    # ---- port access (``ioport.PortDevice``) ------------------------------------------------------------

    def width(self, port: int, size: int) -> bool:
        return size in (2, 4) if port == DATA else size == 1

    def io_read(self, port: int, size: int) -> int:
        if port == DATA:
            return self._data_read(size) if size > 1 else 0xFF
        if port == CTRL:
            return self._status()
        if port == STATUS:
            self.intrq = False
            return self._status()
        if port == ERROR:
            return self.error if self._selected() else 0
        return {NSECTOR: self.nsector, LBA_LOW: self.lba_low, LBA_MID: self.lba_mid, LBA_HIGH: self.lba_high,
                DEVICE: self.device}.get(port, 0xFF)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == CTRL:
            self._control(value)
        elif port == DATA:
            if size > 1:
                self._data_write(size, value)
        elif self.status & (Status.BSY | Status.DRQ) or not self.present:
            self.counters.ignored_writes += 1  # QEMU: writes to the command block ignored while busy
        elif port == STATUS:
            self._command(value)
        elif port == ERROR:
            self.features = value
        elif port == NSECTOR:
            self.nsector = value
        elif port == LBA_LOW:
            self.lba_low = value
        elif port == LBA_MID:
            self.lba_mid = value
        elif port == LBA_HIGH:
            self.lba_high = value
        elif port == DEVICE:
            self.device = value

    def _selected(self) -> bool:
        return self.present and not self.device & DEV_SLAVE

    def _status(self) -> int:
        return self.status if self._selected() else 0

    # ---- the data port ----------------------------------------------------------------------------------

    def _data_read(self, size: int) -> int:
        if self.phase is not Phase.DATA_IN or not self._selected():
            self.counters.stray_data += 1
            return 0  # QEMU ide_data_readw: nothing to read
        value = int.from_bytes(self._buf[self._pos:self._pos + size], "little")
        self._pos += size
        if self._pos >= len(self._buf):
            self._block_read()
        return value

    def _data_write(self, size: int, value: int) -> None:
        if self.phase is not Phase.DATA_OUT or not self._selected():
            self.counters.stray_data += 1
            return
        end = min(self._pos + size, len(self._buf))
        self._buf[self._pos:end] = value.to_bytes(size, "little")[:end - self._pos]
        self._pos = end
        if self._pos >= len(self._buf):
            self._block_written()

    # ---- commands ---------------------------------------------------------------------------------------

    def _command(self, cmd: int) -> None:
        if not self._selected():
            return  # QEMU: commands to an absent device 1 are ignored
        c = self.counters
        c.commands += 1
        c.by_command[cmd] = c.by_command.get(cmd, 0) + 1
        self.intrq = False
        self.error = 0
        self._cmd = cmd
        if cmd == Command.IDENTIFY_DEVICE:
            self._data_in(identify_data(self.sectors, serial=self.serial, model=self.model,
                                        firmware=self.firmware, write_cache=self.write_cache))
            self._left = 0
        elif cmd in _READS or cmd in _WRITES:
            self._start_transfer(cmd in _WRITES)
        elif cmd == Command.FLUSH_CACHE:
            self._busy(DiskOp(OpKind.FLUSH))
        elif cmd == Command.SET_FEATURES and self.features in tuple(Feature):
            if self.features != Feature.SET_TRANSFER_MODE:
                self.write_cache = self.features == Feature.ENABLE_WRITE_CACHE
            self._done()
        else:
            self._abort(Error.ABRT)

    def _start_transfer(self, writing: bool) -> None:
        count = self.nsector or 256
        if self.device & DEV_LBA:
            lba: int | None = lba28(self.device, self.lba_high, self.lba_mid, self.lba_low)
        else:
            lba = chs_to_lba(self.lba_high << 8 | self.lba_mid, self.device & 0x0F, self.lba_low)
        if lba is None or lba + count > self.sectors:
            self._abort(Error.IDNF)
            return
        if writing and self.read_only:
            self._abort(Error.ABRT)
            return
        self._lba, self._left = lba, count
        if writing:
            self._data_out(interrupt=False)  # the first block of a PIO data-out command raises no interrupt
        else:
            self._busy(DiskOp(OpKind.READ, lba, 1))

    def _block_read(self) -> None:
        """The host has read the whole buffer: the next sector, or the command is over."""
        if self._cmd in _READS:
            self.counters.sectors_read += 1
            self._advance()
            if self._left:
                self._busy(DiskOp(OpKind.READ, self._lba, 1))
                return
        self._done()

    def _block_written(self) -> None:
        self._busy(DiskOp(OpKind.WRITE, self._lba, 1, bytes(self._buf), fua=not self.write_cache))

    def _advance(self) -> None:
        """One sector done: the task file points at the next (QEMU ``ide_set_sector``)."""
        self._lba += 1
        self._left -= 1
        self.nsector = (self.nsector - 1) & 0xFF
        if self.device & DEV_LBA:
            self.lba_low, self.lba_mid, self.lba_high = self._lba & 0xFF, self._lba >> 8 & 0xFF, self._lba >> 16 & 0xFF
            self.device = self.device & 0xF0 | self._lba >> 24 & 0x0F

    # ---- disk work --------------------------------------------------------------------------------------

    def take_op(self) -> DiskOp | None:
        """The disk work to start now (at most one at a time), or None."""
        op, self._pending = self._pending, None
        if op is not None:
            self._inflight = op
        return op

    def complete(self, op: DiskOp, data: bytes = b"", failed: bool = False) -> None:
        """``op`` is done (``data``: what a read read). A stale op (a reset came between) is ignored."""
        if op is not self._inflight:
            return
        self._inflight = None
        if failed:
            self._abort(Error.UNC if op.kind is OpKind.READ else Error.ABRT)
            return
        if op.kind is OpKind.READ:
            self._data_in(data)
        elif op.kind is OpKind.WRITE:
            self.counters.sectors_written += 1
            self._advance()
            if self._left:
                self._data_out(interrupt=True)
            else:
                self._done()
        else:
            self.counters.flushes += 1
            self._done()

    # ---- phases -----------------------------------------------------------------------------------------

    def _busy(self, op: DiskOp) -> None:
        self.phase, self.status = Phase.BUSY, int(Status.BSY | Status.DSC)
        self._pending = op

    def _data_in(self, data: bytes) -> None:
        self._buf, self._pos = bytearray(data), 0
        self.phase, self.status = Phase.DATA_IN, int(_READY | Status.DRQ)
        self._interrupt()

    def _data_out(self, interrupt: bool) -> None:
        self._buf, self._pos = bytearray(SECTOR), 0
        self.phase, self.status = Phase.DATA_OUT, int(_READY | Status.DRQ)
        if interrupt:
            self._interrupt()

    def _done(self) -> None:
        self.phase, self.status = Phase.IDLE, int(_READY)
        self._buf, self._pos = bytearray(), 0
        self._interrupt()

    def _abort(self, error: Error) -> None:
        """QEMU ``ide_abort_command``: the command ends with DRDY|ERR and the error register says why."""
        self.counters.aborted += 1
        self.error = int(error)
        self.phase, self.status = Phase.IDLE, int(Status.DRDY | Status.ERR)
        self._buf, self._pos, self._left = bytearray(), 0, 0
        self._interrupt()

    def _interrupt(self) -> None:
        if not self.control & CTRL_NIEN:
            self.intrq = True

    # ---- reset ------------------------------------------------------------------------------------------

    def _control(self, value: int) -> None:
        """Device control: nIEN, and SRST (set: the drive resets and reads BSY; cleared: it comes back)."""
        was = self.control
        self.control = value
        if value & CTRL_SRST and not was & CTRL_SRST:
            self._pending = self._inflight = None  # whatever the disk still does is dropped on completion
            self.phase, self.status = Phase.BUSY, int(Status.BSY)
            self._buf, self._pos, self._left = bytearray(), 0, 0
        elif was & CTRL_SRST and not value & CTRL_SRST and self.present and self.sectors:
            self._reset_done()

    def _reset_done(self) -> None:
        """The signature of an ATA device after reset (ATA/ATAPI-6 §9.12): count 1, LBA 1/0/0, error 1."""
        self.phase, self.status = Phase.IDLE, int(_READY)
        self.error, self.nsector, self.lba_low, self.lba_mid, self.lba_high = 0x01, 1, 1, 0, 0
        self.device = DEV_OBSOLETE
        self._pending = self._inflight = None


PORTS = ((CMD_BASE, 8), (CTRL, 1))  # what the controller decodes: (first port, count)
