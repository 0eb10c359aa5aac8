"""What every load-generating guest does around its device: connect and negotiate VMBus, find its device's
offer (the other offers stay unopened, as in a guest without those drivers), and leave as a guest does
(detach the VSC: CLOSECHANNEL and GPADL teardown; then UNLOAD), all bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from vmbus_proto import messages as m

from ..bus import GuestBus
from ..guest_memory import GuestMemory
from ..runner import open_bus
from ..vsc import Vsc

CONNECT_TIMEOUT = 30.0


class Guest:
    """One guest on its own VMBus connection, with one VSC bound (``self.vsc``, set by the subclass)."""

    def __init__(self, url: str, name: str, memory: int, log: Any) -> None:
        self.url, self.name, self.log = url, name, log
        self.memory = GuestMemory(memory)
        self.bus: GuestBus | None = None
        self.vsc: Vsc | None = None

    async def offer(self, wanted: Callable[[m.OfferChannel], bool], what: str) -> m.OfferChannel:
        """Connect, negotiate and return the offer ``wanted`` picks (an error naming ``what`` if none)."""
        self.bus = await asyncio.wait_for(open_bus(self.url, self.name, log=self.log, memory=self.memory),
                                          CONNECT_TIMEOUT)
        offers: dict[int, m.OfferChannel] = await asyncio.wait_for(self.bus.negotiate(), CONNECT_TIMEOUT)
        found = next((o for o in offers.values() if wanted(o)), None)
        if found is None:
            raise RuntimeError(f"the parent offers no {what}")
        return found

    async def leave(self) -> None:
        try:
            if self.vsc is not None:
                await self.vsc.detach()
            if self.bus is not None and not self.bus.closing:
                await asyncio.wait_for(self.bus.unload(), CONNECT_TIMEOUT)
                self.bus.close()
        finally:
            self.memory.close()


async def started(guest: Guest, start: Callable[[], Coroutine[Any, Any, None]],
                  stop: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``start``; if it fails, ``stop`` what was half started (its own error is dropped: the start error
    is the one that counts) and raise."""
    try:
        await start()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(stop())
        raise
