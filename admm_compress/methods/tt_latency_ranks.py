"""Per-layer TT ranks for a *measured latency* budget on the deployment backend.

:func:`~admm_compress.methods.raspa.tt_ranks_for_budget` spends a parameter or MAC budget, but a
TT chain's time does not follow its MACs on a CPU: in ONNX Runtime (AVX-512) ResNet-56's chains
ran 1.5-2x faster at ranks that are multiples of 16 than at their neighbours (uniform ranks 15 /
16 / 17: 0.80 / 0.61 / 0.90 of the dense time, ``docs/results/tt_rank_alignment.md``), so the
MAC-budgeted ranks of a -75 % model took 0.83 of the dense time where ranks at the same MACs took
0.62.  :func:`tt_ranks_for_latency` measures instead: it times every targeted layer's exported TT
chain (the module :func:`admm_compress.export` builds) at a grid of rank pairs on the chosen
backend, and picks per-layer ranks that lose the least energy within a time budget -- a
multiple-choice knapsack, the formulation of hardware-aware pruning with latency lookup tables
(HALP, Shen et al., NeurIPS 2022), solved exactly by dynamic programming over the budget.  With
``forms=("chain", "fold_first", "fold_last")`` the candidates also include each chain's exact
two-conv realizations; :func:`realize_forms` applies the chosen ones to the exported model.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .._validation import check_choice, check_float, check_int
from ..layers import tt as tt_layers
from ..sets import TTRank
from ..views import tt_layout_view
from .raspa import layer_io_shapes, tt_target_layers, tt_unfolding_spectra

__all__ = ["tt_ranks_for_latency", "realize_forms", "rank_grid", "knapsack_min_error", "measure_tt_layer"]

log = logging.getLogger(__name__)


def rank_grid(n: int) -> list[int]:
    """Default candidate ranks up to ``n``: 1, 2, 4, 8, the multiples of 16 and ``n`` itself
    (SIMD kernels favour channel counts that are multiples of 16; the small ranks keep the
    cheapest layers reachable)."""
    n = check_int("n", n, low=1, where="rank_grid")
    return sorted({r for r in (1, 2, 4, 8) if r <= n} | set(range(16, n + 1, 16)) | {n})


def knapsack_min_error(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float,
                       resolution: int = 4096) -> list[int]:
    """One choice per group minimizing the summed error with the summed cost within ``budget``.

    The multiple-choice knapsack by dynamic programming over the budget in ``resolution`` steps:
    every cost is rounded *up* to a step (``budget / resolution``), so the result always fits and
    is optimal for the rounded costs (exactly optimal when the costs are multiples of the step).
    Ties in error go to the smaller cost, then to the earlier candidate.

    Parameters
    ----------
    errors, costs : sequences of sequences of float
        ``errors[g][c]``, ``costs[g][c]`` (>= 0) of candidate ``c`` of group ``g``.
    budget : float > 0
    resolution : int >= 1

    Returns
    -------
    list of int
        The chosen candidate of every group.

    Raises
    ------
    ValueError
        Mismatched or empty groups, negative costs, or no choice that fits (the message gives the
        smallest total cost).
    """
    budget = check_float("budget", budget, low=0.0, low_open=True, where="knapsack_min_error")
    resolution = check_int("resolution", resolution, low=1, where="knapsack_min_error")
    if len(errors) != len(costs) or not errors:
        raise ValueError(f"knapsack_min_error: errors and costs need the same non-zero number of groups, got "
                         f"{len(errors)} and {len(costs)}")
    step = budget / resolution
    units, errs = [], []
    for g, (e, c) in enumerate(zip(errors, costs)):
        e, c = np.asarray(e, dtype=float), np.asarray(c, dtype=float)
        if e.shape != c.shape or e.ndim != 1 or e.size == 0:
            raise ValueError(f"knapsack_min_error: group {g} has {e.size} error(s) and {c.size} cost(s)")
        if (c < 0).any() or not np.isfinite(c).all() or not np.isfinite(e).all():
            raise ValueError(f"knapsack_min_error: group {g} has a negative or non-finite cost or error")
        # a cost that is a multiple of the step up to float noise stays that multiple
        units.append(np.ceil(c / step - 1e-9).astype(np.int64))
        errs.append(e)
    smallest = sum(float(np.min(np.asarray(c, dtype=float))) for c in costs)
    if sum(int(u.min()) for u in units) > resolution:
        raise ValueError(f"knapsack_min_error: budget={budget:g} is below the smallest total cost {smallest:g}")
    n = resolution + 1
    best = np.zeros(n)  # best[b]: least error of the groups so far with at most b steps spent
    choice = []
    for u, e in zip(units, errs):
        new = np.full(n, np.inf)
        pick = np.full(n, -1, dtype=np.int64)
        for c in np.lexsort((np.arange(e.size), u, e)):  # by error, then cost, then index: ties stay first
            if u[c] >= n:
                continue
            cand = np.full(n, np.inf)
            cand[u[c]:] = best[:n - u[c]] + e[c]
            better = cand < new
            new[better] = cand[better]
            pick[better] = c
        best = new
        choice.append(pick)
    b = int(np.argmin(best))  # the least error; the first (smallest budget) of equal ones
    out = []
    for u, pick in zip(reversed(units), reversed(choice)):
        c = int(pick[b])
        out.append(c)
        b -= int(u[c])
    return out[::-1]


def measure_tt_layer(layer: nn.Module, ranks: tuple[int, int] | None, input_shape: Sequence[int], *,
                     layout: str = "oki", backend: str = "eager", batch: int = 1, repeats: int = 30,
                     form: str = "chain") -> float:
    """Median milliseconds of ``layer`` (``ranks=None``) or of its exported TT chain at ``ranks``.

    The chain is what :func:`admm_compress.export` builds for a copy of the layer constrained to
    ``TTRank(ranks)`` on the ``layout`` view (prepare -> finalize -> export), in its ``form``
    (``"chain"``, or an exact two-conv realization of an ``"oki"`` chain, ``"fold_first"`` /
    ``"fold_last"``: :func:`admm_compress.layers.tt_realize.chain_realizations`), timed on a
    random input of ``(batch, *input_shape)`` by :func:`admm_compress.latency.latency`
    (``"eager"``) or :func:`admm_compress.latency.ort_latency` (``"ort"``, outputs checked against
    eager).
    """
    from ..layers.tt_realize import chain_realizations
    from ..export import export
    from ..latency import latency, ort_latency
    from ..solver import Solver
    from ..specs import Constrain

    net = nn.Sequential(copy.deepcopy(layer)).eval()
    quiet = [logging.getLogger(f"admm_compress.{n}") for n in ("solver", "complexity", "export", "specs")]
    levels = [q.level for q in quiet]
    for q in quiet:  # one prepare / export / timing per candidate: their INFO lines would flood the log
        q.setLevel(max(q.getEffectiveLevel(), logging.WARNING))
    try:
        if ranks is not None:
            solver = Solver([Constrain("0", TTRank(tuple(ranks)), view=tt_layout_view(layout))]).prepare(net)
            solver.finalize(net)
            net = export(net, solver).eval()
            if form != "chain":
                net[0] = chain_realizations(net[0])[form].eval()
        if backend == "ort":
            return float(ort_latency(net, tuple(input_shape), batch=batch, repeats=repeats)["median_ms"])
        return float(latency(net, tuple(input_shape), batch=batch, repeats=repeats).median)
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def _signature(m: nn.Module, in_shape) -> tuple:
    keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
            "padding_mode", "in_features", "out_features")
    return (type(m).__name__, tuple(getattr(m, k, None) for k in keys), m.bias is not None, tuple(in_shape))


def tt_ranks_for_latency(model: nn.Module, reduction: float, *, input_size: Sequence[int], targets=nn.Conv2d,
                         exclude=None, layout: str = "oki", backend: str = "eager", batch: int = 1,
                         repeats: int = 30, grid: Callable[[int], Sequence[int]] = rank_grid,
                         latency_fn: Callable | None = None, resolution: int = 4096,
                         forms: Sequence[str] = ("chain",), return_forms: bool = False):
    """Per-layer TT ranks ``{layer: (r_1, r_2)}`` whose chains take at most ``1 - reduction`` of
    the targeted layers' dense time on ``backend``, losing the least energy.

    For every targeted layer (as in :func:`~admm_compress.methods.raspa.tt_ranks_for_budget`) the
    candidates are the rank pairs ``(r_1, r_2)`` with ``r_1`` in ``grid(a)`` and ``r_2`` in
    ``grid(c)`` of the layer's TT tensor ``(a, K, c)`` (``(O, kh*kw, I)`` for ``"oki"``; ``r_2 <=
    K r_1``, ``r_1 <= K c``).  A candidate's error is the TT-SVD bound on the relative squared
    energy it discards, ``sum_{i > r_1} s^(1)_i^2 + sum_{j > r_2} s^(2)_j^2``
    (:func:`~admm_compress.methods.raspa.tt_unfolding_spectra`); its cost the measured time of the
    layer's exported chain on its own input shape (:func:`measure_tt_layer`; layers with the same
    configuration and input shape are timed once).  The choice minimizes the summed error with
    the summed chain time at most ``(1 - reduction)`` times the summed dense time of the same
    layers (:func:`knapsack_min_error`).  The whole model's time also contains the untargeted
    layers, activations and the framework's overhead, so its ratio is closer to 1; and a sum of
    per-layer timings is not the model's time (caches, fusions): measure the exported model.

    Parameters
    ----------
    model : nn.Module
        The (pre-trained) model: its weights give the errors, a forward pass at ``input_size``
        the layers' input shapes.
    reduction : float in (0, 1)
        Fraction of the targeted layers' dense time to remove.
    input_size : tuple of int
        Model input shape without batch.
    targets, exclude :
        Layers to compress, as for :func:`~admm_compress.methods.raspa.raspa`.
    layout : {"oki", "paired"}
    backend : {"eager", "ort"}
        Where the chains are timed (``"ort"``: ONNX Runtime CPU, 1 thread; needs ``onnxruntime``).
    batch, repeats : int
        Timing batch size and timed calls per measurement.
    grid : callable ``n -> ranks``
        Candidate ranks of a mode of size ``n`` (default :func:`rank_grid`).
    latency_fn : callable, optional
        ``latency_fn(layer, ranks, input_shape) -> cost`` (``ranks=None``: the dense layer)
        instead of measuring, e.g. a table measured on the deployment device.
    resolution : int
        Budget steps of the dynamic program (every cost is rounded up to ``budget / resolution``,
        so the result fits).
    forms : sequence of {"chain", "fold_first", "fold_last"}
        Realizations of each rank pair's chain to time as candidates (``"oki"`` layout): the
        exported three-conv chain and its exact two-conv forms ``kxk I->r_1, 1x1 r_1->O`` /
        ``1x1 I->r_2, kxk r_2->O`` (:func:`admm_compress.layers.tt_realize.chain_realizations`;
        each kept only where it has fewer values and no more MACs than the dense layer).  With
        more than ``"chain"``, pass ``return_forms=True`` and apply the chosen forms to the
        exported model with :func:`realize_forms`; a ``latency_fn`` then also gets ``form=``.
    return_forms : bool
        Return ``(ranks, {layer: form})`` instead of ``ranks``.

    Returns
    -------
    dict
        ``{layer name: (r_1, r_2)}``, usable as ``raspa(tt_ranks=...)`` or
        ``Constrain(name, TTRank(r), view=TTView.oki())``.

    Raises
    ------
    ValueError
        Bad arguments, a selected layer the TT export cannot build (a grouped or depthwise
        convolution; before any timing), or a budget the smallest candidates cannot meet (the
        message gives the largest reachable reduction).
    """
    from ..specs import unwrap

    where = "tt_ranks_for_latency"
    red = check_float("reduction", reduction, low=0.0, high=1.0, low_open=True, high_open=True, where=where)
    layout = check_choice("layout", layout, ("oki", "paired"), where=where)
    backend = check_choice("backend", backend, ("eager", "ort"), where=where)
    batch = check_int("batch", batch, low=1, where=where)
    repeats = check_int("repeats", repeats, low=1, where=where)
    forms = tuple(forms)
    bad_forms = [f for f in forms if f not in ("chain", "fold_first", "fold_last")]
    if not forms or bad_forms:
        raise ValueError(f"{where}: forms={forms!r}; allowed: a non-empty subset of 'chain', 'fold_first', "
                         f"'fold_last'")
    if forms != ("chain",) and layout != "oki":
        raise ValueError(f"{where}: forms={forms!r} needs layout='oki' (the two-conv forms are of the oki chain)")
    if latency_fn is not None and not callable(latency_fn):
        raise TypeError(f"{where}: latency_fn must be callable (layer, ranks, input_shape) -> cost, got "
                        f"{type(latency_fn).__name__}")
    if backend == "ort" and latency_fn is None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{where}: backend='ort' needs onnxruntime (pip install 'admm-compress[onnx]')") from e
    model = unwrap(model)
    view = tt_layout_view(layout)
    layers = tt_target_layers(model, targets, exclude, view, where)
    shapes = {n: calls[0] for n, calls in layer_io_shapes(model, layers, input_size).items()}  # first call
    missing = [n for n, _ in layers if n not in shapes]
    if missing:
        raise ValueError(f"{where}: layers {missing} do not run in a forward pass at input_size={tuple(input_size)}")

    cache: dict = {}

    def cost(m, ranks, shape, form="chain"):
        key = (_signature(m, shape), None if ranks is None else tuple(ranks), form)
        if key not in cache:
            if latency_fn is not None:
                extra = {"form": form} if forms != ("chain",) and ranks is not None else {}
                cache[key] = float(latency_fn(m, ranks, shape, **extra))
            else:
                cache[key] = measure_tt_layer(m, ranks, shape, layout=layout, backend=backend, batch=batch,
                                              repeats=repeats, form=form)
        return cache[key]

    def size(shape, ranks, form, pin, pout, padded):
        """(values, MACs) of a candidate, bias left out."""
        if form == "chain":
            return tt_layers.tt_layer_cost(view, shape, ranks, pin, pout, padded=padded)
        O, I, K = shape[0], shape[1], math.prod(shape[2:])
        r1, r2 = ranks
        if form == "fold_first":  # kxk I -> r1 at the output resolution, 1x1 r1 -> O
            return K * I * r1 + r1 * O, (K * I * r1 + r1 * O) * pout
        return r2 * I + K * r2 * O, r2 * I * pin + K * r2 * O * pout  # fold_last: 1x1 I -> r2, kxk r2 -> O

    errors, costs, cands = [], [], []
    dense_total = 0.0
    for n, m in layers:
        K, s1, s2 = tt_unfolding_spectra(m.weight, view)
        a, _, c = view.viewed_shape(tuple(m.weight.shape))
        e1 = torch.cat([torch.cumsum((s1 ** 2).flip(0), 0).flip(0), s1.new_zeros(1)])  # e1[r] = sum_{i >= r} s_i^2
        e2 = torch.cat([torch.cumsum((s2 ** 2).flip(0), 0).flip(0), s2.new_zeros(1)])
        (in_shape, out_shape), shape = shapes[n], tuple(m.weight.shape)
        pin, pout = math.prod(in_shape[1:]), math.prod(out_shape[1:])
        d_params, d_macs = math.prod(shape), math.prod(shape) * pout
        padded = tt_layers._pads(m)
        def smaller(ranks, form):  # fewer values and no more MACs than dense (for the chain: what export builds)
            values, macs = size(shape, ranks, form, pin, pout, padded)
            return values < d_params and macs <= d_macs

        pairs = [((r1, r2), f) for r1 in grid(a) for r2 in grid(c) for f in forms
                 if 1 <= r1 <= min(a, K * c) and 1 <= r2 <= min(c, K * r1) and smaller((r1, r2), f)]
        if not pairs:
            raise ValueError(f"{where}: grid gives no rank pair smaller than the dense layer {n!r} (TT shape "
                             f"{(a, K, c)}); exclude it or pass a finer grid")
        cands.append(pairs)
        errors.append([float(e1[r1] + e2[r2]) for (r1, r2), _ in pairs])  # r1 <= min(a, K c) = len(s1); r2 alike
        costs.append([cost(m, p, in_shape, f) for p, f in pairs])
        dense_total += cost(m, None, in_shape)
    budget = (1.0 - red) * dense_total
    floor = sum(min(c) for c in costs)
    if floor > budget:
        raise ValueError(f"{where}: reduction={red} of the targeted layers' time is out of reach: the fastest "
                         f"candidates take {floor / dense_total:.3f} of the dense time (largest reachable "
                         f"reduction {max(0.0, 1 - floor / dense_total):.3f})")
    pick = knapsack_min_error(errors, costs, budget, resolution)
    out = {n: cands[i][pick[i]][0] for i, (n, _) in enumerate(layers)}
    chosen_forms = {n: cands[i][pick[i]][1] for i, (n, _) in enumerate(layers)}
    spent = sum(costs[i][pick[i]] for i in range(len(layers)))
    log.info("%s: %d layers, %d timings, chains %.3f of the dense time (budget %.3f), discarded energy %.4g",
             where, len(layers), len(cache), spent / dense_total, 1 - red,
             sum(errors[i][pick[i]] for i in range(len(layers))))
    return (out, chosen_forms) if return_forms else out


def realize_forms(exported: nn.Module, forms: dict) -> nn.Module:
    """Replace, in place, each exported ``"oki"`` TT chain named in ``forms`` by its realization
    ``forms[name]`` (``"chain"``: left alone; ``"fold_first"`` / ``"fold_last"``: the exact two-conv
    forms of :func:`admm_compress.layers.tt_realize.chain_realizations`), as chosen by
    :func:`tt_ranks_for_latency` with ``return_forms=True``; returns ``exported``."""
    from ..layers.tt_realize import chain_realizations, is_oki_chain
    from ..specs import replace_module

    for name, form in forms.items():
        if form == "chain":
            continue
        try:
            mod = exported.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is None or not is_oki_chain(mod):
            raise ValueError(f"realize_forms: layer {name!r} of the exported model is not an oki TT chain "
                             f"(got {type(mod).__name__}); export the model with the planned ranks first")
        if form not in ("fold_first", "fold_last"):
            raise ValueError(f"realize_forms: form {form!r} for {name!r}; allowed: 'chain', 'fold_first', 'fold_last'")
        replace_module(exported, name, chain_realizations(mod)[form])
    return exported
