"""Moved to :mod:`admm_compress.methods._decomposable_net.rank_selection` (Decomposable-Net's rank
criteria and conv matricization).

This name is kept for code that imports the old path: it *is* the moved module (the same
module object, so every name, private ones included, and monkeypatching behave as before).
"""
import sys

from .methods._decomposable_net import rank_selection as _moved

sys.modules[__name__] = _moved
