"""``child-partition load churn``: the VMBus control plane under load: partitions that come and go, and devices
hot-removed and added back.

Each operation is one cycle. By default a cycle is a whole guest's life on a fresh connection under a new
partition name (``PREFIX-INDEX-N``): connect (the envelope's HELLO), ``negotiate`` (INITIATE_CONTACT newest
version first, REQUESTOFFERS until ALLOFFERS_DELIVERED: Linux ``vmbus_connect``, ``vmbus_request_offers``),
``open`` the chosen devices' channels as their drivers' probes do (ring GPADL, GPADL_HEADER/BODY →
GPADL_CREATED, OPENCHANNEL → OPENCHANNEL_RESULT, the device's own handshake), ``close`` them as their removes
do (CLOSECHANNEL, then GPADL_TEARDOWN → GPADL_TORNDOWN for every GPADL), ``unload`` (UNLOAD →
UNLOAD_RESPONSE: ``vmbus_initiate_unload``) and disconnect. Each step's latency is recorded under its name;
the cycle is the whole of it. Only primary channels are opened: the sub-channels a driver asks for (netvsc's
NVSP SUBCHANNEL) are offered and left unopened, so ``open`` and ``close`` count one channel per device.

With ``--rescind`` (needs ``--http``) each partition instead stays connected with its devices bound, and a
cycle hot-removes one of them through the parent's API and adds it back (``DELETE`` / ``POST
/api/partitions/NAME/devices/DEV``: Hyper-V's Remove- and Add-VMNetworkAdapter): ``rescind`` lasts from the
request until the guest has seen RESCIND_CHANNELOFFER, closed the channel and sent RELID_RELEASED (Linux
``vmbus_onoffer_rescind`` → the driver's remove → ``vmbus_release_relid``); ``reoffer`` from the request
until the guest has bound the new offer (ring, OPENCHANNEL, handshake). The devices take turns.

``--devices`` chooses the devices (default: every device the parent offers except storage). Storage is left
out by default because the parent creates a disk image for every new partition name on first open
(``<data_dir>/<name>/lun0.img``) and nothing in VMBus can ask it to delete one: a churn of thousands of
cycles would leave thousands of files. Named explicitly, storage is cleaned up as ``load storage`` does: each
guest discards its whole disk before closing it (SCSI UNMAP, as ``blkdiscard``), and with ``--data-dir`` (the
parent's, on this host) the emptied image and its directory are deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from aiohttp import ClientSession

from vmbus_proto import messages as m
from vmbus_proto.aio import logs
from vmbus_proto.devices.registry import BY_CLASS, BY_NAME
from vmbus_proto.devices.storage import vstor

from ..devices import vsc_classes
from ..devices.storage.vsc import StorageVsc
from ..vsc import Vsc
from .guest import STEP_TIMEOUT, LoadGuest, api, http_session, need_http
from .storage import remove_images
from .workload import Done, LoadOptions, Recorder

DEFAULT_EXCLUDED = frozenset({vstor.SPEC.name})


def parse_devices(text: str | None) -> tuple[str, ...] | None:
    """``--devices heartbeat,video`` → the names (checked against the registry); None: the default."""
    if text is None or text.strip() in ("", "default"):
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise ValueError(f"--devices: unknown device {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(BY_NAME)}")
    return names


def chosen_offers(offers: dict[int, m.OfferChannel], devices: tuple[str, ...] | None) -> list[m.OfferChannel]:
    """The primary offers of ``devices`` (default: every offered device with a driver, storage excepted), in
    relid order; a device asked for and not offered is an error."""
    primaries = [o for _, o in sorted(offers.items()) if o.sub_channel_index == 0 and o.if_type in vsc_classes()]
    if devices is None:
        return [o for o in primaries if BY_CLASS[o.if_type].name not in DEFAULT_EXCLUDED]
    chosen = [o for o in primaries if BY_CLASS[o.if_type].name in devices]
    missing = set(devices) - {BY_CLASS[o.if_type].name for o in chosen}
    if missing:
        raise RuntimeError(f"the parent does not offer {', '.join(sorted(missing))}")
    return chosen


async def discard_disks(vscs: list[Vsc]) -> None:
    """Hand every writable disk's space back to the host before its channel closes (a whole-disk discard)."""
    for vsc in vscs:
        if isinstance(vsc, StorageVsc):
            for disk in vsc.disks.values():
                if disk.supports_discard:
                    await asyncio.wait_for(disk.discard(0, disk.size), STEP_TIMEOUT)


