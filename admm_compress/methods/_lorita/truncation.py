"""LoRITa's singular-value truncation rules after training (papers/004, Sec. 4 and App. A).

:func:`truncate_to_ranks` (given ranks), :func:`lsvt` (one rank or ratio for every layer), :func:`gsvt`
(global: singular values of a layer group pooled and cut together) and :func:`isvt` (iterative:
remove the singular value whose removal costs the least loss on a seeded random sample).  Each
acts on the collapsed product ``W = F_N ... F_1`` of a factorized layer
(:mod:`.factorization`) or on a plain weight, and returns the kept rank per layer.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..._validation import check_float, check_int
from ...functional import compute_dtype, rank_from_ratio, svdvals, truncated_svd
from ...ranks import global_rank_selection

from .factorization import _has_matrix_weight, _matrix_shape, _reconstruct, is_factorized, lowrank_param_count  # noqa: F401

__all__ = ["truncate_to_ranks", "lsvt", "gsvt", "isvt"]

log = logging.getLogger("admm_compress.methods._lorita.factorization")  # unchanged logger name


def _truncation_layers(model: nn.Module, names) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(names, str):
        names = [names]
    named = dict(model.named_modules())
    out = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be str, got {name!r}")
        if name not in named or not name:
            raise ValueError(f"the model has no module named {name!r}")
        module = named[name]
        if not _has_matrix_weight(module):
            raise ValueError(f"layer {name!r} ({type(module).__name__}) has no weight with >= 2 dimensions")
        if is_factorized(module):
            raise ValueError(f"layer {name!r} is still factorized; call collapse(model) before truncating")
        out.append((name, module))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"layer names must be distinct, got {[n for n, _ in out]}")
    if not out:
        raise ValueError("no layer named to truncate")
    return out


def _write(module: nn.Module, mat: torch.Tensor) -> None:
    """Copy a matrix into ``module.weight`` in place (same Parameter object, optimizer stays valid)."""
    with torch.no_grad():
        module.weight.copy_(mat.reshape(module.weight.shape).to(module.weight.dtype))


def _truncate_one(module: nn.Module, rank: int) -> None:
    m, n = _matrix_shape(module.weight.shape)
    if rank >= min(m, n):
        return                                           # full rank: the weight is unchanged
    U, s, Vh = truncated_svd(module.weight.detach().reshape(m, n), rank)
    _write(module, _reconstruct(U, s, Vh, rank))


def truncate_to_ranks(model: nn.Module, ranks: Mapping[str, int]) -> dict[str, int]:
    """Set each named layer's weight to its best rank-``r`` approximation ``SVD_r(W)`` in place.

    Acts on the ``(out, in * prod(k))`` view; ``r = min(m, n)`` leaves the weight untouched.
    All names and ranks are checked (``1 <= r <= min(m, n)``) before any weight is changed.
    Cost: one SVD per truncated layer.  Returns ``{name: rank}``.
    """
    if not isinstance(ranks, Mapping):
        raise TypeError(f"ranks must be a mapping name -> rank, got {type(ranks).__name__}")
    layers = _truncation_layers(model, list(ranks))
    plan = []
    for name, module in layers:
        m, n = _matrix_shape(module.weight.shape)
        r = check_int("rank", ranks[name], low=1, high=min(m, n), where=f"layer {name!r} ({m} x {n})")
        plan.append((name, module, r))
    for name, module, r in plan:
        _truncate_one(module, r)
    return {name: r for name, _, r in plan}


def lsvt(model: nn.Module, names, rank: int | None = None, ratio: float | None = None) -> dict[str, int]:
    """Local singular-value truncation (LoRITa Sec. 4, LSVT): every named layer to a fixed rank.

    Exactly one of ``rank`` (``r = min(rank, min(m, n))`` per layer) or ``ratio`` in ``(0, 1]``
    (``r = max(1, int(ratio * min(m, n)))``, :func:`admm_compress.functional.rank_from_ratio`).
    In place; returns ``{name: rank}``.
    """
    if (rank is None) == (ratio is None):
        raise ValueError(f"give exactly one of rank or ratio, got rank={rank!r}, ratio={ratio!r}")
    if rank is not None:
        rank = check_int("rank", rank, low=1)
    else:
        ratio = check_float("ratio", ratio, low=0.0, high=1.0, low_open=True)
    layers = _truncation_layers(model, names)
    ranks = {}
    for name, module in layers:
        m, n = _matrix_shape(module.weight.shape)
        ranks[name] = min(rank, min(m, n)) if rank is not None else rank_from_ratio(ratio, m, n)
    for name, module in layers:
        _truncate_one(module, ranks[name])
    log.info("LSVT: ranks %s", ranks)
    return ranks


def _group_keep(gname: str, keep, total: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep for group {gname!r} must be an int (count) or a float in (0, 1] "
                        f"(fraction), got {keep!r}")
    if isinstance(keep, numbers.Integral):
        return check_int("keep", keep, low=1, high=total, where=f"group {gname!r} ({total} singular values)")
    frac = check_float("keep", keep, low=0.0, high=1.0, low_open=True, where=f"group {gname!r}")
    return max(1, int(frac * total + 1e-9))


def gsvt(model: nn.Module, groups, keep) -> dict[str, int]:
    r"""Global singular-value truncation (LoRITa Sec. 4, GSVT), one global ranking per group.

    Each matrix's singular values are normalized by its largest one, ``s_j / s_1``; inside each
    group (the paper ranks conv, linear and attention weights separately) all normalized values are
    sorted together and the ``K`` largest are kept; a layer keeps as many singular values as it has
    among them, and at least one (``K`` is raised to the number of layers if needed).

    Parameters
    ----------
    groups : mapping group name -> iterable of layer names, or an iterable of names (one group)
    keep : int, float or mapping group name -> int/float
        ``int``: ``K`` singular values kept in the group; ``float`` in ``(0, 1]``: fraction of
        the group's singular values (``K = max(1, int(keep * total))``).

    Returns
    -------
    dict
        ``{name: rank}`` over all groups.  Weights are truncated in place.  Cost: one SVD per layer.
    """
    if isinstance(groups, Mapping):
        groups = {str(g): ([v] if isinstance(v, str) else list(v)) for g, v in groups.items()}
    else:
        groups = {"all": [groups] if isinstance(groups, str) else list(groups)}
    if not groups:
        raise ValueError("groups is empty")
    all_names = [n for v in groups.values() for n in v]
    if len(set(all_names)) != len(all_names):
        raise ValueError(f"a layer appears in more than one group: {all_names}")
    if isinstance(keep, Mapping):
        missing = set(groups) - set(keep)
        if missing:
            raise ValueError(f"keep has no entry for group(s) {sorted(missing)}")
    plan = {}
    for gname, names in groups.items():
        layers = _truncation_layers(model, names)
        total = sum(min(_matrix_shape(m.weight.shape)) for _, m in layers)
        k = _group_keep(gname, keep[gname] if isinstance(keep, Mapping) else keep, total)
        plan[gname] = (layers, k)
    ranks: dict[str, int] = {}
    for gname, (layers, k) in plan.items():
        if k < len(layers):
            log.warning("GSVT group %r: keep=%d < %d layers; every layer keeps one singular value",
                        gname, k, len(layers))
            k = len(layers)
        svals = []
        for name, module in layers:
            m, n = _matrix_shape(module.weight.shape)
            w = module.weight.detach().reshape(m, n)
            svals.append(svdvals(w.to(compute_dtype(w.dtype))).cpu())
        # each layer's largest value is always kept (its floor of 1); the rest compete globally
        # on s_j / s_1 -- the one global ranking of admm_compress.ranks
        counts = global_rank_selection(svals, drop=sum(s.numel() for s in svals) - k, min_rank=1,
                                       normalize=True, floor_mode="reserve")
        for (name, module), c in zip(layers, counts):
            ranks[name] = int(c)
            _truncate_one(module, int(c))
        log.info("GSVT group %r: kept %d singular values: %s", gname, k,
                 {name: ranks[name] for name, _ in layers})
    return ranks


def _sample_batch(data, n_samples: int, generator: torch.Generator | None):
    """``(x, y)``: a uniformly random subsample of ``n_samples`` examples (all if fewer).

    ``data`` is a batch tuple (rows drawn with ``randperm``), a ``DataLoader`` over a sized
    dataset (indices drawn, then ``dataset[i]`` collated with the loader's ``collate_fn``; no
    pass over the data), or any iterable of batches (one pass, reservoir sampling: every example
    is kept with probability ``n_samples / total``).  ``generator`` seeds the draw (default: a
    generator seeded with 0, so the sample is reproducible).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    gdev = generator.device

    def draw(total: int, k: int) -> torch.Tensor:
        return torch.randperm(total, generator=generator, device=gdev)[:k].cpu()

    if isinstance(data, (tuple, list)) and len(data) >= 2 and isinstance(data[0], torch.Tensor):
        x, y = data[0], data[1]
        if x.shape[0] > n_samples:
            idx = draw(x.shape[0], n_samples)
            x, y = x[idx.to(x.device)], y[idx.to(y.device)]
        return x, y
    dataset = getattr(data, "dataset", None)
    if isinstance(data, torch.utils.data.DataLoader) and dataset is not None and hasattr(dataset, "__len__") \
            and hasattr(dataset, "__getitem__") and not isinstance(dataset, torch.utils.data.IterableDataset):
        idx = draw(len(dataset), min(n_samples, len(dataset))).tolist()
        if not idx:
            raise ValueError("data yielded no batch")
        batch = data.collate_fn([dataset[i] for i in idx])
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"each batch of data must be (inputs, targets), got {type(batch).__name__}")
        return batch[0], batch[1]
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"data must be a batch (inputs, targets) or an iterable of such batches, "
                        f"got {type(data).__name__}") from None
    xs, ys, seen = None, None, 0       # reservoir (Vitter's algorithm R), one pass
    for batch in it:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"each batch of data must be (inputs, targets), got {type(batch).__name__}")
        bx, by = batch[0], batch[1]
        for j in range(bx.shape[0]):
            if xs is None:
                xs = bx.new_empty((n_samples, *bx.shape[1:]))
                ys = by.new_empty((n_samples, *by.shape[1:]))
            if seen < n_samples:
                xs[seen], ys[seen] = bx[j], by[j]
            else:
                k = int(torch.randint(seen + 1, (1,), generator=generator, device=gdev))
                if k < n_samples:
                    xs[k], ys[k] = bx[j], by[j]
            seen += 1
    if xs is None:
        raise ValueError("data yielded no batch")
    return xs[:min(seen, n_samples)], ys[:min(seen, n_samples)]


