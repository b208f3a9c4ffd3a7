"""Wall-clock latency of a model's forward pass: eager PyTorch (:func:`latency`, :class:`Latency`)
and ONNX Runtime (:func:`onnx_session`, :func:`ort_latency`; also importable from
:mod:`admm_compress.deploy`).

Eager latency is measured under :func:`torch.inference_mode` in eval mode with :func:`time.perf_counter` (CUDA
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

__all__ = ["Latency", "latency", "onnx_session", "ort_latency"]

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


def _median_ms(fn, repeats: int, warmup: int, clock) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return 1e3 * statistics.median(times)


# ------------------------------------------------------------------ ONNX Runtime
def onnx_session(model: nn.Module, example: torch.Tensor, path: str | None = None, threads: int = 1,
                 opset: int | None = None):
    """Export ``model`` with :func:`torch.onnx.export` and open it in ONNX Runtime (CPU provider).

    The TorchScript-based exporter (``dynamo=False``: here 5-10x faster to export than the
    dynamo exporter, the same Conv / BatchNorm / Relu / Add graph) with a dynamic batch axis;
    ``onnxruntime.InferenceSession`` with ``CPUExecutionProvider``, ``intra_op_num_threads =
    threads``, one inter-op thread and ORT's default graph optimizations (``ORT_ENABLE_ALL``:
    BatchNorm and activations fused into the convolutions).

    Parameters
    ----------
    model : nn.Module
        Exported in eval mode (its mode is restored).
    example : Tensor
        An input of the model (one tensor; its batch size is made dynamic).
    path : str, optional
        Where to write the ``.onnx`` file; default: kept in memory only.
    threads : int
        ORT intra-op threads, >= 1.
    opset : int, optional
        ONNX opset of the written file (``torch.onnx.export``'s ``opset_version``; default:
        the exporter's).  Engines bundling an older ONNX need an older opset: DeepSparse 1.8
        (ONNX 1.14) loads opset <= 19, not the exporter's current default 20
        (``benchmarks/sparse_engine.py`` writes opset 17).

    Returns
    -------
    callable
        ``run(x: numpy.ndarray) -> numpy.ndarray`` (the model's first output).

    Raises
    ------
    ImportError
        ``onnx`` / ``onnxruntime`` not installed (``pip install "admm-compress[onnx]"``).
    """
    import io
    import warnings

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("onnx_session needs onnx and onnxruntime: pip install 'admm-compress[onnx]'") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"onnx_session: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"onnx_session: example must be a tensor, got {type(example).__name__}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"onnx_session: threads must be an int >= 1, got {threads!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ValueError(f"onnx_session: opset must be None or an int >= 7 (the exporter's lowest ONNX opset), "
                         f"got {opset!r}")
    target = io.BytesIO() if path is None else path
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), target, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=opset)
    finally:
        model.train(was_training)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(target.getvalue() if path is None else path, so, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"x": a})[0]


def ort_latency(model: nn.Module, input_size, batch: int = 1, repeats: int = 30, warmup: int = 5,
                threads: int = 1, rtol: float = 1e-3, atol: float = 1e-4) -> dict:
    """Median latency of ``model`` exported to ONNX Runtime (CPU), outputs checked against eager.

    The model is exported and opened by :func:`onnx_session`; on a random input of shape
    ``(batch, *input_size)`` the ORT output must equal the eager output
    (:func:`torch.testing.assert_close` with ``rtol`` and ``atol x max(1, max |output|)``:
    another kernel library and fused BatchNorm change float32 rounding), then ``warmup`` untimed
    and ``repeats`` timed calls (wall clock, :func:`time.perf_counter`).

    Returns
    -------
    dict
        ``median_ms, repeats, batch, threads, max_rel_diff`` (max |ORT - eager| / max |eager|).

    Raises
    ------
    ImportError
        ``onnxruntime`` missing.  AssertionError: ORT's output differs from eager's.
    """
    for name, val, low in (("batch", batch, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"ort_latency: {name} must be an int >= {low}, got {val!r}")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    cpu_model = model if dev.type == "cpu" else copy.deepcopy(model).cpu()
    dtype = next((p.dtype for p in cpu_model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn(batch, *tuple(input_size), generator=torch.Generator().manual_seed(0)).to(dtype)
    run = onnx_session(cpu_model, x, threads=threads)
    was_training = cpu_model.training
    cpu_model.eval()
    try:
        with torch.inference_mode():
            ref = cpu_model(x)
    finally:
        cpu_model.train(was_training)
    out = torch.from_numpy(run(x.numpy()))
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol * max(scale, 1.0))
    xn = x.numpy()
    ms = _median_ms(lambda: run(xn), repeats, warmup, time.perf_counter)
    return {"median_ms": ms, "repeats": repeats, "batch": batch, "threads": threads,
            "max_rel_diff": float((out - ref).abs().max()) / max(scale, 1e-12)}
