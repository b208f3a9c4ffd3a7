"""LoRITa's entry points: :func:`lorita` (any N, truncation rule and targets) and
:func:`lorita_paper` (the published pipeline of Tables 2-5: Adam, GSVT then ISVT, one
fine-tuning round), both returning a configured :class:`~.solver.LoRITaSolver`."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ..._validation import check_choice, check_float, check_int
from ...sets import SchattenP, SquaredFrobenius
from ...specs import Constrain
from .solver import TRUNCATIONS, LoRITaSolver, _check_keep, _plain_layers, layer_group

__all__ = ["lorita", "lorita_paper"]

log = logging.getLogger("admm_compress.methods._lorita.solver")  # unchanged logger name


def lorita(n_factors: int = 3, weight_decay: float = 5e-4, *, targets=(nn.Conv2d, nn.Linear),
           exclude=None, truncation: str | None = "lsvt", rank: int | None = None,
           rank_ratio: float | None = None, keep=None, target_ratio: float | None = None,
           target_params: int | None = None, params_per_round: int = 500, n_samples: int = 120,
           isvt_loader=None, isvt_loss_fn: Callable | None = None, inner=None,
           optimizer: str = "sgd", momentum: float = 0.9, other_weight_decay: float | None = None,
           group_fn: Callable = layer_group, init: str = "random", attention_only: bool = False,
           isvt_seed: int = 0) -> LoRITaSolver:
    r"""A :class:`LoRITaSolver`: train ``W = F_N ... F_1`` with weight decay, then truncate.

    Parameters
    ----------
    n_factors : int >= 1
        ``N`` of the paper (``N = 1``: the un-factorized baseline; the paper uses 2 or 3).
    weight_decay : float >= 0
        Torch's ``weight_decay`` on the factors: gradient ``weight_decay * F_i``, penalty
        ``weight_decay/2 sum ||F_i||_F^2`` = ``SchattenP(p=2/N, weight=weight_decay N/2)`` at the
        optimum.  The paper's Eq. 8 ``lambda`` (penalty ``lambda sum ||F_i||^2``) is
        ``weight_decay / 2``; its tuned values are optimizer settings, i.e. this argument.
    targets : module type(s), glob(s) or predicate
        Layers to factorize (default every ``Conv2d`` and ``Linear``, i.e. also attention
        projections; grouped/transposed convolutions are skipped when types are given).
    exclude : glob or list of globs
        Layers left alone.
    truncation : {"lsvt", "gsvt", "isvt", None}
        Post-training rule (Sec. 4): LSVT (fixed rank or fraction per layer), GSVT (each matrix
        normalized by its largest singular value, one sort per group conv / linear / attention),
        ISVT (App. A: ``params_per_round`` parameters removed per round from the layer whose
        truncation raises the loss on ``n_samples`` training examples least, until the target).
        ``None``: collapse only.
    rank, rank_ratio
        LSVT: a rank per layer, or the fraction of ``min(m, n)`` kept (default ``0.5`` when
        neither is given).
    keep : int, float or mapping group -> int/float
        GSVT: singular values kept per group (``int``) or fraction of each group's values.
        ISVT: optional GSVT run first (the paper's "GSVT followed by ISVT").
    target_ratio, target_params
        ISVT: the parameter budget of the truncated layers, as a fraction of their dense size or
        as a count (exactly one).
    params_per_round : int
        ISVT parameters removed per round (paper: 500).
    n_samples : int
        ISVT sample size (paper: 120).
    isvt_loader : batch ``(x, y)`` or loader, optional
        ISVT sample source; default the training loader given to :meth:`LoRITaSolver.fit`.
    isvt_loss_fn : callable, optional
        ISVT loss; default the loss of ``fit``, else cross entropy.
    inner : {"min", "auto", "in", "out"}, int or None
        Inner dimension of the factors (:func:`admm_compress.methods._lorita.factorization.apply_factorization`);
        ``"auto"`` is the paper's layout (square inner factors), ``"min"`` = ``min(m, n)``.
        Default: ``"auto"`` with ``init="random"``, ``"min"`` with ``init="svd"`` (where the extra
        inner directions of ``"auto"`` would start at zero and stay there).
    init : {"random", "svd"}
        ``"random"`` (default, training from scratch as the paper): independent Gaussian factors
        whose product has the layer's current mean square; ``"svd"``: balanced factors of the
        current weight (exact product), to compress a trained model.
    attention_only : bool
        Factorize only the attention projections (group ``"attention"`` of ``group_fn``), the
        paper's ViT setting (Sec. 5.3: "over-parameterization across all attention modules").
    isvt_seed : int
        Seed of ISVT's random subsample of ``n_samples`` training examples.
    optimizer : {"sgd", "adam"}
        Default optimizer of :meth:`fit` when none is passed (coupled L2 weight decay).
    momentum : float
        SGD momentum of the default optimizer.
    other_weight_decay : float, optional
        Weight decay of all other parameters (biases, BatchNorm, untargeted layers);
        default ``weight_decay``.
    group_fn : callable
        ``(name, module, parent) -> "conv" | "linear" | "attention"`` for GSVT
        (default :func:`layer_group`).

    Returns
    -------
    LoRITaSolver

    Raises
    ------
    TypeError, ValueError
        Invalid arguments (before any model is touched).
    """
    n_factors = check_int("n_factors", n_factors, low=1, where="lorita")
    weight_decay = check_float("weight_decay", weight_decay, low=0.0, where="lorita")
    check_choice("truncation", truncation, TRUNCATIONS + (None,), where="lorita")
    check_choice("optimizer", optimizer, ("sgd", "adam"), where="lorita")
    momentum = check_float("momentum", momentum, low=0.0, high=1.0, high_open=True, where="lorita")
    if other_weight_decay is not None:
        other_weight_decay = check_float("other_weight_decay", other_weight_decay, low=0.0, where="lorita")
    params_per_round = check_int("params_per_round", params_per_round, low=1, where="lorita")
    n_samples = check_int("n_samples", n_samples, low=1, where="lorita")
    check_choice("init", init, ("random", "svd"), where="lorita")
    if not isinstance(attention_only, bool):
        raise TypeError(f"lorita: attention_only must be a bool, got {attention_only!r}")
    isvt_seed = check_int("isvt_seed", isvt_seed, low=0, where="lorita")
    if inner is None:
        inner = "auto" if init == "random" else "min"
    elif isinstance(inner, str):
        check_choice("inner", inner, ("auto", "in", "out", "min"), where="lorita")
    else:
        check_int("inner", inner, low=1, where="lorita")
    if not callable(group_fn):
        raise TypeError(f"lorita: group_fn must be callable (name, module, parent) -> group, got {group_fn!r}")
    if truncation == "lsvt":
        if rank is not None and rank_ratio is not None:
            raise ValueError(f"lorita: give at most one of rank or rank_ratio for LSVT, got rank={rank!r}, "
                             f"rank_ratio={rank_ratio!r}")
        if rank is not None:
            rank = check_int("rank", rank, low=1, where="lorita")
        else:
            rank_ratio = check_float("rank_ratio", 0.5 if rank_ratio is None else rank_ratio, low=0.0,
                                     high=1.0, low_open=True, where="lorita")
    elif rank is not None or rank_ratio is not None:
        raise ValueError(f"lorita: rank/rank_ratio apply to truncation='lsvt', not {truncation!r}")
    if truncation == "gsvt":
        if keep is None:
            raise ValueError("lorita: truncation='gsvt' needs keep= (singular values kept per group: "
                             "an int, a fraction in (0, 1], or a mapping group -> value)")
    if keep is not None:
        if truncation not in ("gsvt", "isvt"):
            raise ValueError(f"lorita: keep applies to truncation='gsvt' or 'isvt', not {truncation!r}")
        keep = _check_keep(keep)
    if truncation == "isvt":
        if (target_ratio is None) == (target_params is None):
            raise ValueError(f"lorita: truncation='isvt' needs exactly one of target_ratio (fraction of the "
                             f"dense parameters kept, in (0, 1)) or target_params, got target_ratio="
                             f"{target_ratio!r}, target_params={target_params!r}")
        if target_ratio is not None:
            target_ratio = check_float("target_ratio", target_ratio, low=0.0, high=1.0, low_open=True,
                                       high_open=True, where="lorita")
        else:
            target_params = check_int("target_params", target_params, low=0, where="lorita")
        if isvt_loss_fn is not None and not callable(isvt_loss_fn):
            raise TypeError(f"lorita: isvt_loss_fn must be callable, got {isvt_loss_fn!r}")
    elif target_ratio is not None or target_params is not None:
        raise ValueError(f"lorita: target_ratio/target_params apply to truncation='isvt', not {truncation!r}")

    if isinstance(targets, type):
        targets = (targets,)
    skip = False
    if isinstance(targets, tuple) and targets and all(isinstance(t, type) for t in targets):
        targets = _plain_layers(targets)
        skip = True  # grouped / depthwise convs and fused-kernel layers: skipped with a WARNING
    elif isinstance(targets, (list, set)) and all(isinstance(t, str) for t in targets):
        globs = list(targets)
        targets = _glob_predicate(globs)
    constraint = (SchattenP(p=2.0 / n_factors, weight=weight_decay * n_factors / 2.0) if n_factors >= 2
                  else SquaredFrobenius(weight=weight_decay / 2.0))
    spec = [Constrain(targets, constraint, view="auto", exclude=exclude, name=f"lorita:N={n_factors}",
                      skip_unexportable=skip)]
    return LoRITaSolver(spec, n_factors=n_factors, weight_decay=weight_decay, truncation=truncation,
                        rank=rank, rank_ratio=rank_ratio, keep=keep, target_ratio=target_ratio,
                        target_params=target_params, params_per_round=params_per_round,
                        n_samples=n_samples, isvt_loader=isvt_loader, isvt_loss_fn=isvt_loss_fn,
                        inner=inner, optimizer=optimizer, momentum=momentum,
                        other_weight_decay=other_weight_decay, group_fn=group_fn, init=init,
                        attention_only=attention_only, isvt_seed=isvt_seed)


#: The paper's learning rates (Sec. 5.1-5.3: Adam, FCN 1e-2, CNN and ViT 3e-4).
PAPER_LR = {"fcn": 1e-2, "cnn": 3e-4, "vit": 3e-4}


def lorita_paper(arch: str, n_factors: int = 3, weight_decay: float = 1e-4, *, keep=0.5,
                 target_ratio: float = 0.3, finetune_epochs: int = 1, **kwargs) -> LoRITaSolver:
    r"""LoRITa's published pipeline as one preset (papers/004 Sec. 5, App. A, Tables 2-5).

    * random factors (``init="random"``, ``inner="auto"``: square inner factors), ``N`` in
      {2, 3, 4};
    * Adam with coupled L2 weight decay on the factors (``optimizer="adam"``), learning rate
      ``1e-2`` (``arch="fcn"``) or ``3e-4`` (``"cnn"``, ``"vit"``), applied by
      :meth:`LoRITaSolver.fit` unless ``lr=`` is given;
    * ``weight_decay`` is torch's (``lambda_paper = weight_decay / 2``, see the module
      docstring); the paper tunes it per model (FCN / ViT grids around ``1e-5 ... 2e-3``,
      CNN ``1e-5 ... 1e-2``): tune it;
    * truncation: GSVT with ``keep`` (per group), then ISVT to ``target_ratio`` of the dense
      parameters with 500 parameters per round on 120 random training examples;
    * one fine-tuning round: ``fit(..., finetune_epochs=finetune_epochs)`` by default;
    * ``arch="vit"``: only the attention projections are factorized (``attention_only=True``).

    Other keyword arguments go to :func:`lorita` (e.g. ``targets``, ``exclude``,
    ``other_weight_decay``).
    """
    check_choice("arch", arch, tuple(PAPER_LR), where="lorita_paper")
    finetune_epochs = check_int("finetune_epochs", finetune_epochs, low=0, where="lorita_paper")
    opts = dict(truncation="isvt", keep=keep, target_ratio=target_ratio, params_per_round=500,
                n_samples=120, optimizer="adam", init="random", inner="auto",
                attention_only=arch == "vit")
    opts.update(kwargs)
    solver = lorita(n_factors, weight_decay, **opts)
    solver.fit_defaults = {"lr": PAPER_LR[arch], "finetune_epochs": finetune_epochs}
    return solver


def _glob_predicate(globs: list[str]):
    """Predicate selecting modules whose name matches any of ``globs`` (with a matrix weight)."""
    import fnmatch

    def select(name: str, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return (isinstance(w, torch.Tensor) and w.dim() >= 2
                and any(fnmatch.fnmatchcase(name, g) for g in globs))

    select.__name__ = ",".join(globs)
    return select
