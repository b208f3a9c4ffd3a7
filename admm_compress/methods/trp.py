"""TRP: trained rank pruning (Xu et al., IJCAI 2019) — the baseline LRPET and others compare to.

Projected SGD like LRPET but with TRP's rank rule and regularizer.  The defaults of :func:`trp`
are the configuration of the official release (``cifar-TRP.py``):

* before every iteration's forward pass (``every=1``) each convolution is replaced by its
  truncated SVD keeping the smallest rank ``k`` with
  ``sum_{i<=k} s_i^2 >= e * sum_i s_i^2`` (``e = 0.99``), i.e. :class:`~admm_compress.LowRank`
  with ``energy=e``;
* the matrix is TRP's spatial "VH" view (:class:`VHView`): the weight ``(O, I, kh, kw)``
  permuted to ``(I, kh, O, kw)`` and reshaped to ``(I*kh, O*kw)``; a rank-``k`` layer exports
  as a ``kh x 1`` conv ``I -> k`` followed by a ``1 x kw`` conv ``k -> O``;
* the stem (the model's first ``Conv2d``) and ``1 x 1`` convolutions are left dense;
* the nuclear-norm subgradient ``lam * U_k V_k^T`` (``lam = 3e-4``; the paper's "TRP+Nu", a
  commented-out line of the release) is added to every conv's gradient on **every** iteration,
  realized as the surrogate ``lam * <W, stopgrad(U_k V_k^T)>`` in :meth:`TRPSolver.penalty`,
  whose gradient is exactly that.  ``U_k, V_k`` are the singular vectors of the current weight
  over its numerical rank: right after a truncation they are those the truncation kept.

Our order differs from the release in one place: the truncation runs after the optimizer step
(:meth:`Solver.step`), so only the very first forward pass sees the untruncated weight.

The energy rule picks the rank from the data; every truncation's ranks are recorded in
:attr:`TRPSolver.rank_history`, and :meth:`TRPSolver.finalize` pins the last ones, so
fine-tuning and export keep exactly the finalized ranks.
"""
from __future__ import annotations

import dataclasses

import logging

import torch
from torch import nn

from .._validation import check_choice, check_float, where_prefix
from .. import functional as F
from ..export import register_exporter
from ..export._common import bias_of, explicit_padding, factory
from ..sets import LowRank, SchattenP
from ..solver import Solver
from ..specs import Constrain, exact_glob, resolve, unwrap
from ..views import View

__all__ = ["trp", "TRPSolver", "VHView"]

log = logging.getLogger(__name__)


class VHView(View):
    """TRP's spatial "VH" view: Conv2d ``(O, I, kh, kw)`` -> ``(I, kh, O, kw)`` -> ``(I*kh, O*kw)``.

    The orientation of the official ``cifar-TRP.py``.  A rank-``r`` factorization ``A B``
    (``A: (I*kh, r)``, ``B: (r, O*kw)``) is a ``kh x 1`` convolution ``I -> r`` (``A`` reshaped
    to ``(I, kh, r)`` and permuted to ``(r, I, kh, 1)``) followed by a ``1 x kw`` convolution
    ``r -> O`` (``B`` reshaped to ``(r, O, kw)`` and permuted to ``(O, r, 1, kw)``).  It differs
    from the library's ``"spatial"`` view ``(O*kh, I*kw)``, which pairs ``kh`` with the output
    channels (a ``1 x kw`` conv first): the two matricizations have different spectra.

    A 2-D weight (``nn.Linear``) is seen as is, ``(out, in)``, so one spec can cover both.
    """

    name = "vh"

    def check(self, shape, where=None):
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 4):
            pre = where_prefix(where)
            raise ValueError(f"{pre}view 'vh' needs a Conv2d weight (O, I, kh, kw) or a 2-D "
                             f"weight, got shape {shape} ({len(shape)}-D)")

    def viewed_shape(self, shape):
        self.check(shape)
        if len(shape) == 2:
            return tuple(int(s) for s in shape)
        O, I, kh, kw = (int(s) for s in shape)
        return (I * kh, O * kw)

    def to(self, w):
        self.check(w.shape)
        if w.dim() == 2:
            return w
        O, I, kh, kw = w.shape
        return w.permute(1, 2, 0, 3).reshape(I * kh, O * kw)

    def back(self, t, shape):
        self.check(shape)
        if len(shape) == 2:
            return t.reshape(tuple(int(s) for s in shape))
        O, I, kh, kw = (int(s) for s in shape)
        return t.reshape(I, kh, O, kw).permute(2, 0, 1, 3).contiguous()


def _is_vh_lowrank(c, v) -> bool:
    return isinstance(v, VHView) and isinstance(c, (LowRank, SchattenP))


