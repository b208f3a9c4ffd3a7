"""Moved to :mod:`admm_compress.bench.cli` (the ``admm-compress`` command is part of the benchmark
harness, :mod:`admm_compress.bench`).

This name is kept for code that imports the old path (``from admm_compress.cli import main``,
``python -m admm_compress``): it *is* the moved module (the same module object).
"""
import sys

from .bench import cli as _moved

sys.modules[__name__] = _moved