def _usec(t0: float) -> int:
    return max(1, int((time.monotonic() - t0) * 1e6))


@dataclass(slots=True)
class ChurnConfig:
    devices: tuple[str, ...] | None = None
    rescind: bool = False
    data_dir: str | None = None


@dataclass(slots=True)
class ChurnCounts:
    cycles: int = 0
    partitions: int = 0  # connections made (every cycle's new partition)
    channels_opened: int = 0
    rescinds: int = 0
    disks: list[str] = field(default_factory=list)  # what happened to the images storage made


class CyclePartition:
    """One slot of ``--partitions``: each cycle is a new partition on a new connection."""

    def __init__(self, workload: ChurnWorkload, name: str) -> None:
        self.workload, self.name = workload, name
        self.n = 0
        self.live: set[LoadGuest] = set()  # cycles in flight

    async def operation(self, rec: Recorder) -> Done:
        w = self.workload
        self.n, n = self.n + 1, self.n
        guest = LoadGuest(w.options.connect, f"{self.name}-{n}", w.log, secret=w.options.secret)
        self.live.add(guest)
        try:
            t = time.monotonic()
            await guest.open()
            w.counts.partitions += 1
            rec.record("connect", _usec(t))
            t = time.monotonic()
            offers = await guest.negotiate()
            rec.record("negotiate", _usec(t))
            t = time.monotonic()
            for offer in chosen_offers(offers, w.config.devices):  # probed one after another, as vmbus_drv does
                await guest.bind(offer)
                w.counts.channels_opened += 1
            rec.record("open", _usec(t))
            await discard_disks(list(guest.vscs.values()))
            t = time.monotonic()
            await guest.close_all()
            rec.record("close", _usec(t))
            t = time.monotonic()
            await guest.unload()
            rec.record("unload", _usec(t))
            await guest.disconnect()
        finally:
            self.live.discard(guest)
            await guest.leave()
            w.remove_image(guest.name)
        w.counts.cycles += 1
        return Done("cycle")

    async def stop(self) -> None:
        """Nothing is held between cycles; a cycle still running (cut short) leaves here."""
        await asyncio.gather(*(g.leave() for g in list(self.live)), return_exceptions=True)


