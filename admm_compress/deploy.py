"""Deployment helpers for exported models: pick the faster kernel of each sparse layer.

An exported unstructured sparse layer (:class:`~admm_compress.layers.SparseLinear`,
``SparseConv1d``, ``SparseConv2d``) computes ``y = (W * M) x`` either with the stock dense
operator (``kernel="dense"``: the cost of the dense layer, whatever the density) or with a
``torch.sparse_csr`` matrix product (``kernel="csr"``: cost ~ the non-zeros, plus an im2col
``F.unfold`` for a convolution).  Which is faster depends on the density, the shape, the batch
and the CPU (measured on a 2-core x86 machine: a 4096 x 4096 Linear at density 0.05 runs 3.7x
faster in CSR, a 64-channel 56 x 56 conv at density 0.1 runs 2.8x *slower*), so
:func:`select_kernels` measures both on the layer's real input and keeps the faster one.

The CSR kernel is used only for inference (no autograd), on CPU, in eager mode: traced,
scripted, compiled and ONNX-exported graphs always contain the dense op (see
:class:`~admm_compress.layers._SparseMixin`).

:class:`~admm_compress.views.InputChannelView` (view ``"input_channel"``) is the low-rank split that runs
fastest on thin convolutions (a 1x1 conv ``I -> r`` then the ``k``-sized conv ``r -> O``), :func:`onnx_session` /
:func:`ort_latency` (defined in :mod:`admm_compress.latency`) run and time an exported model in ONNX Runtime,
and :func:`fold_batchnorm` (defined in :mod:`admm_compress.fold`) folds eval-mode BatchNorms into the
layers before them, also behind the two branches of an exported ``L + S`` layer.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .fold import fold_batchnorm  # noqa: F401  (public here too)
from .latency import _median_ms, onnx_session, ort_latency  # noqa: F401  (public here too)
from .layers import _SparseConvMixin, _SparseMixin
from .storage import saved_bytes, storage_bytes, storage_report

__all__ = ["select_kernels", "keep_faster", "storage_bytes", "saved_bytes", "storage_report", "clear_kernel_cache",
           "onnx_session", "ort_latency", "fold_batchnorm", "InputChannelView"]

log = logging.getLogger(__name__)

#: measured timings, keyed by layer geometry + input shape + threads: each shape is measured once
_KERNEL_CACHE: dict[tuple, tuple[float, float]] = {}


def clear_kernel_cache() -> None:
    """Forget the timings :func:`select_kernels` measured (e.g. after changing the thread count)."""
    _KERNEL_CACHE.clear()


def _geometry(m: nn.Module) -> tuple:
    if isinstance(m, _SparseConvMixin):
        return (m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
    return ()


def _clock(timer: str):
    """``"wall"``: perf_counter; ``"cpu"``: this process's CPU time (blind to other processes'
    load, but counts every intra-op thread); ``"auto"``: CPU time when torch runs 1 thread."""
    if timer == "auto":
        timer = "cpu" if torch.get_num_threads() == 1 else "wall"
    return time.process_time if timer == "cpu" else time.perf_counter


def _timing_args(fn: str, who: str, example_inputs, repeats, warmup, margin, timer):
    """Check the timing arguments :func:`select_kernels` and :func:`keep_faster` share; the clock."""
    if not example_inputs:
        raise ValueError(f"{fn}: give at least one example input ({who}(*example_inputs) must run)")
    for name, val, low in (("repeats", repeats, 3), ("warmup", warmup, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{fn}: {name} must be an int >= {low}, got {val!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"{fn}: margin must be a number in [0, 1), got {margin!r}")
    if timer not in ("auto", "wall", "cpu"):
        raise ValueError(f"{fn}: timer must be 'auto', 'wall' or 'cpu', got {timer!r}")
    return _clock(timer)


def _record_inputs(model: nn.Module, example_inputs, handles) -> None:
    """One inference pass of ``model`` in eval mode, for the input-recording hooks in ``handles``;
    the hooks are removed and every module's train/eval mode restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.inference_mode():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)


