r"""LoRITa: low-rank induced training through linear-layer composition (papers/004, Sec. 4).

LoRITa is constrained training with a Schatten-:math:`(2/N)` penalty that is *realized by a
reparameterization* instead of a Z/U splitting (a :class:`~admm_compress.compressor.Compressor`
run by the same trainer as :class:`~admm_compress.Solver`): every targeted weight is
trained as a product of ``N`` dense factors (:func:`~admm_compress.methods._lorita.factorization.apply_factorization`,
a :mod:`torch.nn.utils.parametrize` parametrization on the ``(out, in)`` view of a ``Linear`` or
attention projection and the ``(out, in*kh*kw)`` view of a convolution)

.. math::  W = F_N \cdots F_2 F_1,

and plain weight decay on the factors (Eq. 8).  By Prop. 4.2 (Eq. 4-6 with ``p_i = 2``)

.. math::

    \min_{F_N \cdots F_1 = W} \; \frac{\lambda}{2} \sum_{i=1}^N \|F_i\|_F^2
    \;=\; \frac{\lambda N}{2} \sum_j \sigma_j(W)^{2/N},

so torch's ``weight_decay=lambda`` (gradient ``lambda F_i``, i.e. the penalty
``lambda/2 sum ||F_i||_F^2``) is the penalty :class:`~admm_compress.SchattenP` with
``p = 2/N`` and ``weight = lambda N / 2`` on ``W`` -- with no SVD during training.  The solver's
training spec states exactly that constraint (``solver.spec`` before :meth:`LoRITaSolver.finalize`).

Life cycle (the :class:`~admm_compress.compressor.Compressor` protocol)

* :meth:`~LoRITaSolver.prepare`: resolve the spec (:func:`admm_compress.specs.resolve`) and
  factorize the selected weights.  ``init="random"`` (default; the paper trains "from a random
  state", Sec. 5.1): independent Gaussian factors scaled so the product has the layer's current
  mean square (its default initialization in a fresh model), with the paper's factor shapes
  (``inner="auto"``: square inner factors); ``init="svd"``: a *balanced* split of the current
  weight (the product is exactly the original weight), to compress a trained model.  The module
  tree is unchanged and the state-dict key ``"<layer>.weight"`` becomes
  ``"<layer>.parametrizations.weight.original{0..N-1}"``;
* training: :meth:`~LoRITaSolver.penalty` is 0 and :meth:`~LoRITaSolver.step` /
  :meth:`~LoRITaSolver.epoch_end` only count; the weight decay of the optimizer is the whole
  regularizer.  **Build the optimizer after** ``prepare`` (the old weight Parameters are no
  longer in the model): :meth:`~LoRITaSolver.fit` does, and its default optimizer puts
  ``weight_decay`` on the factors (and ``other_weight_decay`` on every other parameter);
  a factory ``lambda params: torch.optim.Adam(params, lr, weight_decay=wd)`` works too (use
  coupled L2 such as ``SGD``/``Adam``, not ``AdamW``: decoupled decay is not the gradient of
  Eq. 8);
* :meth:`~LoRITaSolver.finalize`: collapse (the product becomes the plain weight again), then
  truncate with LSVT, GSVT or ISVT (Sec. 4, App. A; :mod:`admm_compress.methods._lorita.factorization`), and
  switch ``solver.spec`` to one ``LowRank(rank=r_l)`` per layer so that
  ``admm_compress.export(model, solver)`` builds the two-layer split of Sec. 4.1 / Fig. 2
  and fine-tuning (``fit(..., finetune_epochs=k)``) keeps the ranks.

``n_factors=1`` is the paper's baseline (``N = 1``): nothing is factorized, the same weight decay
and the same truncation apply, so ``N = 1`` and ``N > 1`` run through one code path.

Weight-decay convention.  ``weight_decay`` is torch's: the optimizer adds ``weight_decay * F_i``
to the gradient, the gradient of ``weight_decay / 2 * sum ||F_i||_F^2``.  The paper's Eq. 3 / 8
writes the penalty as ``lambda * sum ||F_i||_F^2`` (gradient ``2 lambda F_i``), so
``lambda_paper = weight_decay / 2`` (:attr:`LoRITaSolver.paper_lambda`); the paper's tuned values
(Sec. 5) are the ones passed to its optimizer, i.e. torch's ``weight_decay`` here.

The paper's pipeline is :func:`lorita_paper`: Adam (lr ``1e-2`` FCN, ``3e-4`` CNN / ViT), random
factors, GSVT then ISVT on 120 random training examples, then one fine-tuning round; for a ViT
only the attention projections are over-parameterized (Sec. 5.3).

Size (~520 lines, a sixth of it this docstring): the one LoRITa compressor -- prepare
(factorize), the Schatten-(2/N) penalty it realizes, the default optimizer with decay on the
factors only, finalize (collapse + LSVT/GSVT/ISVT), export_spec, state -- kept together because
each hook reads the same per-layer state; the presets are in ``presets.py``, the truncation rules
in ``truncation.py``, the factor product in ``factorization.py``.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..._validation import check_float, check_int
from .factorization import (FactorProduct, _matrix_shape, apply_factorization, collapse,
                             factor_parameters, factor_sq_norm, gsvt, is_factorized, isvt,
                             lowrank_param_count, lsvt)
from ...sets import LowRank, SquaredFrobenius
from ...compressor import Compressor, FitContext
from ...specs import Constrain, exact_glob, resolve, unwrap

__all__ = ["lorita", "lorita_paper", "LoRITaSolver", "SquaredFrobenius", "layer_group"]

log = logging.getLogger(__name__)

TRUNCATIONS = ("lsvt", "gsvt", "isvt")
GROUPS = ("conv", "linear", "attention")


# ============================================================================ helpers
def layer_group(name: str, module: nn.Module, parent: nn.Module | None) -> str:
    """GSVT group of a layer: ``"conv"``, ``"attention"`` or ``"linear"`` (LoRITa Sec. 5.1).

    Convolutions form one group; a linear layer whose parent module's class name contains
    ``"Attention"`` (the ``q``/``k``/``v``/``out`` projections of
    :class:`admm_compress.models.vit.Attention`, the ``out_proj`` of
    :class:`torch.nn.MultiheadAttention`) is an attention projection; every other matrix
    weight is ``"linear"``.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if parent is not None and "attention" in type(parent).__name__.lower():
        return "attention"
    return "linear"


