"""The exporter table: which builder turns a ``(constraint, view)`` pair into a compact module.

An exporter is a pair ``(matches(constraint, view) -> bool, build(module, constraint, view,
factors, with_bias) -> module or None)``; :func:`build_compact` asks them in order.  The built-in
ones are registered explicitly, in one place, by :mod:`admm_compress.export` (its
``__init__``); a user or a method adds its own with :func:`register_exporter` (TRP's VH view does).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..sets.base import Constraint
from ..views import View

__all__ = ["ExportError", "Exporter", "register_exporter", "build_compact"]

Exporter = Callable[[nn.Module, Constraint, View, Any, bool], "nn.Module | None"]
_EXPORTERS: list[tuple[Callable[[Constraint, View], bool], Exporter]] = []


class ExportError(ValueError):
    """A constrained layer that cannot be exported as asked."""


def register_exporter(matches: Callable[[Constraint, View], bool], build: Exporter, first: bool = True) -> None:
    """Add an exporter: ``build(module, constraint, view, factors, with_bias) -> module or None``.

    ``None`` means "keep this layer dense".  ``first=True`` gives it priority over the built-ins.
    """
    if first:
        _EXPORTERS.insert(0, (matches, build))
    else:
        _EXPORTERS.append((matches, build))


def build_compact(m: nn.Module, c: Constraint, v: View, factors, with_bias: bool = True) -> nn.Module | None:
    """The compact module for ``m`` given its constraint, view and factors (None: stay dense)."""
    for matches, build in _EXPORTERS:
        if matches(c, v):
            return build(m, c, v, factors, with_bias)
    raise ExportError(f"no exporter for {type(c).__name__} with view {v.name!r} on {type(m).__name__}; "
                      f"register one with admm_compress.export.register_exporter")
