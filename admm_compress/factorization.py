"""Moved to :mod:`admm_compress.methods._lorita.factorization` (LoRITa's factor-product
parametrization and singular-value truncation rules).

This name is kept for code that imports the old path: it *is* the moved module (the same
module object, so every name, private ones included, and monkeypatching behave as before).
"""
import sys

from .methods._lorita import factorization as _moved

sys.modules[__name__] = _moved