def _export_vh(m: nn.Module, c, v, factors, with_bias: bool):
    """``kh x 1`` conv ``I -> r`` (vertical stride/padding) -> ``1 x kw`` conv ``r -> O`` (bias)."""
    from ..export import ExportError
    from ..export.lowrank import export_lowrank
    from ..views import VIEWS

    if isinstance(m, nn.Linear):  # a 2-D weight is seen as (out, in): the ordinary split
        return export_lowrank(m, c, VIEWS["matrix"], factors, with_bias)
    if not isinstance(m, nn.Conv2d) or m.groups != 1:
        raise ExportError(f"view 'vh' exports an ordinary nn.Conv2d (groups=1), got {type(m).__name__}"
                          + (f" with groups={m.groups}" if isinstance(m, nn.Conv2d) else ""))
    A, B = factors  # (I*kh, r), (r, O*kw)
    r = A.shape[-1]
    rows, cols = A.shape[-2], B.shape[-1]
    if r == 0:
        r, A, B = 1, A.new_zeros(rows, 1), B.new_zeros(1, cols)
    if r * (rows + cols) >= rows * cols or m.padding_mode != "zeros":
        return None
    pad = explicit_padding(m)
    if pad is None:
        return None
    out_c, in_c = m.out_channels, m.in_channels
    kh, kw = m.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = m.stride, m.dilation, pad
    bias = bias_of(m, with_bias)
    fk = factory(m)
    first = nn.Conv2d(in_c, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=False, **fk)
    second = nn.Conv2d(r, out_c, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                       bias=bias is not None, **fk)
    with torch.no_grad():
        first.weight.copy_(A.reshape(in_c, kh, r).permute(2, 0, 1).unsqueeze(-1))
        second.weight.copy_(B.reshape(r, out_c, kw).permute(1, 0, 2).unsqueeze(2))
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)


register_exporter(_is_vh_lowrank, _export_vh)


def _numerical_rank(s: torch.Tensor, v: torch.Tensor) -> int:
    """Number of singular values above ``max(m, n) * eps(dtype of v) * s_max`` (max over a batch)."""
    return F.numerical_rank_of(s, v.shape, v.dtype)


def _nuclear_subgradient(v: torch.Tensor) -> torch.Tensor:
    """``U_k V_k^T`` over the numerical rank ``k`` of ``v`` (a subgradient of ``||v||_*``)."""
    U, S, Vh = F.svd(v.to(torch.float64))
    k = _numerical_rank(S, v)
    return (U[..., :k] @ Vh[..., :k, :]).to(v.dtype)


