"""admm_compress: compress PyTorch networks by training under structural constraints.

Declare which weights must satisfy which constraint (:class:`LowRank`, :class:`TTRank`,
:class:`Cardinality`, :class:`SchattenP`, :class:`Sum`), train with :class:`Solver` (ADMM or
projected SGD inside ordinary PyTorch training; every method is a :class:`Compressor`
driven by the one trainer, :func:`admm_compress.trainer.fit`), and :func:`export` the result to compact
layers whose cost :func:`complexity` counts.  The published methods (LRPET, LoRITa, RASPA,
Decomposable-Net, TRP) are configurations of that loop in :mod:`admm_compress.methods`; the
benchmark harness behind the ``admm-compress`` command is :mod:`admm_compress.bench`.
"""
import logging as _logging

from . import sets, views
from .sets import Cardinality, ConstraintSet, LowRank, Penalty, SchattenP, Sum, TTRank
from .specs import Constrain, SpecError, describe, resolve
from .compressor import Compressor
from .solver import History, Solver
from . import trainer
from .penalty import AdaptiveRho, GeometricRho
from .export import ExportError, export, register_exporter
from . import layers  # the compact layers; registers their MAC counters
from . import attention  # attention modules that call their (compressed) projections
from .complexity import complexity, latency
from .training import evaluate
from .deploy import saved_bytes, select_kernels, storage_bytes
from .fold import fold_batchnorm

__version__ = "0.1.0"

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def __getattr__(name):  # heavy sub-packages on first use: `ac.methods`, `ac.models`, `ac.data`
    import importlib

    if name in ("methods", "models", "data"):
        mod = importlib.import_module(f".{name}", __name__)
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'admm_compress' has no attribute {name!r}")


__all__ = [
    "LowRank", "Cardinality", "TTRank", "SchattenP", "Sum", "ConstraintSet", "Penalty",
    "Constrain", "resolve", "describe", "Solver", "Compressor", "trainer", "History", "export", "register_exporter",
    "complexity", "latency", "evaluate", "layers", "storage_bytes", "saved_bytes", "select_kernels", "fold_batchnorm",
    "sets", "views", "methods", "models", "data", "attention",
]
__all__ += ["AdaptiveRho", "GeometricRho", "SpecError", "ExportError"]