class RescindPartition:
    """One guest that stays connected while its devices are removed and added back through the API."""

    def __init__(self, workload: ChurnWorkload, guest: LoadGuest, devices: list[str]) -> None:
        self.workload, self.guest, self.name = workload, guest, guest.name
        self.devices = devices
        self.turn = 0
        self.lock = asyncio.Lock()  # one hot remove/add at a time per partition (the parent allows one per device)
        self._released: dict[str, asyncio.Future[None]] = {}
        self._bound: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        bus = guest.bus
        assert bus is not None
        bus.on_rescind = lambda relid: self._spawn(self._rescinded(relid))
        bus.on_offer = lambda offer: self._spawn(self._offered(offer))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _settle(waiters: dict[str, asyncio.Future[None]], device: str, error: BaseException | None = None) -> None:
        fut = waiters.pop(device, None)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    async def _rescinded(self, relid: int) -> None:
        """Linux ``vmbus_onoffer_rescind``: the driver removed (CLOSECHANNEL, no teardown), RELID_RELEASED."""
        guest, bus = self.guest, self.guest.bus
        assert bus is not None
        vsc = guest.vscs.pop(relid, None)
        if vsc is not None:
            await asyncio.wait_for(vsc.detach(rescinded=True), STEP_TIMEOUT)
            bus.release_relid(relid)
            self._settle(self._released, vsc.spec.name)
        else:  # a sub-channel: its primary closes it
            owner = next((v for v in guest.vscs.values() if relid in v.subchannels), None)
            if owner is not None:
                await owner.on_subchannel_rescind(relid)
            bus.release_relid(relid)

    async def _offered(self, offer: m.OfferChannel) -> None:
        if offer.sub_channel_index:
            primary = next((v for v in self.guest.vscs.values() if v.offer.if_type == offer.if_type), None)
            if primary is not None:
                await primary.on_subchannel_offer(offer)
            return
        entry = BY_CLASS.get(offer.if_type)
        if entry is None or entry.name not in self.devices:
            return
        try:
            await self.guest.bind(offer)
        except Exception as exc:  # the cycle waiting for it says why
            self._settle(self._bound, entry.name, RuntimeError(f"{self.name}: {entry.name} re-offered but could "
                                                               f"not be bound: {type(exc).__name__}: {exc}"))
            return
        self._settle(self._bound, entry.name)

    async def operation(self, rec: Recorder) -> Done:
        w = self.workload
        session = w.session
        assert session is not None and w.http is not None
        async with self.lock:
            device = self.devices[self.turn % len(self.devices)]
            self.turn += 1
            url = f"{w.http}/api/partitions/{self.name}/devices/{device}"
            loop = asyncio.get_running_loop()
            released = self._released[device] = loop.create_future()
            t = time.monotonic()
            await api(session, "DELETE", url)
            await self._wait(released, f"release the rescinded {device}")
            rec.record("rescind", _usec(t))
            bound = self._bound[device] = loop.create_future()
            t = time.monotonic()
            await api(session, "POST", url)
            await self._wait(bound, f"bind the re-offered {device}")
            rec.record("reoffer", _usec(t))
            w.counts.rescinds += 1
            w.counts.cycles += 1
        return Done("cycle")

    async def _wait(self, fut: asyncio.Future[None], what: str) -> None:
        try:
            await asyncio.wait_for(fut, STEP_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(f"{self.name}: the guest did not {what} within {STEP_TIMEOUT:g}s") from None

    async def stop(self) -> None:
        bus = self.guest.bus
        if bus is not None:
            bus.on_offer = bus.on_rescind = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            with contextlib.suppress(Exception):
                await discard_disks(list(self.guest.vscs.values()))
            await self.guest.leave()
        finally:
            self.workload.remove_image(self.name)


class ChurnWorkload:
    name: ClassVar[str] = "churn"
    description: ClassVar[str] = ("the control plane: partitions connecting, opening, closing and unloading in a "
                                  "loop, or devices rescinded and re-offered through the API")

    def __init__(self, options: LoadOptions, config: ChurnConfig) -> None:
        self.options, self.config = options, config
        self.http = need_http("load churn --rescind", options.http) if config.rescind else None
        self.session: ClientSession | None = None
        self.counts = ChurnCounts()
        self.log = logs.get(component="load churn")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--devices", metavar="LIST", default=None,
                            help="comma-separated devices to open each cycle (default: all offered but storage, "
                                 "whose images the parent keeps per partition name)")
        parser.add_argument("--rescind", action="store_true",
                            help="keep each partition connected; a cycle hot-removes a device and adds it back "
                                 "through the API (needs --http)")
        parser.add_argument("--data-dir", default=None, metavar="DIR",
                            help="the parent's data directory (this host): delete the disk images storage made")

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: LoadOptions) -> ChurnWorkload:
        devices = args.devices
        if isinstance(devices, list):  # a workload file may give a list
            devices = ",".join(devices)
        return cls(options, ChurnConfig(devices=parse_devices(devices), rescind=bool(args.rescind),
                                        data_dir=args.data_dir))

    async def setup(self) -> None:
        if self.http is not None:
            self.session = http_session(self.options.http_token)

    async def start_partition(self, index: int) -> CyclePartition | RescindPartition:
        name = f"{self.options.prefix}-{index}"
        if not self.config.rescind:
            return CyclePartition(self, name)
        guest = LoadGuest(self.options.connect, name, self.log, secret=self.options.secret)
        try:
            offers = await guest.connect()
            chosen = chosen_offers(offers, self.config.devices)
            if not chosen:
                raise RuntimeError(f"{name}: none of the chosen devices is offered")
            for offer in chosen:
                await guest.bind(offer)
            self.counts.partitions += 1
            return RescindPartition(self, guest, [BY_CLASS[o.if_type].name for o in chosen])
        except BaseException:
            await guest.leave()
            self.remove_image(name)
            raise

    def remove_image(self, name: str) -> None:
        devices = self.config.devices
        if self.config.data_dir is not None and devices is not None and vstor.SPEC.name in devices:
            self.counts.disks.extend(remove_images(Path(self.config.data_dir), [name]))

    async def teardown(self) -> dict[str, Any]:
        if self.session is not None:
            await self.session.close()
        c = self.counts
        return {"churn": {"mode": "rescind" if self.config.rescind else "cycle",
                          "devices": list(self.config.devices) if self.config.devices else "default",
                          "cycles": c.cycles, "partitions": c.partitions, "channels_opened": c.channels_opened,
                          "rescinds": c.rescinds, "disks_removed": len(c.disks)}}
