"""Wall-clock latency of a model's forward pass (:func:`latency`, :class:`Latency`).

Measured under :func:`torch.inference_mode` in eval mode with :func:`time.perf_counter` (CUDA
synchronized before each reading); reported as median / p10 / p90 / mean over the timed calls.
Kept apart from MAC counting (:mod:`admm_compress.complexity`), which re-exports both names.
"""
from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ._model_io import _build_input, _call, _check_input_options, _check_input_size, _check_model, _dtype_device
from ._validation import check_int

__all__ = ["Latency", "latency"]

logger = logging.getLogger("admm_compress.complexity")  # the logger users already configure


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one forward pass, in milliseconds.

    Attributes
    ----------
    median, p10, p90, mean : float
        Statistics over ``repeats`` timed calls (ms per call of ``batch`` samples).
    batch, repeats, warmup : int
        Settings of the measurement.
    device : str
        Device the model ran on.
    times : tuple of float
        All timed calls (ms).
    """

    median: float
    p10: float
    p90: float
    mean: float
    batch: int
    repeats: int
    warmup: int
    device: str
    times: tuple = field(repr=False, default=())

    def as_dict(self) -> dict:
        return {"median_ms": self.median, "p10_ms": self.p10, "p90_ms": self.p90,
                "mean_ms": self.mean, "batch": self.batch, "repeats": self.repeats,
                "warmup": self.warmup, "device": self.device}


def _percentile(sorted_values: list, q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def latency(model: nn.Module, input_size, batch: int = 1, repeats: int = 50, warmup: int = 10,
            device: str | torch.device | None = None, *, input_constructor: Callable | None = None,
            input_dtype: torch.dtype | None = None) -> Latency:
    """Median / p10 / p90 wall-clock time of ``model(x)`` for a random ``x`` of shape
    ``(batch, *input_size)``.

    Each call runs under :func:`torch.inference_mode` in eval mode and is timed with
    :func:`time.perf_counter`; on CUDA the device is synchronized before reading the clock.
    ``warmup`` untimed calls come first.  If ``device`` differs from the model's device, a copy
    of the model is moved there (the model itself is never moved).

    Parameters
    ----------
    model : torch.nn.Module
    input_size : tuple of int
        Input shape without the batch dimension.
    batch : int
        Batch size, >= 1.
    repeats : int
        Timed calls, >= 1.
    warmup : int
        Untimed calls first, >= 0.
    device : str or torch.device, optional
        Where to run; default: the model's device.
    input_constructor : callable, optional
        ``input_constructor((batch, *input_size))`` returns the input (tensor, tuple of tensors
        or dict, see :func:`complexity`); moved to ``device``.
    input_dtype : torch.dtype, optional
        Input of zeros of this dtype instead of ``randn`` of the model's dtype (e.g.
        ``torch.long`` token ids).
    """
    model = _check_model(model)
    input_size = _check_input_size(input_size)
    batch = check_int("batch", batch, low=1)
    repeats = check_int("repeats", repeats, low=1)
    warmup = check_int("warmup", warmup, low=0)
    _check_input_options(input_constructor, input_dtype, "latency")
    dtype, model_device = _dtype_device(model)
    if device is None:
        dev = model_device
    else:  # an invalid device, or CUDA where none exists, raises here with a clear message
        from .training import resolve_device

        dev = resolve_device(device)
    run_model = model
    if dev != model_device and not (dev.type == model_device.type and dev.index is None):
        run_model = copy.deepcopy(model).to(dev)
    is_cuda = dev.type == "cuda"
    x = _build_input((batch, *input_size), dtype, dev, input_constructor, input_dtype, "latency",
                     random=True)
    flags = [(m, m.training) for m in run_model.modules()]
    times = []
    try:
        run_model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                _call(run_model, x)
            if is_cuda:
                torch.cuda.synchronize(dev)
            for _ in range(repeats):
                t0 = time.perf_counter()
                _call(run_model, x)
                if is_cuda:
                    torch.cuda.synchronize(dev)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        for m, flag in flags:
            m.training = flag
    s = sorted(times)
    result = Latency(median=float(statistics.median(s)), p10=_percentile(s, 10),
                     p90=_percentile(s, 90), mean=float(statistics.fmean(s)), batch=batch,
                     repeats=repeats, warmup=warmup, device=str(dev), times=tuple(times))
    logger.info("latency of %s on %s, batch %d: median %.3f ms (p10 %.3f, p90 %.3f)",
                type(model).__name__, dev, batch, result.median, result.p10, result.p90)
    return result
