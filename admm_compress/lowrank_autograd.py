"""Moved to :mod:`admm_compress.methods._decomposable_net.lowrank_autograd` (Decomposable-Net's
differentiable truncated SVD, App. A).

This name is kept for code that imports the old path: it *is* the moved module (the same
module object, so every name, private ones included, and monkeypatching behave as before).
"""
import sys

from .methods._decomposable_net import lowrank_autograd as _moved

sys.modules[__name__] = _moved
