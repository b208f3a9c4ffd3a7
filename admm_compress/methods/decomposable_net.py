"""Moved to :mod:`admm_compress.methods._decomposable_net.solver` (Decomposable-Net's solver; the
package :mod:`admm_compress.methods._decomposable_net` holds all of Decomposable-Net's code).

This name is kept for code that imports the old path (``from admm_compress.methods.decomposable_net
import DecomposableNetSolver``): it *is* the moved module (the same module object, so every name,
private ones included, and monkeypatching behave as before).
"""
import sys

from ._decomposable_net import solver as _moved

sys.modules[__name__] = _moved
