"""Moved to :mod:`admm_compress.parametrizations` (the :mod:`torch.nn.utils.parametrize`
parametrizations that keep a compressed weight's structure while it trains further).

This name is kept for code that imports the old path: it *is* the moved module (the same
module object, so every name, private ones included, and monkeypatching behave as before).
"""
import sys

from . import parametrizations as _moved

sys.modules[__name__] = _moved
