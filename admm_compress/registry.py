"""Moved to :mod:`admm_compress.bench.registry` (the benchmark harness: problem and solver entry
files, dense pre-training and the baselines the CLI compares against).

This name is kept for code that imports the old path (``problems/*.py``, ``solvers/*.py``): it
*is* the moved module (the same module object, so every name, private ones included, and
monkeypatching behave as before).
"""
import sys

from .bench import registry as _moved

sys.modules[__name__] = _moved
