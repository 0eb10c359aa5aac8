"""``child-partition probe``: is a parent partition serving VMBus? The first half of a Linux guest's bring-up
(drivers/hv/connection.c ``vmbus_connect``: INITIATE_CONTACT newest version first, then REQUESTOFFERS until
ALLOFFERS_DELIVERED) and its clean end (``vmbus_initiate_unload``: UNLOAD, UNLOAD_RESPONSE), opening no channel.

A TCP connect alone says only that something listens; this says the daemon answers the control plane. The
probe connects under its own partition name (``probe-HOST-PID``), so it never takes a VM's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys

from vmbus_proto.aio import logs
from vmbus_proto.aio.endpoint import without_query
from vmbus_proto.errors import ProtocolError
from vmbus_proto.versions import version_text

from .bus import BusError, GuestBus
from .runner import open_bus

EXIT_SERVING, EXIT_NOT_SERVING = 0, 1
NAME_MAX = 64  # the parent's HELLO rule


def probe_name() -> str:
    """A partition name of its own: ``probe-HOST-PID``, cut to the 64 characters a name may have."""
    pid = f"-{os.getpid()}"
    return f"{logs.PROBE_PREFIX}{socket.gethostname()}"[:NAME_MAX - len(pid)] + pid


async def probe(url: str, timeout: float, secret: bytes | None = None, *, wait: bool = False) -> int:
    """Negotiate with the parent at ``url`` and unload, all within ``timeout`` seconds; prints one line (stdout
    when it serves, stderr when not) and returns the exit status. With ``wait``, nothing listening yet is
    tried again (backing off to 0.5 s) until the timeout."""
    logs.setup("error")  # the line printed says it all
    bus: GuestBus | None = None
    connect, url = url, without_query(url)  # a tls:// URL's query holds its TLS options, not shown
    try:
        async with asyncio.timeout(timeout):
            bus = await _connect(connect, secret, wait)
            offers = await bus.negotiate()
            version = bus.core.version
            await bus.unload()
    except TimeoutError:
        return _down(f"no answer from the parent at {url} within {timeout:g} s")
    except (OSError, BusError, ProtocolError) as exc:
        return _down(f"the parent at {url} does not serve VMBus: {exc or type(exc).__name__}")
    finally:
        if bus is not None:
            bus.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(bus.closed_future), 1.0)
    print(f"VMBus {version_text(version)} negotiated with the parent at {url}: {len(offers)} offers, unloaded",
          flush=True)
    return EXIT_SERVING


async def _connect(url: str, secret: bytes | None, wait: bool) -> GuestBus:
    delay = 0.02
    while True:
        try:
            return await open_bus(url, probe_name(), log=logs.get(partition="probe"), secret=secret)
        except (ConnectionRefusedError, FileNotFoundError):
            if not wait:
                raise
        await asyncio.sleep(delay)  # a retry backoff, as the child's reconnect does
        delay = min(0.5, delay * 2)


def _down(why: str) -> int:
    print(f"child-partition probe: {why}", file=sys.stderr, flush=True)
    return EXIT_NOT_SERVING
