"""SIGINT and SIGTERM as a stop request, for the commands that end early but cleanly (``load storage``,
``load network``): the run stops issuing, lets what is in flight finish, reports what it did, and exits
128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a command a signal ended.
"""

from __future__ import annotations

import asyncio
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt:
    """An asyncio Event set by SIGINT or SIGTERM (install inside the running loop); remembers which came."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal: int | None = None

    def install(self) -> Interrupt:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._caught, sig)
        return self

    def _caught(self, sig: int) -> None:
        if self.signal is None:
            self.signal = sig
        self.event.set()

    def announce(self, prog: str) -> None:
        """One line on stderr when a signal cut the run short (the results follow on stdout)."""
        if self.signal is not None:
            print(f"{prog}: interrupted by {signal.Signals(self.signal).name}: the results so far", file=sys.stderr)

    def status(self, otherwise: int) -> int:
        """128 + the signal when one came, else ``otherwise``."""
        return 128 + self.signal if self.signal is not None else otherwise
