"""Flow control a guest cannot deadlock (docs/protocol.md §7.6): every byte a guest may send is covered by
credit it can see, so the parent never stops reading it for a reason the guest's credit does not show.

The guests here are the real child runtime (``GuestBus`` and ``StorageVsc``) in this process, against a real
parent daemon over TCP and a Unix socket, behaving as an outside client did that found a deadlock: it opens
the storage channel with a small inbound ring (a few dozen completions fill it, so the StorVSP's queue soon
stops taking requests off the ring), trusts only the ring's credit (not storvsc's own cap on outstanding
requests), sends 3,000 64 KiB WRITEs, and withholds completion credit for a while by reading nothing at
all. A bystander child process shares the parent and must never notice.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from child_partition.bus import GuestBus
from child_partition.devices.storage.vsc import StorageVsc
from child_partition.guest_memory import GuestMemory
from child_partition.runner import open_bus
from vmbus_proto.aio import logs
from vmbus_proto.devices.storage.scsi import read_write_cdb
from vmbus_proto.guids import SCSI

from .conftest import Parent, Proc, bystander_of

pytestmark = pytest.mark.integration
WRITES = 3000
BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def flow_parent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parent]:
    p = Parent(tmp_path_factory.mktemp("flow") / "parent", "[parent]\nstall_timeout = 30.0\n")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def bystander(flow_parent: Parent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    with bystander_of(flow_parent, tmp_path_factory.mktemp("bystander")) as vm:
        yield vm


async def _until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _storage_guest(url: str, name: str) -> tuple[GuestBus, StorageVsc]:
    bus = await open_bus(url, name, log=logs.get(partition=name))
    offers = await asyncio.wait_for(bus.negotiate(), 30)
    offer = next(o for o in offers.values() if o.if_type == SCSI)
    vsc = StorageVsc(bus, GuestMemory(512 * 1024 * 1024), offer, logs.get(partition=name))
    # Vsc.attach with a 32-page outbound ring and a 1-page inbound one (plus a header page each).
    out_pages, in_pages = 33, 2
    vsc.ring_pfns = vsc.memory.alloc(out_pages + in_pages)
    vsc.gpadl = await bus.create_gpadl(vsc.relid, vsc.ring_pfns)
    vsc.channel = await bus.open_channel(vsc.relid, vsc.gpadl, out_pages + in_pages, out_pages,
                                         vsc.open_userdata(), name="storage")
    await asyncio.wait_for(vsc.handshake(vsc.channel), 30)
    vsc._slots = asyncio.Semaphore(WRITES)  # trust only the ring's credit, as the outside client did
    return bus, vsc


def _writes(vsc: StorageVsc) -> list[asyncio.Task[tuple[bytes, bytes]]]:
    lun0 = vsc.disks[0]
    return [asyncio.get_running_loop().create_task(
        vsc._srb(read_write_cdb(True, i * BLOCK // lun0.block_size, BLOCK // lun0.block_size),
                 struct.pack("<I", i) * (BLOCK // 4), 0, 0, lun0.modes[0]))
        for i in range(WRITES)]


def _blocked(vsc: StorageVsc) -> bool:
    ch = vsc.channel
    return ch is not None and ch._blocked_writers > 0


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_guest_that_withholds_credit_cannot_deadlock_the_parent(
        flow_parent: Parent, bystander: Proc, transport: str) -> None:
    url = flow_parent.tcp if transport == "tcp" else flow_parent.unix
    bus, vsc = await _storage_guest(url, f"withholder-{transport}")
    assert bus.transport is not None
    bus.transport.pause_reading()  # withhold every credit: completions, SIGNALs, everything
    writes = _writes(vsc)
    await _until(lambda: _blocked(vsc), "the guest's writer to run out of credit")
    assert vsc.channel is not None
    in_flight = vsc.channel.rings.data_writer.data_size - vsc.channel.rings.data_writer.free
    assert 0 < in_flight < vsc.channel.rings.data_writer.data_size, "inline data beyond the parent's window"
    bus.transport.resume_reading()  # return credit: everything must now complete
    _, pending = await asyncio.wait(writes, timeout=120)
    assert not pending, f"{len(pending)} of {WRITES} WRITEs never completed: the connection deadlocked"
    failed = [i for i, t in enumerate(writes) if not vsc._succeeded(t.result()[0])]
    assert not failed, f"WRITEs {failed[:5]}... failed"
    for i in (0, WRITES // 2, WRITES - 1):  # every acknowledged write is on the disk
        assert await vsc.disks[0].read(i * BLOCK, BLOCK) == struct.pack("<I", i) * (BLOCK // 4)
    await vsc.detach()
    await asyncio.wait_for(bus.unload(), 30)
    bus.close()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("how", ["abort", "close"])
async def test_guest_that_goes_while_blocked_is_noticed(
        flow_parent: Parent, bystander: Proc, transport: str, how: str) -> None:
    """``abort``: the guest's process dies (RST). ``close``: it takes its completions, then hangs up with a
    FIN after whatever it had queued, which a parent that stopped reading would never see."""
    url = flow_parent.tcp if transport == "tcp" else flow_parent.unix
    name = f"goner-{how}-{transport}"
    mark = flow_parent.mark()
    bus, vsc = await _storage_guest(url, name)
    assert bus.transport is not None
    bus.transport.pause_reading()
    writes = _writes(vsc)
    await _until(lambda: _blocked(vsc), "the guest's writer to run out of credit")
    if how == "abort":
        bus.transport.abort()
    else:
        bus.transport.resume_reading()
        bus.transport.close()
    await asyncio.gather(*writes, return_exceptions=True)
    await asyncio.to_thread(flow_parent.wait_for, lambda r: r.get("event") == "partition disconnected"
                            and r.get("partition") == name, 30, mark)
    again, _ = await _storage_guest(url, name)  # the name is free again: nothing of the old one is held
    await asyncio.wait_for(again.unload(), 30)
    again.close()
