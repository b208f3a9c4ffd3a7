"""Moved to :mod:`admm_compress.methods._lorita.solver` (LoRITa's solver; the package
:mod:`admm_compress.methods._lorita` holds all of LoRITa's code).

This name is kept for code that imports the old path (``from admm_compress.methods.lorita import
LoRITaSolver``): it *is* the moved module (the same module object, so every name, private ones
included, and monkeypatching behave as before).
"""
import sys

from ._lorita import solver as _moved

sys.modules[__name__] = _moved
