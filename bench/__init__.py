"""Benchmarks for vmbus-emu: raw uvloop echo vs. the parent's VMBus channel path, and partition scale.

Run ``python -m bench.run`` from the repository root; see ``bench/README.md``.
"""
