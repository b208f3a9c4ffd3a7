"""TRP: trained rank pruning (Xu et al., IJCAI 2019) — the baseline LRPET and others compare to.

Projected SGD like LRPET but with TRP's rank rule and regularizer:

* every ``T`` iterations, before the next forward pass, each weight is replaced by its truncated
  SVD keeping the smallest rank ``k`` with ``sum_{i<=k} s_i^2 >= e * sum_i s_i^2`` (``e = 0.9``),
  i.e. :class:`~admm_compress.LowRank` with ``energy=e``;
* on the same iterations the nuclear-norm subgradient ``lam * U_k V_k^T`` is added to the weight's
  gradient (realized as the surrogate ``lam * <W, stopgrad(U_k V_k^T)>`` in
  :meth:`TRPSolver.penalty`, whose gradient is exactly that).
"""
from __future__ import annotations

import torch
from torch import nn

from .._validation import check_float
from .. import functional as F
from ..sets import LowRank
from ..solver import Solver
from ..specs import Constrain

__all__ = ["trp", "TRPSolver"]


def _numerical_rank(s: torch.Tensor, v: torch.Tensor) -> int:
    """Number of singular values above ``max(m, n) * eps(dtype of v) * s_max`` (max over a batch)."""
    tol = s.max(-1, keepdim=True).values * max(v.shape[-2:]) * torch.finfo(v.dtype).eps
    return max(1, int((s > tol).sum(-1).max()))


class TRPSolver(Solver):
    """Projected SGD with the energy rank rule plus the nuclear-norm subgradient."""

    def __init__(self, spec, *, nuclear_weight: float = 3e-4, every=20):
        super().__init__(spec, mode="projection", every=every)
        self.nuclear_weight = check_float("nuclear_weight", nuclear_weight, low=0.0, where="trp")
        self._subgrad: dict[str, torch.Tensor] = {}
        self._fresh = False

    @torch.no_grad()
    def update(self) -> dict:
        rec = super().update()
        self._subgrad = {}
        if self.nuclear_weight > 0:
            for sl in self.slots:
                v = sl.to_view(sl.tensor().detach())
                U, S, Vh = F.svd(v.to(torch.float64))
                k = _numerical_rank(S, v)  # the rank the energy rule just kept
                self._subgrad[sl.key] = sl.from_view((U[..., :k] @ Vh[..., :k, :]).to(v.dtype))
        self._fresh = True
        return rec

    def step(self) -> bool:
        ran = super().step()
        if not ran:
            self._fresh = False  # the subgradient applies to the iteration right after a truncation
        return ran

    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None) -> dict[str, bool]:
        """The last energy truncation, then record the kept rank of every layer.

        The energy rule is a rank-*selection* rule, not a projection: applied again to an
        already truncated weight it would keep fewer singular values.  :meth:`export_spec`
        therefore pins the ranks chosen here, so the exported model equals the finalized one.
        """
        super().finalize(model)
        self.final_ranks = {}
        for sl in self.slots:
            v = sl.to_view(sl.tensor().detach())
            self.final_ranks[sl.key] = _numerical_rank(F.svdvals(v.to(torch.float64)), v)
        return {sl.key: True for sl in self.slots}

    def _feasible(self, sl, v: torch.Tensor) -> bool:
        # the energy criterion picks a rank from the data; applied again to the truncated
        # weight it would keep fewer values, so contains() says nothing here (see LowRank)
        return True

    def export_spec(self) -> list[Constrain]:
        """One ``LowRank(rank=k)`` spec per layer with the ranks kept by :meth:`finalize`."""
        if not getattr(self, "final_ranks", None):
            raise RuntimeError("TRPSolver.export_spec: call finalize(model) (or fit) first")
        return [Constrain(sl.binding.name, LowRank(rank=self.final_ranks[sl.key]), view=sl.binding.spec.view,
                          name=f"trp:{sl.binding.name}") for sl in self.slots]

    def export(self, model: nn.Module, inplace: bool = False) -> nn.Module:
        """:func:`admm_compress.export` with :meth:`export_spec`."""
        from ..export import export

        return export(model, self.export_spec(), inplace=inplace)

    def penalty(self) -> torch.Tensor:
        self._require_prepared()
        total = self.bindings[0].param.new_zeros(())
        if self._fresh and self._subgrad:
            for sl in self.slots:
                total = total + self.nuclear_weight * (sl.tensor() * self._subgrad[sl.key]).sum()
        return total


def trp(energy: float = 0.9, nuclear_weight: float = 3e-4, every: int = 20, *, targets=nn.Conv2d,
        include_linear: bool = False, view: str = "channel", exclude=None) -> TRPSolver:
    """A :class:`TRPSolver`: energy-threshold truncation every ``every`` iterations + nuclear subgradient.

    Parameters
    ----------
    energy : float in (0, 1]
        Fraction of ``sum sigma^2`` kept (TRP: 0.9).
    nuclear_weight : float >= 0
        ``lam`` of the subgradient ``lam * U_k V_k^T``.
    every : int
        ``T`` (iterations between truncations).
    view : {"channel", "spatial"}
        TRP decomposes channel-wise or spatial-wise.
    """
    e = check_float("energy", energy, low=0.0, high=1.0, low_open=True, where="trp")
    spec = [Constrain(targets, LowRank(energy=e), view=view, exclude=exclude, name="trp:conv",
                      skip_unexportable=targets is nn.Conv2d)]
    if include_linear:
        spec.append(Constrain(nn.Linear, LowRank(energy=e), exclude=exclude, name="trp:linear",
                              skip_unexportable=True))
    return TRPSolver(spec, nuclear_weight=nuclear_weight, every=every)