def _time_layer(m: _SparseMixin, x: torch.Tensor, repeats: int, warmup: int, clock) -> tuple[float, float]:
    """Median ms of ``m(x)`` with the dense and with the CSR kernel (interleaved rounds)."""
    old = m.kernel
    dense, csr = [], []
    try:
        with torch.inference_mode():
            for r in range(3):  # interleave so that a load change on the machine hits both
                order = ("dense", "csr") if r % 2 == 0 else ("csr", "dense")
                for k in order:
                    m.kernel = k
                    (dense if k == "dense" else csr).append(
                        _median_ms(lambda: m(x), max(1, repeats // 3), warmup if r == 0 else 1, clock))
    finally:
        m.kernel = old
    return min(dense), min(csr)


def select_kernels(model: nn.Module, *example_inputs, repeats: int = 15, warmup: int = 3,
                   margin: float = 0.05, timer: str = "auto") -> list[dict]:
    """Measure dense vs CSR execution of every sparse layer on its real input; keep the faster.

    Runs ``model(*example_inputs)`` once (eval mode, no autograd; the model's train/eval mode is
    restored) to record each sparse layer's input, then times the layer alone with each kernel
    (median of ``repeats`` calls, interleaved, after ``warmup`` calls).  A layer gets
    ``kernel="csr"`` when CSR is faster by more than ``margin`` (relative), else ``"dense"``;
    layers whose CSR path does not apply (grouped or ``padding="same"`` convolutions, a
    non-CPU input) stay dense.  Timings are cached per (layer geometry, non-zeros, input shape,
    dtype, threads), so identical layers are measured once.

    Parameters
    ----------
    model : nn.Module
        An exported model (other modules are left alone).
    *example_inputs
        Inputs of a deployment-sized call (the batch size matters).
    repeats, warmup : int
        Timed (>= 3) and untimed (>= 0) calls per kernel and layer.
    margin : float
        In ``[0, 1)``: CSR must be faster than ``(1 - margin) x`` the dense time.
    timer : {"auto", "wall", "cpu"}
        What is timed: wall clock, or the process's CPU time (robust on a shared machine, exact
        for single-threaded torch); ``"auto"`` = ``"cpu"`` when ``torch.get_num_threads() == 1``.

    Returns
    -------
    list of dict
        Per sparse layer: ``name, shape, density, input_shape, dense_ms, csr_ms, kernel, reason``.
        The choice also shows in each layer's ``repr`` (``kernel=csr (dense .. ms, csr .. ms)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"select_kernels: model must be an nn.Module, got {type(model).__name__}")
    clock = _timing_args("select_kernels", "model", example_inputs, repeats, warmup, margin, timer)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _SparseMixin)]
    if not layers:
        return []
    inputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(mod, args):
            if name not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach().clone()
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    kernels = {n: m.kernel for n, m in layers}
    try:
        for _, m in layers:
            m.kernel = "dense"
        _record_inputs(model, example_inputs, handles)
    finally:
        for n, m in layers:
            m.kernel = kernels[n]
    report = []
    for name, m in layers:
        x = inputs.get(name)
        row = {"name": name, "shape": tuple(m.weight.shape), "density": m.nnz / max(m.weight.numel(), 1),
               "input_shape": None if x is None else tuple(x.shape), "dense_ms": None, "csr_ms": None}
        if x is None:
            reason, kernel = "not called by the example input", "dense"
        elif x.device.type != "cpu":
            reason, kernel = f"input on {x.device.type} (CSR path is CPU-only)", "dense"
        elif isinstance(m, _SparseConvMixin) and not m._csr_conv_ok():
            reason, kernel = "grouped / 'same'-padded / non-zero-padded conv: no CSR path", "dense"
        else:
            key = (type(m).__name__, tuple(m.weight.shape), m.nnz, _geometry(m), tuple(x.shape), x.dtype,
                   torch.get_num_threads(), clock)
            failed = None
            if key not in _KERNEL_CACHE:
                try:
                    _KERNEL_CACHE[key] = _time_layer(m, x, repeats, warmup, clock)
                except (RuntimeError, NotImplementedError) as e:  # e.g. no CSR matmul for this dtype
                    failed = f"CSR kernel unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            if failed is not None:
                kernel, reason = "dense", failed
            else:
                d_ms, c_ms = _KERNEL_CACHE[key]
                row["dense_ms"], row["csr_ms"] = d_ms, c_ms
                kernel = "csr" if c_ms < (1 - margin) * d_ms else "dense"
                reason = f"measured: dense {d_ms:.3g} ms, csr {c_ms:.3g} ms"
                m.kernel_timing = {"dense_ms": d_ms, "csr_ms": c_ms, "input_shape": tuple(x.shape)}
        m.kernel = kernel
        row["kernel"], row["reason"] = kernel, reason
        log.info("sparse layer '%s' (density %.3f): kernel=%s (%s)", name, row["density"], kernel, reason)
        report.append(row)
    return report


# ------------------------------------------------------------------ latency-aware export pass
def _dense_projected(model: nn.Module, spec) -> tuple[nn.Module, list]:
    """A copy of ``model`` whose constrained weights are what ``export`` builds from (the
    reconstruction of their factors), and its bindings."""
    import copy

    from torch.nn.utils import parametrize

    from .specs import resolve, unwrap

    src = unwrap(model)
    if any(parametrize.is_parametrized(m) for m in src.modules()):
        raise ValueError("keep_faster: the model is parametrized (LoRITa factors / fine-tuning structure); "
                         "pass the finalized model with its parametrizations removed")
    dense = copy.deepcopy(src)
    bindings = resolve(getattr(spec, "spec", spec), dense)
    from .sets.cardinality import joint_factors

    with torch.no_grad():
        joint = joint_factors(bindings)
        for b in bindings:
            c = b.constraint
            factors = joint[b.key] if b.key in joint else c.factorize(b.to_view(b.param.detach()))
            b.param.copy_(b.view.back(c.reconstruct(factors, b.viewed_shape), b.shape))
    return dense, bindings


def _time_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int, warmup: int, clock) -> tuple[float, float]:
    """Median ms of ``a(x)`` and ``b(x)`` (interleaved rounds, the best round's median each)."""
    ta, tb = [], []
    with torch.inference_mode():
        for r in range(3):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                m = (a, b)[which]
                (ta if which == 0 else tb).append(
                    _median_ms(lambda: m(x), max(1, repeats // 3), warmup if r == 0 else 1, clock))
    return min(ta), min(tb)


def keep_faster(compact: nn.Module, model: nn.Module, spec, *example_inputs, repeats: int = 15,
                warmup: int = 3, margin: float = 0.05, timer: str = "auto") -> list[dict]:
    """Latency-aware pass: put a constrained layer back in dense form where that is faster.

    For every layer of ``spec`` that :func:`admm_compress.export` replaced in ``compact``
    (low-rank pair, TT, ``Sum``), the compact module and the dense layer holding the *same*
    constrained weight (the reconstruction of its factors, so it still satisfies the constraint
    and the model's outputs do not change) are timed on the layer's real input.  Unstructured
    sparse layers are settled by :func:`select_kernels` (run first): their dense kernel is the
    dense layer's own op, so they are never slower than it beyond timing noise.  Where the dense
    layer is faster by more than ``margin`` (relative), it replaces the compact module in
    ``compact`` (in place).  Layers whose compact form does not take the dense layer's input and
    give its output (channels removed in neighbours by structured sparsity) are left alone.

    Parameters
    ----------
    compact : nn.Module
        ``ac.export(model, spec)``; modified in place.
    model, spec
        What ``compact`` was exported from (the same weights).
    *example_inputs
        A deployment-sized input: ``compact(*example_inputs)`` must run.
    repeats, warmup, margin, timer
        As :func:`select_kernels`.

    Returns
    -------
    list of dict
        Per constrained layer: ``name, compact`` (its exported type), ``compact_ms, dense_ms,
        kept`` (``"compact"`` or ``"dense"``) and ``reason``.
    """
    import copy

    from .specs import replace_module, unwrap

    if not isinstance(compact, nn.Module) or not isinstance(model, nn.Module):
        raise TypeError(f"keep_faster: compact and model must be nn.Modules, got {type(compact).__name__} "
                        f"and {type(model).__name__}")
    clock = _timing_args("keep_faster", "compact", example_inputs, repeats, warmup, margin, timer)
    compact = unwrap(compact)
    select_kernels(compact, *example_inputs, repeats=repeats, warmup=warmup, margin=margin, timer=timer)
    dense, bindings = _dense_projected(model, spec)
    names = []
    for b in bindings:
        if b.name not in names:
            names.append(b.name)
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        try:
            mod = compact.get_submodule(n)
        except AttributeError:
            continue

        def record(mod, args, n=n):
            if n not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[n] = args[0].detach().clone()
        handles.append(mod.register_forward_pre_hook(record))
    _record_inputs(compact, example_inputs, handles)
    report = []
    for n in names:
        row = {"name": n, "compact": None, "compact_ms": None, "dense_ms": None, "kept": "compact"}
        try:
            cm = compact.get_submodule(n)
        except AttributeError:
            row.update(kept="-", reason="not in the exported model")
            report.append(row)
            continue
        dm = dense.get_submodule(n)
        row["compact"] = type(cm).__name__
        x = inputs.get(n)
        if type(cm) is type(dm) and not isinstance(cm, _SparseMixin):
            row.update(kept="dense", reason="export kept it dense (compact form not smaller)")
        elif x is None:
            row["reason"] = "not called by the example input"
        elif isinstance(cm, _SparseMixin):  # its dense kernel *is* the dense layer's op
            row["reason"] = (f"sparse layer on its measured kernel ({cm.kernel}); its dense kernel is the "
                             f"dense layer's own op")
        else:
            dm_eval, cm_mode = copy.deepcopy(dm).eval(), cm.training
            cm.eval()
            with torch.inference_mode():
                ref = cm(x)
                try:
                    out = dm_eval(x)
                except RuntimeError:  # the compact layer's input lost channels: no dense stand-in
                    out = None
            same = out is not None and ref.shape == out.shape and torch.allclose(
                out, ref, rtol=1e-3, atol=1e-4 * max(float(ref.abs().max()), 1.0))
            if not same:
                row["reason"] = "dense layer's output differs (neighbouring channels removed): left alone"
            else:
                c_ms, d_ms = _time_pair(cm, dm_eval, x, repeats, warmup, clock)
                row["compact_ms"], row["dense_ms"] = c_ms, d_ms
                if d_ms < (1 - margin) * c_ms:
                    new = copy.deepcopy(dm)
                    new.train(cm_mode)
                    replace_module(compact, n, new)
                    row["kept"] = "dense"
                    row["reason"] = f"dense faster: {d_ms:.3g} ms vs compact {c_ms:.3g} ms"
                else:
                    row["reason"] = f"compact not slower: {c_ms:.3g} ms vs dense {d_ms:.3g} ms"
            cm.train(cm_mode)
        log.info("layer '%s': keeps %s (%s)", n, row["kept"], row["reason"])
        report.append(row)
    return report


# The input-channel low-rank split lives with the other views and exporters; importable from here.
from .views import InputChannelView  # noqa: E402,F401