def _unshare(params) -> None:
    """Give every factor its own storage.

    ``balanced_factors`` returns the *same* middle tensor for ``F_2 ... F_{N-1}`` when no dtype
    cast happens (float64 weights, ``N >= 4``); two Parameters on one storage would receive each
    other's optimizer updates.
    """
    seen = set()
    with torch.no_grad():
        for p in params:
            ptr = p.data_ptr()
            if ptr in seen:
                p.data = p.data.clone()
            seen.add(p.data_ptr())


def _plain_layers(types: tuple):
    """Predicate: instances of ``types`` with a matrix weight (grouped / transposed convolutions
    are then skipped, with a WARNING, by the spec's ``skip_unexportable``)."""

    def select(name: str, module: nn.Module) -> bool:
        if not isinstance(module, types):
            return False
        w = getattr(module, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() >= 2

    select.__name__ = "|".join(t.__name__ for t in types)
    return select


def _check_keep(keep, where: str = "lorita") -> Any:
    """``keep`` of GSVT: int >= 1, float in (0, 1], or a mapping group -> such a value."""
    if isinstance(keep, Mapping):
        bad = [g for g in keep if g not in GROUPS]
        if bad:
            raise ValueError(f"{where}: keep has unknown group(s) {bad}; groups are {list(GROUPS)}")
        return {g: _check_keep(v, f"{where}: keep[{g!r}]") for g, v in keep.items()}
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"{where}: keep must be an int (singular values kept per group), a float in "
                        f"(0, 1] (fraction per group) or a mapping group -> value, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        return check_int("keep", keep, low=1, where=where)
    return check_float("keep", keep, low=0.0, high=1.0, low_open=True, where=where)


# ============================================================================ the solver
class LoRITaSolver(Compressor):
    """LoRITa as a :class:`~admm_compress.compressor.Compressor` (see the module docstring).

    Build it with :func:`lorita`.  Parameters are those of :func:`lorita`; ``spec`` is the
    training spec (one :class:`~admm_compress.Constrain` with ``SchattenP(p=2/N, weight=lambda N/2)``,
    or :class:`SquaredFrobenius` for ``N = 1``).

    Attributes
    ----------
    spec : list of Constrain
        Before :meth:`finalize`: the training spec.  After: one ``LowRank(rank=r_l)`` per
        truncated layer (:meth:`export_spec`), so ``admm_compress.export(model, solver.spec)``
        and the fine-tuning of :meth:`fit` keep the chosen ranks.
    final_ranks : dict
        ``{layer name: rank}`` after :meth:`finalize`.
    factorized : list of str
        Layers reparameterized by :meth:`prepare` (empty for ``N = 1``).
    fit_times : list of float
        Wall-clock seconds of every training epoch of :meth:`fit` (also in ``History``).
    """

    def __init__(self, spec, *, n_factors: int, weight_decay: float, truncation: str | None,
                 rank: int | None = None, rank_ratio: float | None = None, keep=None,
                 target_ratio: float | None = None, target_params: int | None = None,
                 params_per_round: int = 500, n_samples: int = 120, isvt_loader=None,
                 isvt_loss_fn: Callable | None = None, inner="min", optimizer: str = "sgd",
                 momentum: float = 0.9, other_weight_decay: float | None = None,
                 group_fn: Callable = layer_group, init: str = "svd", attention_only: bool = False,
                 isvt_seed: int = 0, fit_defaults: Mapping[str, Any] | None = None):
        self._final_spec = None
        super().__init__(spec)
        self.init = init
        self.attention_only = attention_only
        self.isvt_seed = isvt_seed
        self.fit_defaults = dict(fit_defaults or {})
        self._user_train_spec = list(self._train_spec)
        self.n_factors = n_factors
        self.weight_decay = weight_decay
        self.truncation = truncation
        self.rank, self.rank_ratio, self.keep = rank, rank_ratio, keep
        self.target_ratio, self.target_params = target_ratio, target_params
        self.params_per_round, self.n_samples = params_per_round, n_samples
        self.isvt_loader, self.isvt_loss_fn = isvt_loader, isvt_loss_fn
        self.inner = inner
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.other_weight_decay = weight_decay if other_weight_decay is None else other_weight_decay
        self.group_fn = group_fn
        self.factorized: list[str] = []
        self.final_ranks: dict[str, int] = {}
        self.fit_times: list[float] = []
        self._fit_data = None
        self._fit_loss = None
        self._progress = False

    # ------------------------------------------------------------------ spec
    @property
    def spec(self) -> list[Constrain]:
        return self._final_spec if self._final_spec is not None else self._train_spec

    @spec.setter
    def spec(self, value) -> None:
        self._train_spec = value
        self._final_spec = None

    @property
    def training_spec(self) -> list[Constrain]:
        """The spec the solver was built with (the Schatten-(2/N) constraint of training)."""
        return self._train_spec

    # ------------------------------------------------------------- life cycle
    def prepare(self, model: nn.Module) -> "LoRITaSolver":
        """Resolve the spec and factorize every selected weight into ``N`` balanced factors.

        Raises (before modifying the model) when the spec selects nothing or a selected weight
        is already parametrized.  The optimizer must be created afterwards.
        """
        target = unwrap(model)
        mods = dict(target.named_modules())
        if (self._model_ref is target and self.n_factors >= 2 and self.factorized
                and all(n in mods and is_factorized(mods[n]) for n in self.factorized)
                and self._final_spec is None):
            # prepare(model) then fit(model): the factorization this solver made is still in place
            log.info("LoRITa: model already prepared by this solver; keeping its factors")
            return self
        for m in target.modules():
            if is_factorized(m):
                raise ValueError("LoRITaSolver.prepare: the model already has factorized layers "
                                 "(prepare was called before); collapse(model) first or use a fresh model")
        self._final_spec = None
        self.final_ranks = {}
        if self.attention_only:
            self._restrict_to_attention(target)
        super().prepare(model)
        names = [b.name for b in self.bindings]
        if self.n_factors >= 2:
            self.factorized = apply_factorization(target, names, self.n_factors, inner=self.inner, init=self.init)
            if self.init == "svd":
                _unshare(factor_parameters(target))
        else:
            self.factorized = []
        log.info("LoRITa: N=%d on %d layer(s), %s factors, weight decay %.3g on the factors", self.n_factors,
                 len(names), self.init, self.weight_decay)
        if self.init == "random" and self.n_factors >= 2:
            log.info("LoRITa: init='random' discards the current values of %d layer(s) (training from scratch); "
                     "use init='svd' to compress a trained model", len(names))
        return self

    def _restrict_to_attention(self, target: nn.Module) -> None:
        """Keep only the layers of group ``"attention"`` (the paper's ViT setting, Sec. 5.3)."""
        spec = self._user_train_spec[0]
        base = Constrain(spec.target, spec.constraint, view=spec.view, exclude=spec.exclude, name=spec.name)
        mods = dict(target.named_modules())
        keep = []
        for b in resolve([base], target):
            parent = mods.get(b.name.rpartition(".")[0]) if "." in b.name else target
            if self.group_fn(b.name, b.module, parent) == "attention":
                keep.append(b.name)
        if not keep:
            raise ValueError("lorita(attention_only=True): the model has no attention projection (a Linear "
                             "inside a module whose class name contains 'Attention'); nn.MultiheadAttention's "
                             "packed in_proj_weight is not a layer and cannot be factorized")
        names = set(keep)
        self._attention_names = keep
        self._train_spec = [Constrain(lambda n, m, names=names: n in names, spec.constraint, view=spec.view,
                                      exclude=spec.exclude, name=spec.name)]

    @property
    def paper_lambda(self) -> float:
        """The paper's ``lambda`` of Eq. 3 / 8 (penalty ``lambda sum ||F||^2``): ``weight_decay / 2``."""
        return self.weight_decay / 2.0

    def penalty(self) -> torch.Tensor:
        """0: the Schatten-(2/N) penalty is the optimizer's weight decay on the factors (Eq. 8).

        Does not evaluate any factor product.
        """
        return super().penalty()

    def backward(self, model, inputs, targets, loss_fn, amp=None):
        """Forward under :func:`torch.nn.utils.parametrize.cached` (each factor product is
        computed once per step even if a layer is called several times), then backward."""
        with parametrize.cached():
            return super().backward(model, inputs, targets, loss_fn, amp)

    # ----------------------------------------------------- equivalence as code
    def factor_penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        r"""``lambda/2 * sum_l sum_i ||F_{l,i}||_F^2``: what weight decay ``lambda`` minimizes.

        For ``N = 1`` the sum runs over the (unfactorized) bound weights.  Differentiable.
        """
        self._require_prepared()
        model = unwrap(model) if model is not None else self._model_ref
        if self.n_factors >= 2:
            return 0.5 * self.weight_decay * factor_sq_norm(model)
        return 0.5 * self.weight_decay * sum(b.param.pow(2).sum() for b in self.bindings)

    def schatten_penalty(self) -> torch.Tensor:
        r"""``sum_l SchattenP(p=2/N, weight=lambda N/2)(W_l)`` of the current weights (Prop. 4.2).

        Equals :meth:`factor_penalty` when the factors are balanced (e.g. right after
        :meth:`prepare`) and is a lower bound otherwise.
        """
        self._require_prepared()
        c = self._train_spec[0].constraint
        with parametrize.cached():
            return sum(c(b.to_view(b.param)) for b in self.bindings)

    # ---------------------------------------------------------- optimizer
    def default_optimizer(self, model, lr):
        """``weight_decay`` on the factors, ``other_weight_decay`` on the rest (Eq. 8).

        Built after :meth:`prepare`, so it holds the factors.  ``optimizer="sgd"`` (momentum
        ``momentum``) or ``"adam"`` (coupled L2, the paper's Adam + weight decay).
        """
        model = unwrap(model)
        if self.n_factors >= 2:
            decayed = factor_parameters(model)
        else:
            decayed = [b.param for b in self.bindings]
        ids = {id(p) for p in decayed}
        rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
        decayed = [p for p in decayed if p.requires_grad]
        groups = [{"params": decayed, "weight_decay": self.weight_decay}]
        if rest:
            groups.append({"params": rest, "weight_decay": self.other_weight_decay})
        if self.optimizer_name == "adam":
            return torch.optim.Adam(groups, lr=lr)
        return torch.optim.SGD(groups, lr=lr, momentum=self.momentum)

    def repr_fields(self) -> str:
        return (f"n_factors={self.n_factors}, weight_decay={self.weight_decay:g}, "
                f"truncation={self.truncation!r}, specs={len(self.spec)}")

    # ------------------------------------------------------------ trainer hooks
    def on_fit_start(self, run: FitContext) -> None:
        """Keep the training ``loader`` and ``loss_fn`` for ISVT.

        ISVT (``truncation="isvt"``) evaluates the loss on ``n_samples`` examples drawn at
        random (seed ``isvt_seed``) from ``isvt_loader`` if one was given to :func:`lorita`, else
        from this ``loader`` (App. A: 120 randomly subsampled training examples).
        """
        self._fit_data, self._fit_loss = run.loader, run.loss_fn
        self._progress = bool(run.progress or False)
        self.fit_times = []

    def on_fit_end(self, history) -> None:
        """Forget the loader; :attr:`fit_times` = the training epochs' wall times."""
        self._fit_data, self._fit_loss = None, None
        self.fit_times = [r["wall"] for r in history.epochs if r.get("phase") == "train"]

    def evaluation_context(self):
        """One factor product per layer for a whole evaluation."""
        return parametrize.cached()

    def restore_finetune(self, model: nn.Module, state: dict) -> None:
        """Resuming fine-tuning from a checkpoint: rebuild the truncated structure from its ranks."""
        if self.final_ranks:
            return
        ranks = state.get("final_ranks")
        if not ranks:
            raise RuntimeError("the checkpoint has no LoRITa ranks to resume fine-tuning from")
        collapse(unwrap(model))
        self._set_final(unwrap(model), {k: int(v) for k, v in ranks.items()})

    # ------------------------------------------------------------- finalize
    def groups(self) -> dict[str, list[str]]:
        """GSVT groups ``{"conv" | "linear" | "attention": [layer names]}`` of the bound layers."""
        self._require_prepared()
        mods = dict(self._model_ref.named_modules())
        out: dict[str, list[str]] = {}
        for b in self._train_bindings():
            parent = mods.get(b.name.rpartition(".")[0]) if "." in b.name else self._model_ref
            g = self.group_fn(b.name, b.module, parent)
            if g not in GROUPS:
                raise ValueError(f"group_fn returned {g!r} for layer {b.name!r}; allowed: {list(GROUPS)}")
            out.setdefault(g, []).append(b.name)
        return out

    def _train_bindings(self):
        return self._trained_bindings if self._final_spec is not None else self.bindings

    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None, data=None, loss_fn: Callable | None = None) -> dict[str, bool]:
        """Collapse the factors, then truncate with the configured rule (Sec. 4, App. A).

        Parameters
        ----------
        model : nn.Module, optional
            The prepared model (default: the one :meth:`prepare` saw).
        data : batch or loader, optional
            ISVT sample; default ``isvt_loader`` of :func:`lorita`, else the loader of :meth:`fit`.
        loss_fn : callable, optional
            ISVT loss; default the ``isvt_loss_fn`` of :func:`lorita`, else that of :meth:`fit`,
            else cross entropy.

        Returns
        -------
        dict
            ``{weight key: feasible}``: whether each weight has rank at most its chosen rank
            (``LowRank(rank=r).contains``).  Afterwards ``solver.spec`` is :meth:`export_spec`.
        """
        self._require_prepared()
        if self._final_spec is not None:
            raise RuntimeError("LoRITaSolver.finalize: already finalized; prepare a model again")
        target = unwrap(model) if model is not None else self._model_ref
        if target is not self._model_ref:
            raise ValueError("finalize(model): this is not the model the solver was prepared on")
        collapse(target)
        names = [b.name for b in self.bindings]
        shapes = {b.name: _matrix_shape(b.shape) for b in self.bindings}
        t = self.truncation
        if t is None:
            ranks = {n: min(shapes[n]) for n in names}
        elif t == "lsvt":
            ranks = lsvt(target, names, rank=self.rank, ratio=self.rank_ratio)
        elif t == "gsvt":
            ranks = gsvt(target, self.groups(), self.keep)
        else:
            start = gsvt(target, self.groups(), self.keep) if self.keep is not None else None
            data = data if data is not None else (self.isvt_loader if self.isvt_loader is not None
                                                  else self._fit_data)
            if data is None:
                raise ValueError("LoRITa ISVT needs training data: pass isvt_loader= to lorita(), call "
                                 "fit(model, loader, ...), or finalize(model, data=(x, y))")
            loss_fn = loss_fn or self.isvt_loss_fn or self._fit_loss
            ranks = isvt(target, names, loss_fn, data, params_per_round=self.params_per_round,
                         target_params=self.target_params, target_ratio=self.target_ratio,
                         n_samples=self.n_samples, ranks=start, progress=self._progress,
                         generator=torch.Generator().manual_seed(self.isvt_seed))
        dense = sum(m * n for m, n in shapes.values())
        kept = sum(lowrank_param_count(*shapes[n], ranks[n]) for n in names)
        log.info("LoRITa %s: ranks %s; %d -> %d parameters in the truncated layers", t, ranks, dense, kept)
        self._set_final(target, ranks)
        feasible = {}
        for b in self.bindings:
            c = b.constraint
            feasible[b.key] = c.contains(b.to_view(b.param.detach()), atol=1e-6, rtol=1e-5)
        return feasible

    def _set_final(self, model: nn.Module, ranks: Mapping[str, int]) -> None:
        """Record the ranks and rebind the solver to ``LowRank(rank=r_l)`` per layer."""
        self._trained_bindings = list(self.bindings)
        self.final_ranks = dict(ranks)
        self._final_spec = self.export_spec()
        self.bindings = resolve(self._final_spec, model)

    def export_spec(self) -> list[Constrain]:
        """One ``Constrain(layer, LowRank(rank=r_l))`` per truncated layer (after :meth:`finalize`)."""
        if not self.final_ranks:
            raise RuntimeError("LoRITaSolver.export_spec: call finalize(model) (or fit) first")
        views = {b.name: b.view for b in self._train_bindings()}
        return [Constrain(exact_glob(n), LowRank(rank=r), view=views[n], name=f"lorita:{n}")
                for n, r in self.final_ranks.items()]

    # ----------------------------------------------------------------- info
    def describe(self) -> str:
        """Table: layer, GSVT group, weight shape, matrix view, N, factor shapes, sizes, rank."""
        if not self.bindings:
            return "(not prepared)"
        groups = {n: g for g, ns in self.groups().items() for n in ns}
        rows = [("layer", "group", "shape", "matrix", "N", "factors", "dense", "trained", "rank")]
        for b in self._train_bindings():
            m, n = _matrix_shape(b.shape)
            if b.name in self.factorized and not self.final_ranks:
                fp = [p for p in b.module.parametrizations["weight"] if isinstance(p, FactorProduct)][0]
                shapes = fp.factor_shapes
            else:
                from .factorization import factor_shapes
                shapes = factor_shapes(m, n, self.n_factors,
                                       None if self.inner == "min" else self._inner_dim(b, m, n))
            trained = sum(a * c for a, c in shapes)
            r = self.final_ranks.get(b.name)
            rows.append((b.name, groups.get(b.name, "?"), "x".join(map(str, b.shape)), f"{m}x{n}",
                         str(self.n_factors), " ".join(f"{a}x{c}" for a, c in shapes), str(m * n),
                         str(trained), "-" if r is None else str(r)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def _inner_dim(self, b, m: int, n: int) -> int:
        if isinstance(self.inner, numbers.Integral):
            return int(self.inner)
        return {"in": n, "out": m, "auto": n if isinstance(b.module, nn.Linear) else m}[self.inner]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update(n_factors=self.n_factors, final_ranks=dict(self.final_ranks))
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if "n_factors" in sd and int(sd["n_factors"]) != self.n_factors:
            raise ValueError(f"solver state is for n_factors={sd['n_factors']}, this solver has "
                             f"n_factors={self.n_factors}")
        super().load_state_dict(sd)


# The factories (presets) live in .presets; importable from here as before the split
# (``from admm_compress.methods.lorita import lorita``).
from .presets import _glob_predicate, lorita, lorita_paper  # noqa: E402,F401