class TRPSolver(Solver):
    """Projected SGD with the energy rank rule plus the nuclear-norm subgradient.

    Parameters
    ----------
    spec : Constrain or list of Constrain
        Usually ``LowRank(energy=e)`` specs (built by :func:`trp`).
    nuclear_weight : float >= 0
        ``lam`` of the subgradient ``lam * U_k V_k^T``, added on every iteration.
    every : int or "epoch"
        Iterations between truncations (the release: 1).
    skip_stem : bool
        Leave the model's first ``nn.Conv2d`` (in module registration order) dense, as the
        release does; resolved at :meth:`prepare`.
    skip_1x1 : bool
        Leave ``1 x 1`` convolutions dense, as the release does.

    Attributes
    ----------
    rank_history : list of dict
        One ``{weight key: kept rank}`` per truncation (the last entry is :meth:`finalize`'s).
    final_ranks : dict
        The ranks pinned by :meth:`finalize`.
    replay : list of dict or None
        Set to another run's :attr:`rank_history` to truncate with its ranks instead of the
        energy rule (truncation ``t`` keeps ``replay[t][key]`` values; the energy rule again once
        the list is used up).  The energy rule is a discrete, data-dependent choice: two runs
        whose weights differ by rounding (another machine, another number of processes) can
        keep different ranks where the energy of a prefix lies within rounding of ``e``;
        replaying one run's ranks makes the two comparable.
    """

    def __init__(self, spec, *, nuclear_weight: float = 3e-4, every=1, skip_stem: bool = False,
                 skip_1x1: bool = False):
        super().__init__(spec, mode="projection", every=every)
        self.nuclear_weight = check_float("nuclear_weight", nuclear_weight, low=0.0, where="trp")
        for n, v in (("skip_stem", skip_stem), ("skip_1x1", skip_1x1)):
            if not isinstance(v, bool):
                raise TypeError(f"trp: {n} must be a bool, got {v!r}")
        self.skip_stem, self.skip_1x1 = skip_stem, skip_1x1
        self._user_spec = list(self.spec)
        self._subgrad: dict[str, torch.Tensor] = {}
        self._fresh = False
        self._kept: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self.rank_history: list[dict[str, int]] = []
        self.final_ranks: dict[str, int] = {}
        self.skipped: list[str] = []
        self.replay: list[dict[str, int]] | None = None

    # ------------------------------------------------------------ life cycle
    def prepare(self, model: nn.Module) -> "TRPSolver":
        """Resolve the spec without the stem / ``1 x 1`` convolutions, then :meth:`Solver.prepare`."""
        self.spec = list(self._user_spec)
        skip = []
        if self.skip_stem or self.skip_1x1:
            selected = {b.name for b in resolve(self.spec, model)}
            convs = [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, nn.Conv2d)]
            if self.skip_stem and convs and convs[0][0] in selected:
                skip.append(convs[0][0])
            if self.skip_1x1:
                skip += [n for n, m in convs if n in selected and tuple(m.kernel_size) == (1, 1)
                         and n not in skip]
        self.skipped = skip
        if skip:
            log.info("trp: left dense (stem / 1x1 convolutions, as the official release): %s", ", ".join(skip))
            globs = [exact_glob(n) for n in skip]
            spec = []
            for c in self.spec:
                ex = [c.exclude] if isinstance(c.exclude, str) else list(c.exclude or [])
                spec.append(dataclasses.replace(c, exclude=ex + globs))  # every other field kept
            self.spec = spec
        self._subgrad, self._fresh = {}, False
        self.rank_history, self.final_ranks = [], {}
        return super().prepare(model)

    def project_slot(self, sl, v: torch.Tensor, tau: float, metric=None, warm: bool = True) -> torch.Tensor:
        """The energy truncation from one SVD, which also gives the subgradient ``U_k V_k^T``."""
        c = sl.constraint
        if (not warm or metric is not None or not isinstance(c, LowRank) or c.energy is None
                or c.energy_transfer):
            out = super().project_slot(sl, v, tau, metric, warm)
            r = c.rank_for(v.shape) if isinstance(c, LowRank) else None
            self._kept[sl.key] = r if r is not None else _numerical_rank(F.svdvals(out.to(torch.float64)), out)
            return out
        U, s, Vh = F.svd(v)
        t = len(self.rank_history)
        if self.replay is not None and t < len(self.replay):   # the recorded run's choice
            k = torch.full(s.shape[:-1], int(self.replay[t][sl.key]), dtype=torch.long, device=s.device)
        else:
            k = F.energy_rank(s, c.energy, c.min_rank)                   # per matrix of the batch
        keep = (torch.arange(s.shape[-1], device=s.device) < k.unsqueeze(-1)).to(s.dtype)
        self._kept[sl.key] = int(k.max())
        self._pending[sl.key] = (U * keep.unsqueeze(-2)) @ Vh          # U_k V_k^T
        return ((U * (s * keep).unsqueeze(-2)) @ Vh).to(v.dtype)

    @torch.no_grad()
    def update(self) -> dict:
        """One energy truncation of every weight; records the kept ranks in :attr:`rank_history`."""
        self._kept, self._pending = {}, {}
        rec = super().update()
        self.rank_history.append(dict(self._kept))
        self._subgrad = {}
        if self.nuclear_weight > 0:
            for sl in self.slots:
                if sl.key in self._pending:
                    g = self._pending[sl.key].to(sl.tensor().dtype)
                else:  # skipped (skip_below) or a non-energy set: the current weight's subgradient
                    g = _nuclear_subgradient(sl.to_view(sl.tensor().detach()))
                self._subgrad[sl.key] = sl.from_view(g)
        self._fresh = True
        return rec

    def step(self) -> bool:
        ran = super().step()
        if not ran:
            self._fresh = False  # the weight moved since the last truncation: new subgradient
        return ran

    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None) -> dict[str, bool]:
        """The last energy truncation, then pin the kept rank of every layer.

        Right after a truncation (no optimizer step since, e.g. ``every=1`` at the end of
        training) the ranks of that truncation are kept as they are.

        The energy rule is a rank-*selection* rule, not a projection: applied again to an
        already truncated weight it would keep fewer singular values.  The ranks chosen here are
        recorded (:attr:`final_ranks`, last entry of :attr:`rank_history`) and every binding is
        re-pointed to ``LowRank(rank=k)``, so fine-tuning in factored form and
        :meth:`export_spec` keep exactly these ranks and the exported model equals the
        finalized one.
        """
        if self._fresh and self.rank_history and not self.final_ranks:
            # no optimizer step since the last truncation: keep its ranks (the rule applied to
            # its own output would cut further)
            self._pin(self.rank_history[-1])
        self._kept, self._pending = {}, {}
        super().finalize(model)
        self.rank_history.append(dict(self._kept))
        self._pin({sl.key: self._kept[sl.key] for sl in self.slots})
        return {sl.key: True for sl in self.slots}

    def _pin(self, ranks: dict[str, int]) -> None:
        self.final_ranks = dict(ranks)
        for b in self.bindings:
            if b.key in ranks:
                b.spec = Constrain(exact_glob(b.name), LowRank(rank=int(ranks[b.key])), view=b.view,
                                   param=b.param_name, name=f"trp:{b.name}")
        for sl in self.slots:
            sl.constraint = sl.binding.constraint

    def slot_feasible(self, sl, v: torch.Tensor) -> bool:
        # the energy criterion picks a rank from the data; applied again to the truncated
        # weight it would keep fewer values, so contains() says nothing here (see LowRank)
        return True

    def export_spec(self) -> list[Constrain]:
        """One ``LowRank(rank=k)`` spec per layer with the ranks kept by :meth:`finalize`."""
        if not self.final_ranks:
            raise RuntimeError("TRPSolver.export_spec: call finalize(model) (or fit) first")
        return [Constrain(exact_glob(sl.binding.name), LowRank(rank=self.final_ranks[sl.key]),
                          view=sl.binding.view, name=f"trp:{sl.binding.name}") for sl in self.slots]

    def export(self, model: nn.Module, inplace: bool = False) -> nn.Module:
        """:func:`admm_compress.export` with :meth:`export_spec`."""
        from ..export import export

        return export(model, self.export_spec(), inplace=inplace)

    def penalty(self) -> torch.Tensor:
        """``lam * <W, stopgrad(U_k V_k^T)>`` summed over the weights (gradient: the subgradient)."""
        self._require_prepared()
        total = self.bindings[0].param.new_zeros(())
        if self.nuclear_weight == 0 or self.final_ranks:
            return total
        for sl in self.slots:
            w = sl.tensor()
            if self._fresh and sl.key in self._subgrad:
                g = self._subgrad[sl.key]
            else:
                with torch.no_grad():
                    g = sl.from_view(_nuclear_subgradient(sl.to_view(w.detach())))
            total = total + self.nuclear_weight * (w * g).sum()
        return total

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rank_history"] = [dict(h) for h in self.rank_history]
        sd["final_ranks"] = dict(self.final_ranks)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.rank_history = [dict(h) for h in sd.get("rank_history", [])]
        if sd.get("final_ranks"):
            self._pin(sd["final_ranks"])

    def repr_fields(self) -> str:
        return (f"{super().repr_fields()}, nuclear_weight={self.nuclear_weight:g}, "
                f"skip_stem={self.skip_stem}, skip_1x1={self.skip_1x1}")


