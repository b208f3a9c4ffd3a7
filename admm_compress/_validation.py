"""Argument checks shared by the whole library.

Every public entry point validates its arguments before doing any work and raises a
``ValueError`` (or ``TypeError``) whose message names the parameter, the value given and
what is allowed.  These helpers keep those messages uniform.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = [
    "check_int",
    "check_float",
    "check_finite",
    "check_tensor",
    "check_choice",
    "where_prefix",
]


def where_prefix(where: str | None) -> str:
    """``"<where>: "`` (the layer, parameter or call an error is about, then a colon), or ``""``.

    The one helper behind every ``where=`` argument of the library's checks and constraint sets:
    ``raise ValueError(f"{where_prefix(where)}k=0 is out of range ...")``.
    """
    return f"{where}: " if where else ""


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              where: str | None = None) -> int:
    """Return ``value`` as ``int`` if it is an integer in ``[low, high]``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where_prefix(where)}{name} must be an integer, got {value!r} "
                        f"({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{where_prefix(where)}{name}={value} is out of range; allowed: {lo} <= {name} <= {hi}")
    return value


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, where: str | None = None) -> float:
    """Return ``value`` as ``float`` if it is a finite real in the given interval, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where_prefix(where)}{name} must be a real number, got {value!r} "
                        f"({type(value).__name__})")
    value = float(value)
    lb = "(" if low_open else "["
    rb = ")" if high_open else "]"
    interval = f"{lb}{'-inf' if low is None else low}, {'inf' if high is None else high}{rb}"
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        raise ValueError(f"{where_prefix(where)}{name}={value!r} is out of range; allowed: {name} in {interval}")
    return value


def check_tensor(name: str, x: Any, *, min_dim: int = 0, where: str | None = None) -> torch.Tensor:
    """Raise unless ``x`` is a floating-point tensor with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where_prefix(where)}{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{where_prefix(where)}{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{where_prefix(where)}{name} must have at least {min_dim} dimensions, "
                         f"got shape {tuple(x.shape)}")
    return x


def check_finite(name: str, x: torch.Tensor, *, where: str | None = None) -> torch.Tensor:
    """Raise if ``x`` holds NaN or infinite entries (one device sync)."""
    if x.device.type != "meta" and x.numel() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{where_prefix(where)}{name} has {n_bad} non-finite entries (NaN or inf) "
                         f"out of {x.numel()}; only finite tensors are allowed")
    return x


def check_choice(name: str, value: Any, choices, *, where: str | None = None):
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{where_prefix(where)}{name}={value!r} is not allowed; choose one of "
                         f"{sorted(map(repr, choices))}")
    return value
