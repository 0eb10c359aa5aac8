"""``vmbus_proto.aio.malloc``: bulk buffers stop costing page faults once the allocator is tuned.

Each check runs in a fresh interpreter: glibc's allocator state (its dynamic mmap threshold) is per process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Eight 256 KiB buffers in flight at once, then all freed: the pattern of a qd-8 stream of 1 MiB reads
# split at 256 KiB. Untuned, glibc trims the freed heap top (or mmaps each buffer) and the next round faults
# every page in again.
ROUNDS = textwrap.dedent("""
    import resource, sys
    from vmbus_proto.aio import malloc
    if sys.argv[1] == "tune":
        assert malloc.tune()
    def one_round():
        bufs = [bytearray(256 * 1024) for _ in range(8)]
        for b in bufs:
            b[::4096] = bytes(len(b[::4096]))
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        one_round()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
""")


def faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    return float(out)


def test_tuned_allocator_reuses_bulk_buffers_without_page_faults() -> None:
    assert faults_per_round("tune") < 8  # a stray fault or two, not one per page


def test_untuned_allocator_faults_in_every_page_again() -> None:
    """The control: what ``tune`` fixes is really there on this machine."""
    assert faults_per_round("plain") > 8 * 64 / 2


def test_tune_is_idempotent() -> None:
    from vmbus_proto.aio import malloc  # noqa: PLC0415

    assert malloc.tune() is malloc.tune()
