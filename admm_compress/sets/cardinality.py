"""Tensors with few non-zero entries or few non-zero slices: :class:`Cardinality`."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import functional as F
from .._validation import check_float, check_int, where_prefix
from .base import ConstraintSet

__all__ = ["Cardinality", "joint_factors"]


class Cardinality(ConstraintSet):
    r"""Tensors with at most ``k`` non-zero entries (or ``k`` non-zero slices).

    Unstructured (``group_dim=None``): ``C_k = {X : card(X) <= k}`` over the **whole** tensor
    (not per row).  Structured (``group_dim=g``): ``C_k = {X : at most k of the slices
    X.select(g, i) are non-zero}``; with a weight viewed as ``(out, in, ...)``, ``g = 0``
    removes output filters / rows and ``g = 1`` input channels / columns.  Only the structured
    form removes whole rows or columns and so makes the FLOP drop real on dense hardware; the
    unstructured form saves storage only (sparse kernels aside).

    Parameters
    ----------
    k : int, optional
        Number of entries (unstructured) or slices (structured) kept, ``k >= 1``.
    density : float, optional
        Fraction in ``(0, 1]`` of entries (or slices) kept: ``k = max(1, round(density * count))``
        with Python's ``round`` (halves to even).
    group_dim : int, optional
        Dimension whose slices are the groups (negative values count from the end).
    scope : {"layer", "global"}, default "layer"
        ``"layer"``: every bound weight keeps its own ``k`` (``density`` of its entries).
        ``"global"``: one budget shared by **all** the weights bound to this set instance (every
        layer its :class:`~admm_compress.Constrain` selects, and those of any other spec given
        the same instance): ``C = {(X_1, ..., X_n) : card(X_1) + ... + card(X_n) <= k}`` with
        ``k = max(1, round(density * total entries))``, so each layer keeps what its entries'
        magnitudes earn (``torch.nn.utils.prune.global_unstructured``'s allocation).
        Unstructured and ``density=`` only; not inside a :class:`~admm_compress.Sum`.

    Exactly one of ``k`` and ``density`` must be given.  ``k`` equal to the count makes the
    projection the identity; ``k`` larger than the count raises ``ValueError`` (at
    :meth:`check_shape` / call time).

    Notes
    -----
    Projection (RASPA Eq. 12): keep the ``k`` entries of largest ``|x|`` (or the ``k`` slices of
    largest L2 norm) and zero the rest; ``||X - Pi(X)||_F^2`` is the energy of what is removed,
    which is minimal.  Ties are broken deterministically towards the lower (flat) index, and
    exactly ``k`` entries (slices) are kept, also when some of them are zero.  Cost ``O(numel)``
    (``torch.topk`` for the threshold plus one cumulative count).

    The factored form stores the kept values; :meth:`num_params` counts the values only (``k``
    or ``k * slice size``) and not their indices, as the papers do.

    ``scope="global"``: the projection of the tuple keeps the ``k`` largest ``|x|`` over all its
    tensors together (:func:`~admm_compress.functional.joint_topk_masks`, ties to the earlier
    tensor, then the lower flat index); the ADMM Z-step with per-weight ``rho_b`` keeps the ``k``
    largest ``rho_b x^2``, its exact minimizer of ``sum_b rho_b ||Z_b - V_b||^2``.  The solver
    and :func:`~admm_compress.export` project the bound weights jointly; the single-tensor
    operators (:meth:`project`, :meth:`factorize`, :meth:`contains`) treat their one tensor as
    the whole tuple, and :meth:`num_params` reports a layer's even share ``density * count`` (what
    it actually keeps is decided by the projection; :meth:`Solver.describe` after ``finalize``
    and ``ac.complexity`` of the exported model count it).
    """

    min_dim = 1
    isometric_structure = True  # the trainable form is the kept entries themselves
    settles_long_runs = True  # settle="auto": ADMM for half of fit's epochs, then the kept entries at lr

    SCOPES = ("layer", "global")

    def __init__(self, k: int | None = None, density: float | None = None,
                 group_dim: int | None = None, scope: str = "layer"):
        if (k is None) == (density is None):
            raise ValueError("Cardinality: give exactly one of k= and density=; got "
                             + ("both" if k is not None else "none"))
        self.k = None if k is None else check_int("k", k, low=1, where="Cardinality")
        self.density = None if density is None else check_float(
            "density", density, low=0.0, high=1.0, low_open=True, where="Cardinality")
        self.group_dim = None if group_dim is None else check_int(
            "group_dim", group_dim, where="Cardinality")
        if scope not in self.SCOPES:
            raise ValueError(f"Cardinality: scope must be one of {', '.join(map(repr, self.SCOPES))}, got {scope!r}")
        if scope == "global" and self.group_dim is not None:
            raise ValueError(f"Cardinality: scope='global' is unstructured only (a budget of entries shared by "
                             f"the layers), got group_dim={self.group_dim}; use scope='layer' for structured "
                             f"sparsity")
        if scope == "global" and self.k is not None:
            raise ValueError(f"Cardinality: scope='global' takes density= (the fraction of all bound entries "
                             f"kept), got k={self.k}")
        self.scope = scope

    @property
    def is_global(self) -> bool:
        """Whether one budget is shared by every weight bound to this instance (``scope="global"``)."""
        return self.scope == "global"

    def global_k(self, counts: Sequence[int]) -> int:
        """Entries kept by the joint projection of tensors with ``counts`` entries
        (``max(1, round(density * sum(counts)))``)."""
        return max(1, round(self.density * int(sum(counts))))

    def joint_masks(self, xs: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> list[torch.Tensor]:
        """``scope="global"``: the masks of the entries the joint projection of ``xs`` keeps
        (:meth:`global_k` of them; ``weights``: the ``rho_b``-weighted Z-step, see
        :func:`~admm_compress.functional.joint_topk_masks`)."""
        return F.joint_topk_masks(xs, self.global_k([x.numel() for x in xs]), weights)

    # ---------------------------------------------------------------- shapes
    def _dim(self, shape: Sequence[int]) -> int:
        return self.group_dim % len(shape)

    def count(self, shape: Sequence[int]) -> int:
        """Number of entries (unstructured) or of slices along ``group_dim`` (structured)."""
        if self.group_dim is None:
            return int(math.prod(shape))
        return int(shape[self._dim(shape)])

    def k_for(self, shape: Sequence[int]) -> int:
        """Number of entries (or slices) kept for tensors of ``shape``."""
        self.check_shape(tuple(shape))
        n = self.count(shape)
        if self.k is not None:
            return self.k
        return max(1, round(self.density * n))

    def check_shape(self, shape: Sequence[int], where: str | None = None) -> None:
        super().check_shape(shape, where)
        pre = where_prefix(where)
        shape = tuple(int(s) for s in shape)
        if self.group_dim is not None:
            d = len(shape)
            if not -d <= self.group_dim < d:
                raise ValueError(f"{pre}Cardinality: group_dim={self.group_dim} is out of range "
                                 f"for a {d}-way tensor of shape {shape}; allowed: "
                                 f"{-d} <= group_dim <= {d - 1}")
        n = self.count(shape)
        if n < 1:
            raise ValueError(f"{pre}Cardinality acts on non-empty tensors, got shape {shape}")
        if self.k is not None and self.k > n:
            what = "entries" if self.group_dim is None else f"slices along dim {self._dim(shape)}"
            raise ValueError(f"{pre}Cardinality: k={self.k} is larger than the {n} {what} of a "
                             f"tensor of shape {shape}; allowed: 1 <= k <= {n}")

    def num_params(self, shape: Sequence[int]) -> int:
        """Kept values: ``k`` (unstructured) or ``k * slice size`` (indices not counted)."""
        k = self.k_for(shape)
        if self.group_dim is None:
            return int(k)
        return int(k * math.prod(shape) // shape[self._dim(shape)])

    # -------------------------------------------------------------- operators
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k_for(x.shape)
        if self.group_dim is None:
            return F.project_topk(x, k)
        return F.project_group_topk(x, k, self._dim(x.shape))

    def factorize(self, x: torch.Tensor):
        """``(values, indices)`` of the projection.

        Unstructured: ``values`` (k,) and ``indices`` (k,) ``int64`` flat indices into ``x``
        (ascending).  Structured: ``values`` = the kept slices, ``x.index_select(group_dim,
        indices)``, and ``indices`` (k,) ``int64`` slice indices (ascending).
        """
        x = self._check_input(x)
        k = self.k_for(x.shape)
        if self.group_dim is None:
            idx = F.topk_indices(x.detach().abs(), k)
            return x.reshape(-1).index_select(0, idx), idx
        dim = self._dim(x.shape)
        idx = F.group_topk_indices(x, k, dim)
        return x.index_select(dim, idx), idx

    def reconstruct(self, factors, shape: Sequence[int]) -> torch.Tensor:
        """Dense tensor of ``shape`` with the values scattered back (differentiable in values)."""
        values, idx = factors
        shape = tuple(shape)
        if self.group_dim is None:
            out = values.new_zeros(math.prod(shape)).index_copy(0, idx, values.reshape(-1))
            return out.reshape(shape)
        dim = self._dim(shape)
        return values.new_zeros(shape).index_copy(dim, idx, values)

    def _contains(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str]:
        k = self.k_for(x.shape)
        if self.group_dim is None:
            a = x.detach().abs()
            what = "entries"
        else:
            a = F.group_norms(x.detach(), self._dim(x.shape))
            what = f"slices along dim {self._dim(x.shape)}"
        tol = atol + rtol * float(a.max()) if a.numel() else atol
        nnz = int((a > tol).sum())
        if nnz > k:
            return False, f"{nnz} non-zero {what} (|.| > atol + rtol * max) but k={k}"
        return True, ""

    def __repr__(self) -> str:
        arg = f"k={self.k}" if self.k is not None else f"density={self.density}"
        if self.group_dim is not None:
            arg += f", group_dim={self.group_dim}"
        if self.scope != "layer":
            arg += f", scope={self.scope!r}"
        return f"Cardinality({arg})"


def joint_factors(bindings) -> dict:
    """``(values, flat indices)`` -- :meth:`Cardinality.factorize`'s form -- per binding of every
    ``Cardinality(scope="global")`` instance among ``bindings``, from the joint projection of all
    the weights bound to it (the largest ``|w|`` over the shared budget, as ``Solver.finalize``
    does); other bindings are left out.  Used wherever a layer's factors are formed (export, the
    fine-tuning structure, ``keep_faster``'s dense copy), so a finalized model keeps its support.
    """
    groups: dict[int, list] = {}
    for b in bindings:
        if getattr(b.constraint, "is_global", False):
            groups.setdefault(id(b.constraint), []).append(b)
    out = {}
    for group in groups.values():
        xs = [b.to_view(b.param.detach()) for b in group]
        for b, x, m in zip(group, xs, group[0].constraint.joint_masks(xs)):
            idx = m.reshape(-1).nonzero().reshape(-1)
            out[b.key] = (x.reshape(-1).index_select(0, idx), idx)
    return out
