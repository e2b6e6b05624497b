"""Benchmarks: ``python -m benchmarks.run`` (``make bench``); checkpoints from ``benchmarks.make_checkpoint``."""
