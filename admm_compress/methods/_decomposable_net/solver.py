r"""Decomposable-Net: one network exportable at any size (Yaguchi et al., IJCAI 2021; papers/002).

Decomposable-Net is a :class:`~admm_compress.compressor.Compressor` (run by the same trainer as
:class:`~admm_compress.Solver`) with the projection used on the
*loss side* instead of on the weights: no penalty, no ``Z``/``U``, no projection of ``W`` ever.
Every optimizer step minimizes the joint objective (Eq. 1)

.. math::

   (1-\lambda)\,\mathcal L(\mathcal D_b, \mathcal W, \Theta)
   + \lambda\,\mathcal L(\mathcal D_b, \widetilde{\mathcal W}, \Theta),
   \qquad \widetilde W_\ell = P_{r_\ell}(W_\ell)

where :math:`P_r` is the rank-``r`` truncated SVD of each layer's matrix view, differentiated
with the clipped closed form of App. A, Eq. (5)-(11)
(:func:`admm_compress.methods._decomposable_net.lowrank_autograd.truncated_svd_reconstruct`).  The weight decay
:math:`\eta\mathcal R(\mathcal W)` is the optimizer's.

One step (Algorithm 1)
----------------------
1. full-rank forward/backward: :math:`\nabla_f = \partial\mathcal L(\mathcal W)/\partial W`;
2. SVD of every decomposed layer; draw :math:`Z \sim \mathcal U(\alpha_l, \alpha_u)` and drop
   :math:`d = (1-Z)\sum_\ell R_\ell` bases with the rank criterion (Sec. 2.3): ``"global"`` --
   all singular values pooled raw and sorted globally (the paper), ``"uniform"`` /
   ``"energy"`` -- the "uni" / "eng" baselines of Fig. 2(c).  The floor rule ``rank_rule``:
   ``"official"`` (default) -- the official code, the top ``round(Z N)`` bases, then every rank
   raised to ``min(min_rank, R_l)`` (``rank_min = 5``); ``"paper"`` -- Sec. 2.3 as written, no
   floor: a layer may keep 0 bases (see *Rank 0* below); ``"reserve"`` -- ours, the floors set
   aside and the rest of the budget filled from the global order (keeps exactly
   ``max(round(Z N), sum floors)``; not measured better than the others, kept as an option);
3. low-rank forward/backward through the *same* parameters
   (:func:`torch.func.functional_call` with the truncated weights substituted; no model copy);
4. gradient per decomposed weight: :math:`(1-\lambda)\nabla_f + \lambda\,\frac{\|\nabla_f\|_F}
   {\|\nabla\|_F}\nabla` (Eq. 12 as realized by the official code: the low-rank gradient is
   rescaled per layer to the full-rank gradient's norm, ``lam`` itself stays fixed); every
   other parameter (biases, BN :math:`\gamma, \beta`) is shared and gets the plain
   :math:`\lambda`-weighted average.

Rank 0 (``rank_rule="paper"``): the paper removes such a layer.  In training its truncated
weight is zero (zero low-rank gradient).  At export it becomes a rank-1 factor pair with zero
factors, i.e. stock layers whose output is the bias alone (a residual branch then passes only its
shortcut; in a plain chain every later layer sees a constant); MACs are counted at rank 1.

BatchNorm (footnote 1): :math:`\gamma, \beta` are shared.  The low-rank pass normalizes with
its own batch statistics and does **not** touch the running statistics (it runs on clones of
the buffers); the full-rank pass tracks them as usual, so the trained model evaluates normally
at full size.  For every exported size the statistics are recomputed "on the whole training
set" (footnote 1; :func:`recalibrate_bn`, as in US-Nets): :meth:`DecomposableNetSolver.export`
uses the loader of the last :meth:`~DecomposableNetSolver.fit` (or ``bn_loader=``), every batch
of it unless ``bn_batches=`` bounds the cost.

Optimizer: without ``optimizer=``, :meth:`~DecomposableNetSolver.fit` uses the paper's and the
official code's SGD with Nesterov momentum 0.9 and the L2 regularization ``eta = 5e-4``
(Table 3) on the decomposed weights and every other weight tensor (``dim >= 2``) only, not on
biases or BatchNorm ``gamma, beta``.

Matrix views (Sec. 2.1; DESIGN.md, official ``tensor2mat``), selectable per layer:
``"channel"`` -> ``kh x kw`` conv ``I -> r`` then ``1 x 1`` conv ``r -> O``; ``"spatial"`` ->
``1 x kw`` conv then ``kh x 1`` conv (Tai et al. 2016).  The solver truncates in the library's
views (:class:`~admm_compress.views.ChannelView` ``(O, I*kh*kw)``,
:class:`~admm_compress.views.SpatialView` ``(O*kh, I*kw)``, ``"matrix"`` ``(O, I)`` for a linear
layer), the same views :func:`admm_compress.export` builds from; the paper's matricizations
(``(kh*kw*I, O)``, ``(kw*I, kh*O)``, ``W^T``;
:func:`~admm_compress.methods._decomposable_net.rank_selection.dn_matrix`) are their transposes up
to row/column permutations, so singular values and rank-``r`` truncations are identical (tested
against ``dn_matrix`` as the reference).  A ``1 x 1`` conv is always channel-wise (the paper; both
views coincide).  Layers decomposed by default: every ``Conv2d`` and ``Linear`` ("we apply the
low-rank approximation to every convolutional and fully connected layer", Sec. 2.1).

After training, :meth:`DecomposableNetSolver.export` returns a compact copy at any size -- a
rank ratio :math:`Z` (fraction of :math:`\sum_\ell R_\ell` bases kept) or a MACs budget -- with
stock ``nn.Conv2d`` / ``nn.Linear`` layers and BN statistics recomputed for that size.  It
builds the compact model through the generic :func:`admm_compress.export` with the
per-layer ``LowRank(rank=r_l)`` specs of :meth:`DecomposableNetSolver.export_spec` (views
``"channel"`` / ``"spatial"`` / ``"matrix"``, whose truncations equal those of the paper's
matricizations: the matrices are transposes and row/column permutations of each other), then
recalibrates BN.  ``ac.export(model, solver)`` uses :meth:`export_spec` at the configured size
(``export_ratio``) and cannot recalibrate BN (it has no data): it logs a WARNING naming
``solver.export(model, bn_loader=...)``.

Example::

    solver = methods.decomposable_net(rank_ratio=(0.01, 0.25), lam=0.5)
    solver.fit(model, train_loader, epochs=30)
    small = solver.export(model, rank_ratio=0.1, bn_loader=train_loader)
    tiny = solver.export(model, macs=2e6, input_size=(3, 32, 32), bn_loader=train_loader)

Size (~540 lines, a third docstring): Eq. 1's training (Algorithm 1) with its validation and the
factory; the after-training half (sizes, export, BN) is :mod:`.sizes`.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections import defaultdict
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..._validation import check_choice, check_float, check_int
from .lowrank_autograd import check_lam, combine_gradients, thin_svd, truncated_svd_reconstruct
from .rank_selection import check_alphas, sample_keep_ratio
from ...ranks import global_rank_selection, uniform_rank_selection
from .sizes import (CRITERIA, RANK_RULES, SCHEMES, _FLOOR_MODE, _SV_CRITERION, AnySizeExport, DNLayer,  # noqa: F401
                    _AnyRank, recalibrate_bn)
from ...compressor import Compressor, FitContext
from ...distributed import broadcast_ as _broadcast_, world_size as _world_size
from ...specs import Constrain, SpecError, resolve, unwrap
from ...views import get_view
from ...training import Amp, tree_detach

__all__ = ["decomposable_net", "DecomposableNetSolver", "DNLayer", "recalibrate_bn"]

log = logging.getLogger(__name__)



# ============================================================================ the solver
class DecomposableNetSolver(AnySizeExport, Compressor):
    r"""The general :class:`~admm_compress.Solver` configured as Decomposable-Net.

    :meth:`backward` implements Eq. (1) with the truncated-SVD backward of App. A and the
    gradient balancing of Eq. (12); :meth:`penalty` is 0, there are no ``Z``/``U``,
    :meth:`update` and :meth:`finalize` leave the weights alone (the trained model is
    full-rank); :meth:`export` builds a compact model of any size.  Build it with
    :func:`decomposable_net`.

    Parameters
    ----------
    spec : Constrain or list of Constrain
        Selects the decomposed layers (``nn.Linear`` / ``nn.Conv2d`` with ``groups=1``).
    rank_ratio : (alpha_l, alpha_u)
        Range of the rank ratio :math:`Z \sim \mathcal U(\alpha_l, \alpha_u)`,
        :math:`0 < \alpha_l < \alpha_u \le 1` (Algorithm 1).
    lam : float in [0, 1]
        :math:`\lambda` of Eq. (1).  ``0`` is normal training (no SVD is computed).
    criterion : {"global", "uniform", "energy"}
        Rank selection for training and export (Sec. 2.3, Fig. 2(c)).
    scheme : {"channel", "spatial"} or mapping glob -> scheme
        Conv matrix view, per layer: the first glob (insertion order) matching the module name
        wins; unmatched convs use ``"channel"`` (a ``"*"`` key sets another default).
    min_rank : int >= 1
        Per-layer floor ``min(min_rank, R_l)`` (not used by ``rank_rule="paper"``).
    rank_rule : {"official", "paper", "reserve"}
        Floor rule of the global selection (module docstring): the official code's clip, the
        paper's no-floor rule, or ours (reserve the floors, fill the rest).
    export_ratio : float in (0, 1], optional
        The configured export size :math:`Z` of :meth:`export_spec` / :meth:`export` without a
        target (default: ``alpha_u``, the largest size trained).
    clip : float in (0, 1)
        :math:`\delta^2`: the squared singular-value ratio is clipped at ``clip`` in the backward
        pass (paper: :math:`\delta = \sqrt{0.99}`, i.e. ``clip = 0.99``).
    rescale : bool
        Eq. (12) gradient-norm balancing of the decomposed weights (default on).
    seed : int, optional
        Seed of the generator that draws :math:`Z` (saved in :meth:`state_dict`); default: the
        global torch RNG.
    """

    # fine-tuning continues the joint objective (Eq. 1) at lr / 10 on the full-rank weights: the
    # model is exported at any size afterwards, so there is no structure to freeze (see
    # finetune_structure), and plain fine-tuning would train only the full-rank path
    finetune_objective = True
    plain_gradient = False  # Eq. 12 combines the full- and low-rank gradients by hand

    def __init__(self, spec, *, rank_ratio=(0.01, 0.25), lam: float = 0.5, criterion: str = "global",
                 scheme: str | Mapping[str, str] = "channel", min_rank: int = 5, clip: float = 0.99,
                 rescale: bool = True, seed: int | None = None, rank_rule: str = "official",
                 export_ratio: float | None = None):
        alpha_l, alpha_u = _check_rank_ratio(rank_ratio)
        lam = _check_lam(lam)
        check_choice("criterion", criterion, CRITERIA, where="decomposable_net")
        self.rank_rule = check_choice("rank_rule", rank_rule, RANK_RULES, where="decomposable_net")
        self.export_ratio = alpha_u if export_ratio is None else check_float(
            "export_ratio", export_ratio, low=0.0, high=1.0, low_open=True, where="decomposable_net")
        scheme = _check_scheme(scheme)
        min_rank = check_int("min_rank", min_rank, low=1, where="decomposable_net")
        clip = check_float("clip", clip, low=0.0, high=1.0, low_open=True, high_open=True,
                           where="decomposable_net")
        if not isinstance(rescale, bool):
            raise TypeError(f"decomposable_net: rescale must be a bool, got {rescale!r}")
        if seed is not None:
            seed = check_int("seed", seed, low=0, where="decomposable_net")
        super().__init__(spec)
        self.alpha_l, self.alpha_u = alpha_l, alpha_u
        self.lam = lam
        self.criterion = criterion
        self.scheme = scheme
        self.min_rank = min_rank
        self.clip = clip
        self.rescale = rescale
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.layers: list[DNLayer] = []
        self.last: dict = {}
        self.epoch_stats: list[dict] = []
        self._acc: list[tuple] = []
        self._fit_loader = None

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module) -> "DecomposableNetSolver":
        """Resolve the spec on ``model`` and check every selected layer (raises before any work)."""
        layers = self._layers_for(model)       # validates before the base class binds anything
        super().prepare(model)
        self.layers = layers
        self.last, self._acc = {}, []
        total = sum(L.full_rank for L in layers)
        floors = sum(L.floor for L in layers)
        log.info("Decomposable-Net: %d layer(s), sum R_l = %d bases, floors keep %d (%.3f); "
                 "Z ~ U(%g, %g), lam=%g, criterion=%s", len(layers), total, floors, floors / total,
                 self.alpha_l, self.alpha_u, self.lam, self.criterion)
        if self.alpha_l * total < floors:
            log.info("rank ratios below %.4f are raised to the per-layer floors (min_rank=%d)",
                     floors / total, self.min_rank)
        return self

    def _scheme_of(self, name: str, module: nn.Module) -> str:
        if isinstance(module, nn.Linear):
            return "channel"
        if isinstance(self.scheme, str):
            s = self.scheme
        else:
            s = next((v for g, v in self.scheme.items() if g != "*" and fnmatch.fnmatchcase(name, g)),
                     self.scheme.get("*", "channel"))
        if tuple(module.weight.shape[-2:]) == (1, 1):
            return "channel"  # 1 x 1 kernels: channel-wise (Sec. 4); both views coincide
        return s

    def _layers_for(self, model: nn.Module) -> list[DNLayer]:
        """The decomposed layers of ``model`` (the prepared ones if it is the prepared model)."""
        net = unwrap(model)
        if self.layers and net is self._model_ref:
            return self.layers
        bindings = resolve(self.spec, net, warn=True)
        layers = []
        for b in bindings:
            m, where = b.module, f"decomposable_net: layer '{b.name}'"
            if b.param_name != "weight":
                raise SpecError(f"{where}: only 'weight' parameters can be decomposed, got '{b.param_name}'")
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise SpecError(f"{where}: {type(m).__name__} cannot be decomposed; Decomposable-Net "
                                f"handles nn.Linear and nn.Conv2d (use exclude= to leave it dense)")
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise SpecError(f"{where}: grouped convolution (groups={m.groups}) cannot be decomposed; "
                                f"exclude it (exclude=['{b.name}'])")
            scheme = self._scheme_of(b.name, m)
            view = get_view("matrix" if isinstance(m, nn.Linear) else scheme)
            mshape = tuple(view.viewed_shape(tuple(m.weight.shape)))
            R = min(mshape)
            floor = 0 if self.rank_rule == "paper" else min(self.min_rank, R)
            layers.append(DNLayer(b.name, m, scheme, mshape, R, floor))
        if isinstance(self.scheme, Mapping):
            convs = [L.name for L in layers if isinstance(L.module, nn.Conv2d)]
            for g in self.scheme:
                if g != "*" and not any(fnmatch.fnmatchcase(n, g) for n in convs):
                    raise SpecError(f"decomposable_net: scheme glob {g!r} matches no decomposed conv "
                                    f"layer; conv layers are: {', '.join(convs[:8])}"
                                    + (", ..." if len(convs) > 8 else ""))
        return layers

    # ------------------------------------------------------- SVD and rank selection
    @staticmethod
    def _svds(layers: Sequence[DNLayer]) -> list:
        """Thin SVD of every layer's view (detached), batched over layers of equal view shape."""
        out: list = [None] * len(layers)
        groups: dict = defaultdict(list)
        for i, L in enumerate(layers):
            mat = L.view.to(L.weight.detach())
            groups[(tuple(mat.shape), mat.dtype, mat.device)].append((i, mat))
        for items in groups.values():
            U, S, Vh = thin_svd(torch.stack([m for _, m in items]))
            for j, (i, _) in enumerate(items):
                out[i] = (U[j], S[j], Vh[j])
        return out

    def _select(self, layers: Sequence[DNLayer], svals: Sequence[torch.Tensor], keep_ratio: float) -> list[int]:
        """Ranks keeping the fraction ``keep_ratio`` of ``sum R_l`` by the solver's criterion."""
        if self.criterion == "uniform":
            return uniform_rank_selection([L.full_rank for L in layers], keep_ratio, self.min_rank)
        return global_rank_selection(list(svals), keep_ratio=keep_ratio, min_rank=self.min_rank,
                                     criterion=_SV_CRITERION[self.criterion],
                                     floor_mode=_FLOOR_MODE[self.rank_rule])

    def low_rank_weight(self, layer: DNLayer, weight: torch.Tensor, rank: int, svd=None) -> torch.Tensor:
        r"""Differentiable :math:`\widetilde W = P_r(W)` in ``layer``'s view, back in weight shape."""
        view = layer.view
        wr = truncated_svd_reconstruct(view.to(weight), rank, self.clip, svd=svd)
        return view.back(wr, tuple(weight.shape))

    # ------------------------------------------------------------------- training
    def backward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 loss_fn: Callable, amp: Amp | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Gradient of Eq. (1) with Eq. (12) balancing, accumulated into ``.grad``.

        Returns ``(joint loss, full-rank outputs)``, detached.  Sets :attr:`last` to
        ``{"keep_ratio", "ranks", "loss_full", "loss_low"}`` of this step.  Weights and BN
        running statistics are only touched by the full-rank pass (the low-rank pass runs on
        clones of the buffers).  Cost: two forward/backward passes plus one thin SVD per layer.
        """
        self._require_prepared()
        amp = amp if amp is not None else Amp(None)
        net = unwrap(model)
        if self.lam == 0.0:  # normal learning
            with amp.autocast():
                out = model(inputs)
                loss = amp.loss(loss_fn(out, targets))
            amp.backward(loss)
            self.last = {"keep_ratio": 1.0, "ranks": None, "loss_full": loss.detach(), "loss_low": None}
            return loss.detach(), tree_detach(out)
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if ddp and model.broadcast_buffers:  # what DDP's forward would do
            _broadcast_(list(net.buffers()))
        # full-rank network (the bare module under DDP: the gradients are averaged below, as
        # torch.autograd.grad does not trigger DDP's reducer)
        # float16 autocast: both losses are multiplied by the GradScaler's one scale s; Eq. (12) and
        # the mean over ranks are homogeneous of degree 1 in the gradients, so the combined
        # gradient is s times the unscaled one and scaler.step unscales it (and skips on inf)
        with amp.autocast():
            out_full = (net if ddp else model)(inputs)
            loss_full = amp.loss(loss_fn(out_full, targets))
        g_full = torch.autograd.grad(amp.scale(loss_full), params, allow_unused=True)
        # sampled low-rank network (Algorithm 1, lines 3-5)
        layers = self.layers
        svds = self._svds(layers)
        z = sample_keep_ratio(self.alpha_l, self.alpha_u, generator=self._gen)
        ranks = self._select(layers, [s[1] for s in svds], z)
        subst = {n: b.clone() for n, b in net.named_buffers()}
        for L, r, svd in zip(layers, ranks, svds):
            if r < L.full_rank:
                subst[L.key] = self.low_rank_weight(L, L.weight, r, svd)
        with amp.autocast():
            out_low = functional_call(net, subst, (inputs,))
            loss_low = amp.loss(loss_fn(out_low, targets))
        g_low = torch.autograd.grad(amp.scale(loss_low), params, allow_unused=True)
        # Eq. (1) with the balancing of Eq. (12) on the decomposed weights
        decomposed = {L.key for L in layers}
        lam = self.lam
        world = _world_size()
        if world > 1:
            # the global-batch gradients of both passes first (one all-reduce of both, flattened),
            # then Eq. (12): the same step as one process over the global batch, not the mean of
            # per-rank balanced gradients (the balancing is not linear)
            g_full, g_low = self._all_reduce_mean(params, g_full, g_low, world)
        for (name, p), gf, gl in zip(named, g_full, g_low):
            if gf is None and gl is None:
                continue
            gf = torch.zeros_like(p) if gf is None else gf
            gl = torch.zeros_like(p) if gl is None else gl
            if name in decomposed:
                g = combine_gradients(gf, gl, lam, rescale=self.rescale)
            else:
                g = (1.0 - lam) * gf + lam * gl
            p.grad = g if p.grad is None else p.grad + g
        loss = ((1.0 - lam) * loss_full + lam * loss_low).detach()
        self.last = {"keep_ratio": z, "ranks": {L.name: r for L, r in zip(layers, ranks)},
                     "loss_full": loss_full.detach(), "loss_low": loss_low.detach()}
        self._acc.append((z, loss_full.detach(), loss_low.detach()))
        log.debug("Decomposable-Net step: Z=%.4f, kept %d of %d bases", z, sum(ranks),
                  sum(L.full_rank for L in layers))
        return loss, tree_detach(out_full)

    @staticmethod
    @torch.no_grad()
    def _all_reduce_mean(params, g_full, g_low, world: int):
        """Mean over ranks of both gradient lists (``None`` entries join as zeros, stay ``None``
        only if they are ``None`` on this rank for both passes and zero after the reduction)."""
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for grads in (g_full, g_low) for p, g in zip(params, grads)])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        out, i = ([], []), 0
        for k in range(2):
            for p in params:
                out[k].append(flat[i:i + p.numel()].view_as(p))
                i += p.numel()
        return out

    def epoch_end(self) -> bool:
        """Counts the epoch and summarizes it (:meth:`update`); nothing is projected."""
        super().epoch_end()
        self.update()
        return True

    @torch.no_grad()
    def update(self) -> dict:
        """No projection (the weights stay full-rank); summarizes the epoch in :attr:`epoch_stats`."""
        self._require_prepared()
        rec = {"step": self.steps, "epoch": self.epochs_done}
        if self._acc:
            rec["keep_ratio"] = sum(a[0] for a in self._acc) / len(self._acc)
            rec["loss_full"] = float(torch.stack([a[1] for a in self._acc]).mean())
            rec["loss_low"] = float(torch.stack([a[2] for a in self._acc]).mean())
            log.info("Decomposable-Net epoch %d: mean Z=%.3f, loss full=%.4g, low-rank=%.4g",
                     self.epochs_done, rec["keep_ratio"], rec["loss_full"], rec["loss_low"])
        self._acc = []
        self.epoch_stats.append(rec)
        self.n_updates += 1
        return rec

    def repr_fields(self) -> str:
        return (f"rank_ratio=({self.alpha_l:g}, {self.alpha_u:g}), lam={self.lam:g}, "
                f"criterion={self.criterion!r}, rank_rule={self.rank_rule!r}, specs={len(self.spec)}")

    def finalize(self, model: nn.Module | None = None) -> dict[str, bool]:
        """Nothing to enforce: the trained model is full-rank and exportable at any size."""
        return super().finalize(model)

    def state_dict(self) -> dict:
        """Base state plus the generator of ``Z`` and the epoch summaries."""
        sd = super().state_dict()
        sd["decomposable_net"] = {"generator": None if self._gen is None else self._gen.get_state(),
                                  "epoch_stats": list(self.epoch_stats)}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        extra = sd.get("decomposable_net", {})
        if extra.get("generator") is not None:
            if self._gen is None:
                self._gen = torch.Generator()
            self._gen.set_state(extra["generator"])
        self.epoch_stats = list(extra.get("epoch_stats", []))


    # ------------------------------------------------------------ trainer hooks
    def on_fit_start(self, run: FitContext) -> None:
        """Keep the training loader for the BN statistics of :meth:`export`."""
        self._fit_loader = run.loader

    @contextlib.contextmanager
    def finetune_structure(self, model: nn.Module):
        """Nothing to freeze: fine-tuning continues Eq. 1 on the full-rank weights."""
        yield

    @staticmethod
    def paper_sgd(params, lr: float) -> torch.optim.SGD:
        """SGD with Nesterov momentum 0.9 and L2 ``5e-4`` on weight tensors (``dim >= 2``) only,
        none on biases and BatchNorm ``gamma, beta`` (Table 3; the official code)."""
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        return torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                               lr=lr, momentum=0.9, nesterov=True)

    def default_optimizer(self, model, lr):
        """:meth:`paper_sgd` (Nesterov, L2 on weight tensors only)."""
        return self.paper_sgd(model.parameters(), lr)

    def default_finetune_optimizer(self, model, lr):
        """:meth:`paper_sgd` at ``lr / 10``."""
        return self.paper_sgd(model.parameters(), lr / 10)


# ============================================================================ validation
def _check_rank_ratio(rank_ratio):
    if isinstance(rank_ratio, (str, bytes)) or not isinstance(rank_ratio, Sequence) or len(rank_ratio) != 2:
        raise TypeError(f"decomposable_net: rank_ratio must be a pair (alpha_l, alpha_u) with "
                        f"0 < alpha_l < alpha_u <= 1, got {rank_ratio!r}")
    try:
        return check_alphas(*rank_ratio)
    except ValueError as e:
        raise ValueError(f"decomposable_net: rank_ratio={tuple(rank_ratio)!r}: {e}") from None


def _check_lam(lam):
    try:
        return check_lam(lam)
    except ValueError as e:
        raise ValueError(f"decomposable_net: {e} (Eq. 1 balances the full- and low-rank losses)") from None


def _check_scheme(scheme):
    if isinstance(scheme, str):
        return check_choice("scheme", scheme, SCHEMES, where="decomposable_net")
    if not isinstance(scheme, Mapping) or not scheme:
        raise TypeError(f"decomposable_net: scheme must be 'channel', 'spatial' or a non-empty mapping "
                        f"{{module-name glob: scheme}}, got {scheme!r}")
    out = {}
    for g, s in scheme.items():
        if not isinstance(g, str):
            raise TypeError(f"decomposable_net: scheme keys must be module-name globs (str), got {g!r}")
        out[g] = check_choice(f"scheme[{g!r}]", s, SCHEMES, where="decomposable_net")
    return out


# ============================================================================== factory
def decomposable_net(rank_ratio=(0.01, 0.25), lam: float = 0.5, criterion: str = "global",
                     scheme: str | Mapping[str, str] = "channel", min_rank: int = 5, clip: float = 0.99,
                     targets=(nn.Conv2d, nn.Linear), exclude=None, *, rescale: bool = True,
                     seed: int | None = None, rank_rule: str = "official",
                     export_ratio: float | None = None) -> DecomposableNetSolver:
    r"""A :class:`DecomposableNetSolver`: joint full/low-rank training, any size exportable.

    Parameters
    ----------
    rank_ratio : (alpha_l, alpha_u)
        :math:`Z \sim \mathcal U(\alpha_l, \alpha_u)` per step, :math:`0 < \alpha_l < \alpha_u
        \le 1` (paper: ``(0.01, 0.25)`` CIFAR-10, ``(0.01, 0.5)`` CIFAR-100, ``(0.01, 0.8)``
        ImageNet).
    lam : float in [0, 1]
        :math:`\lambda` of Eq. (1) (paper: 0.5).
    criterion : {"global", "uniform", "energy"}
        Rank selection: pooled raw singular values (Sec. 2.3), or the "uni" / "eng" baselines of
        Fig. 2(c) (energy scores compared globally, so sizes match).
    scheme : {"channel", "spatial"} or mapping glob -> scheme
        Conv decomposition, per layer (1 x 1 convs and linear layers: channel-wise).
    min_rank : int >= 1
        Per-layer floor ``min(min_rank, R_l)`` (official code: 5; unused by ``rank_rule="paper"``).
    rank_rule : {"official", "paper", "reserve"}
        ``"official"``: top ``round(Z N)`` bases, then ranks raised to the floor (official code);
        ``"paper"``: Sec. 2.3, no floor, rank 0 possible (the layer's output is its bias);
        ``"reserve"``: ours, floors reserved and the rest filled from the global order.
    export_ratio : float in (0, 1], optional
        Size of :meth:`~DecomposableNetSolver.export_spec` / ``export`` without a target
        (default ``alpha_u``).
    clip : float in (0, 1)
        :math:`\delta^2` of App. A (``0.99``, i.e. :math:`\delta = \sqrt{0.99}`).
    targets : module type(s), glob or predicate
        Layers decomposed; every ``Conv2d`` and ``Linear`` by default (Sec. 2.1).
    exclude : glob or list of globs
        Layers left dense.
    rescale : bool
        Eq. (12) gradient balancing.
    seed : int, optional
        Seed of the ``Z`` generator.

    Raises
    ------
    ValueError, TypeError
        Bad arguments (``alpha_l >= alpha_u``, ``lam`` outside [0, 1], ...), at construction.
    """
    solver_kwargs = dict(rank_ratio=rank_ratio, lam=lam, criterion=criterion, scheme=scheme,
                         min_rank=min_rank, clip=clip, rescale=rescale, seed=seed, rank_rule=rank_rule,
                         export_ratio=export_ratio)
    _check_rank_ratio(rank_ratio)
    _check_lam(lam)
    label = (f"Decomposable-Net r_l sampled by {criterion} ({rank_rule} rule), Z~U{tuple(rank_ratio)}, "
             f"min_rank={min_rank}")
    spec = Constrain(targets, _AnyRank(label), view="auto", exclude=exclude, name="decomposable_net",
                     skip_unexportable=targets == (nn.Conv2d, nn.Linear))
    return DecomposableNetSolver(spec, **solver_kwargs)