def trp(energy: float = 0.99, nuclear_weight: float = 3e-4, every: int = 1, *, targets=nn.Conv2d,
        include_linear: bool = False, view="vh", skip_stem: bool = True, skip_1x1: bool = True,
        exclude=None) -> TRPSolver:
    """A :class:`TRPSolver` with the configuration of TRP's official release (``cifar-TRP.py``).

    Parameters
    ----------
    energy : float in (0, 1]
        Fraction of ``sum sigma^2`` kept (release: 0.99).
    nuclear_weight : float >= 0
        ``lam`` of the subgradient ``lam * U_k V_k^T`` added every iteration (TRP+Nu: 3e-4;
        0 = plain TRP).
    every : int or "epoch"
        Iterations between truncations (release: 1, truncation before every forward pass).
    targets : module type(s), glob or predicate
        Layers truncated (every ``nn.Conv2d``).
    include_linear : bool
        Also truncate ``nn.Linear`` layers (``(out, in)`` view); the release does not.
    view : {"vh", "spatial", "channel"} or View
        ``"vh"``: TRP's spatial view ``(I*kh, O*kw)`` (:class:`VHView`, the release);
        ``"spatial"``: the library's ``(O*kh, I*kw)``; ``"channel"``: ``(O, I*kh*kw)``.
        ``"vh"`` sees a 2-D (``nn.Linear``) weight as ``(out, in)``; ``"spatial"`` needs
        ``nn.Conv2d`` targets.
    skip_stem, skip_1x1 : bool
        Leave the first ``nn.Conv2d`` and the ``1 x 1`` convolutions dense (release: both).
    exclude : glob or list of globs
        Further layers left dense.
    """
    e = check_float("energy", energy, low=0.0, high=1.0, low_open=True, where="trp")
    if isinstance(view, str):
        view = check_choice("view", view, ("vh", "spatial", "channel", "auto"), where="trp")
        view = VHView() if view == "vh" else view
    spec = [Constrain(targets, LowRank(energy=e), view=view, exclude=exclude, name="trp:conv",
                      skip_unexportable=targets is nn.Conv2d)]
    if include_linear:
        spec.append(Constrain(nn.Linear, LowRank(energy=e), exclude=exclude, name="trp:linear",
                              skip_unexportable=True))
    return TRPSolver(spec, nuclear_weight=nuclear_weight, every=every, skip_stem=skip_stem, skip_1x1=skip_1x1)
