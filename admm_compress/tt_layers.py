"""Moved to :mod:`admm_compress.layers.tt` (the compact layers are one package,
:mod:`admm_compress.layers`).

This name is kept for code that imports the old path (``from admm_compress.tt_layers import
TTConv2d``): it *is* the moved module (the same module object).
"""
import sys

from .layers import tt as _moved

sys.modules[__name__] = _moved