def isvt(model: nn.Module, names, loss_fn: Callable | None = None, data=None, *,
         params_per_round: int = 500, target_params: int | None = None,
         target_ratio: float | None = None, n_samples: int = 120,
         ranks: Mapping[str, int] | None = None, max_rounds: int | None = None,
         generator: torch.Generator | None = None, progress: bool = True) -> dict[str, int]:
    r"""Iterative singular-value truncation (LoRITa Sec. 4 and Appendix A, ISVT), greedy.

    Each round, for every layer ``l`` with rank ``r_l > 1``, tentatively drop its
    ``s_l = min(r_l - 1, ceil(params_per_round / (m_l + n_l)))`` smallest singular values (a singular
    value is worth ``m + n`` parameters), evaluate the loss on ``n_samples`` training examples, and
    commit the layer with the smallest loss ``E(l)``.  Stop once the named layers hold at most the
    target number of parameters (counted by :func:`lowrank_param_count`), after ``max_rounds``
    rounds, or when every layer is at rank 1.  The model is evaluated in ``eval()`` mode under
    ``torch.no_grad()`` (its mode is restored); weights end truncated in place.

    Parameters
    ----------
    names : iterable of str
        Layers to truncate (already collapsed).
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> scalar``; default cross entropy.
    data : (inputs, targets) or iterable of such batches
        ``n_samples`` examples are drawn uniformly at random (App. A: "120 randomly subsampled
        training data"), seeded by ``generator`` (default seed 0): rows of a batch, indices of a
        ``DataLoader``'s dataset, or a reservoir sample over one pass of any other iterable.
    params_per_round : int
        Parameters removed per round (paper: 500).
    target_params, target_ratio
        Exactly one: the parameter budget of the named layers, or a fraction in ``(0, 1)`` of their
        dense size ``sum_l m_l n_l``.
    n_samples : int
        Examples the loss is evaluated on (paper: 120).
    ranks : mapping, optional
        Starting ranks (e.g. the result of :func:`gsvt`, as the paper runs GSVT first); default
        full rank.
    max_rounds : int, optional
        Upper bound on the number of rounds.

    Returns
    -------
    dict
        ``{name: rank}``.  Cost per round: one forward pass on ``n_samples`` examples per layer;
        one SVD per layer in total.
    """
    loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if data is None:
        raise ValueError("data is required: a batch (inputs, targets) or a loader of training batches")
    params_per_round = check_int("params_per_round", params_per_round, low=1)
    n_samples = check_int("n_samples", n_samples, low=1)
    if max_rounds is not None:
        max_rounds = check_int("max_rounds", max_rounds, low=0)
    if (target_params is None) == (target_ratio is None):
        raise ValueError(f"give exactly one of target_params or target_ratio, got "
                         f"target_params={target_params!r}, target_ratio={target_ratio!r}")
    layers = _truncation_layers(model, names)
    shapes = {name: _matrix_shape(mod.weight.shape) for name, mod in layers}
    dense = sum(m * n for m, n in shapes.values())
    if target_params is not None:
        target = check_int("target_params", target_params, low=0)
    else:
        target = int(check_float("target_ratio", target_ratio, low=0.0, high=1.0, low_open=True,
                                 high_open=True) * dense)
    cur: dict[str, int] = {}
    for name, _ in layers:
        q = min(shapes[name])
        cur[name] = q if ranks is None or name not in ranks else check_int(
            "ranks", ranks[name], low=1, high=q, where=f"layer {name!r}")
    x, y = _sample_batch(data, n_samples, generator)
    p0 = next(model.parameters(), None)
    if p0 is not None:
        x, y = x.to(p0.device), y.to(p0.device)

    modules = dict(layers)
    svd = {name: truncated_svd(mod.weight.detach().reshape(shapes[name])) for name, mod in layers}
    committed = {}
    for name, mod in layers:                            # start from the given ranks
        if cur[name] < min(shapes[name]):
            _write(mod, _reconstruct(*svd[name], cur[name]))
        committed[name] = mod.weight.detach().clone()

    def count() -> int:
        return sum(lowrank_param_count(*shapes[nm], cur[nm]) for nm in cur)

    was_training = model.training
    model.eval()
    rounds = 0
    start = count()
    bar = tqdm(total=max(0, start - target), desc="ISVT", unit="param", disable=not progress)
    try:
        with torch.no_grad():
            base = float(loss_fn(model(x), y))
            log.info("ISVT: %d params in %d layers, target %d, loss %.5g", start, len(layers), target, base)
            while count() > target and (max_rounds is None or rounds < max_rounds):
                trials = {}
                for name, mod in layers:
                    r = cur[name]
                    if r <= 1:
                        continue
                    s = min(r - 1, math.ceil(params_per_round / sum(shapes[name])))
                    _write(mod, _reconstruct(*svd[name], r - s))
                    trials[name] = (float(loss_fn(model(x), y)), s)
                    mod.weight.copy_(committed[name])
                if not trials:
                    log.warning("ISVT: every layer is at rank 1; stopping at %d params (target %d)",
                                count(), target)
                    break
                best = min(trials, key=lambda nm: trials[nm][0])   # first layer wins ties
                loss, s = trials[best]
                cur[best] -= s
                _write(modules[best], _reconstruct(*svd[best], cur[best]))
                committed[best] = modules[best].weight.detach().clone()
                rounds += 1
                bar.update(min(start - count(), bar.total) - bar.n)
                bar.set_postfix(loss=f"{loss:.4g}", layer=best)
                log.debug("ISVT round %d: %s -> rank %d (loss %.5g), %d params", rounds, best,
                          cur[best], loss, count())
    finally:
        bar.close()
        model.train(was_training)
    log.info("ISVT: %d rounds, %d -> %d params (target %d)", rounds, start, count(), target)
    return dict(cur)
