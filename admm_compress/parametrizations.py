"""Keep a weight's structure while training it further (fine-tuning after compression).

:class:`Factored` is a :mod:`torch.nn.utils.parametrize` parametrization whose trainable
tensors are the compact factors of a constraint (``set.factorize``): ``(U, V)`` for low rank,
the non-zero values for cardinality (indices are a fixed buffer), TT cores, or both for a sum.
The weight is rebuilt from them on every forward pass, so the structure holds exactly by
construction — masked entries stay zero, the rank cannot grow — and the module tree and the
optimizer-visible parameters are ordinary.  :func:`release` removes the parametrizations and
leaves a plain dense weight that satisfies the constraint.

(Formerly ``admm_compress.structure``; that path still imports and is this module.)
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import functional as F
from .sets.base import Constraint, GramSpec
from .views import View

__all__ = ["Factored", "Additive", "additive_components", "structure", "precondition", "factor_grad_maps",
           "ScaledGDHooks", "release", "flatten_factors", "unflatten_factors", "factored"]


def flatten_factors(factors: Any) -> tuple[list[torch.Tensor], Any]:
    """Leaves of a nested tuple/list of tensors and a spec to rebuild it."""
    if isinstance(factors, torch.Tensor):
        return [factors], None
    if isinstance(factors, (list, tuple)):
        leaves, specs = [], []
        for f in factors:
            lv, sp = flatten_factors(f)
            specs.append((len(lv), sp))
            leaves.extend(lv)
        return leaves, (type(factors), specs)
    raise TypeError(f"factors must be tensors or nested lists/tuples of tensors, got {type(factors).__name__}")


def unflatten_factors(leaves: Sequence[torch.Tensor], spec: Any) -> Any:
    """Inverse of :func:`flatten_factors`."""
    if spec is None:
        return leaves[0]
    kind, parts = spec
    out, i = [], 0
    for n, sp in parts:
        out.append(unflatten_factors(leaves[i:i + n], sp))
        i += n
    return kind(out) if kind is not tuple else tuple(out)


class Factored(nn.Module):
    """Parametrization ``W = view.back(set.reconstruct(factors))`` with trainable factors.

    Register it with ``unsafe=True`` (``right_inverse`` returns the floating factors, a different
    number of tensors than the weight).  Integer parts of the factors (sparse indices) are kept as
    buffers ``aux<i>`` so that they are saved and loaded with the state dict but never trained.
    """

    def __init__(self, constraint: Constraint, view: View, shape: Sequence[int], factors: Any = None):
        super().__init__()
        self._given = factors  # factors computed by the caller (e.g. from the L, S of a Sum)
        self.constraint = constraint
        self.view = view
        self.shape = tuple(shape)
        self.viewed_shape = tuple(view.viewed_shape(self.shape))
        self._spec = None
        self._float_pos: list[int] = []
        self._n_leaves = 0

    def right_inverse(self, weight: torch.Tensor):
        with torch.no_grad():
            factors = self._given if self._given is not None else \
                self.constraint.factorize(self.view.to(weight.detach()))
        self._given = None
        leaves, self._spec = flatten_factors(factors)
        self._n_leaves = len(leaves)
        self._float_pos = []
        floats = []
        for i, t in enumerate(leaves):
            if t.is_floating_point():
                self._float_pos.append(i)
                floats.append(t.to(weight.dtype).contiguous())
            else:
                self.register_buffer(f"aux{i}", t.contiguous())
        return tuple(floats)

    def factors(self, *floats: torch.Tensor) -> Any:
        """The constraint's factors (``set.factorize``'s structure) from the trainable tensors
        ``floats`` and the integer buffers."""
        leaves: list[torch.Tensor | None] = [None] * self._n_leaves
        for pos, t in zip(self._float_pos, floats):
            leaves[pos] = t
        for i in range(self._n_leaves):
            if leaves[i] is None:
                leaves[i] = getattr(self, f"aux{i}")
        return unflatten_factors(leaves, self._spec)

    def forward(self, *floats: torch.Tensor) -> torch.Tensor:
        return self.view.back(self.constraint.reconstruct(self.factors(*floats), self.viewed_shape), self.shape)


def factored(module: nn.Module, name: str = "weight") -> tuple[Factored, Any] | None:
    """``(parametrization, factors)`` of a weight structured by :func:`structure`, else ``None``."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    fac = next((p for p in plist if isinstance(p, Factored)), None)
    if fac is None:
        return None
    floats = [getattr(plist, f"original{i}") for i in range(len(fac._float_pos))]  # right_inverse returns a tuple
    return fac, fac.factors(*floats)


def structure(bindings) -> list[str]:
    """Register a :class:`Factored` parametrization on every hard-constrained binding.

    Penalty bindings (soft constraints) are left dense.  Returns the keys parametrized.
    """
    from .sets.cardinality import joint_factors

    done = []
    joint = joint_factors(bindings)  # Cardinality(scope="global"): the support of the shared budget
    for b in bindings:
        if b.constraint.is_penalty:
            continue
        factors = joint.get(b.key)
        comps = additive_components(b.module, b.param_name)
        if comps is not None:  # W = L + S: keep both components' structure
            with torch.no_grad():
                factors = b.constraint.factorize(tuple(b.to_view(t.detach()) for t in comps))
            parametrize.remove_parametrizations(b.module, b.param_name, leave_parametrized=True)
        if parametrize.is_parametrized(b.module, b.param_name):
            raise RuntimeError(f"layer '{b.name}': '{b.param_name}' is already parametrized; "
                               f"release() it before structuring again")
        parametrize.register_parametrization(b.module, b.param_name,
                                             Factored(b.constraint, b.view, b.shape, factors),
                                             unsafe=True)
        done.append(b.key)
    return done


def _pair_maps(factors: Any, maps: Any, where: str) -> list[tuple[torch.Tensor, Any]]:
    """``(factor, map)`` for every leaf of ``factors`` that ``maps`` (same nesting; ``None``
    anywhere: no map for that part) gives a callable."""
    if maps is None:
        return []
    if isinstance(factors, torch.Tensor):
        if not callable(maps):
            raise TypeError(f"{where}: a factor's gradient map must be callable or None, got {type(maps).__name__}")
        return [(factors, maps)]
    if not isinstance(maps, (list, tuple)) or len(maps) != len(factors):
        raise TypeError(f"{where}: the gradient maps must mirror the factors' nesting ({len(factors)} part(s)), "
                        f"got {maps!r}")
    return [pm for f, m in zip(factors, maps) for pm in _pair_maps(f, m, where)]


def factor_grad_maps(binding) -> list[tuple[torch.Tensor, Any]]:
    """``(trainable factor, gradient map)`` pairs of a binding structured by :func:`structure`,
    from its set's :meth:`~admm_compress.sets.Constraint.factor_grad_preconditioners` (empty
    when the weight is not structured or the set has none): one factor at a time, reading the
    current factors when called."""
    found = factored(binding.module, binding.param_name)
    if found is None:
        return []
    factors = found[1]  # the structure of set.factorize, with the trainable tensors as its float leaves
    maps = binding.constraint.factor_grad_preconditioners(factors)
    pairs = _pair_maps(factors, maps, f"layer '{binding.name}': {binding.constraint!r}")
    return [(t, fn) for t, fn in pairs if t.is_floating_point() and t.requires_grad]


def _pair_grams(factors: Any, grams: Any, where: str) -> list[tuple[torch.Tensor, tuple]]:
    """``(factor, GramSpec tuple)`` pairs of :meth:`~admm_compress.sets.Constraint.factor_grams`'
    nesting (``None`` parts dropped)."""
    if grams is None:
        return []
    if isinstance(factors, torch.Tensor):
        if not (isinstance(grams, tuple) and all(isinstance(s, GramSpec) for s in grams)):
            raise TypeError(f"{where}: a factor's Gram matrices must be a tuple of GramSpec or None, got {grams!r}")
        return [(factors, grams)] if grams else []
    if not isinstance(grams, (list, tuple)) or len(grams) != len(factors):
        raise TypeError(f"{where}: the Gram matrices must mirror the factors' nesting ({len(factors)} part(s)), "
                        f"got {grams!r}")
    return [pg for f, g in zip(factors, grams) for pg in _pair_grams(f, g, where)]


def _batched_grams(binding) -> bool:
    """Whether :func:`precondition` takes the binding's preconditioner from ``factor_grams``
    (batched) -- its set does not override ``factor_grad_preconditioners`` and returns Gram
    matrices."""
    found = factored(binding.module, binding.param_name)
    c = binding.constraint
    if found is None or type(c).factor_grad_preconditioners is not Constraint.factor_grad_preconditioners:
        return False
    return c.factor_grams(found[1]) is not None


class ScaledGDHooks:
    """The Gram-matrix preconditioners (:meth:`~admm_compress.sets.Constraint.factor_grams`) of
    several structured weights as gradient hooks, computed together.

    The factors do not change between a forward pass and its backward, so on the first hook call
    after a forward pass (a forward pre-hook on each :class:`Factored` marks the factors changed)
    every weight's Gram matrices are computed, grouped by size, dtype, device and damping, and
    damped (``delta = damping * lambda_max``, one batched ``eigvalsh``) and LU-factored (one
    batched ``lu_factor_ex``) per group; each hook is then one ``lu_solve`` per side.  The result
    is :func:`~admm_compress.functional.scaled_gd_apply`'s, factor by factor, up to rounding (on
    CPU LAPACK factors each matrix of a batch as it would alone); what changes is the number of
    small kernels, which on a GPU dominated the step (``benchmarks/precondition_overhead.py``).
    Non-finite Gram matrices are replaced by the identity before the eigenvalue and the LU, and a
    factor with any of them keeps its gradient (no host synchronization for the check)."""

    def __init__(self, bindings):
        self.bindings = list(bindings)
        self._stale = True
        self._solves: dict[int, tuple] = {}
        self.refreshes = 0  # how many times the Gram matrices were factored

    def mark_stale(self, *_) -> None:
        self._stale = True

    def _refresh(self) -> None:
        groups: dict[tuple, list] = {}
        sizes: dict[tuple, int] = {}
        pending = []  # (tensor id, [(side, group key, start, count, batch shape), ...])
        for b in self.bindings:
            found = factored(b.module, b.param_name)
            if found is None:
                continue
            pairs = _pair_grams(found[1], b.constraint.factor_grams(found[1]), f"layer '{b.name}': {b.constraint!r}")
            for t, specs in pairs:
                parts = []
                for spec in specs:
                    M = spec.gram
                    r = M.shape[-1]
                    key = (r, M.dtype, M.device, float(spec.damping))
                    flat = M.reshape(-1, r, r)
                    start = sizes.get(key, 0)
                    groups.setdefault(key, []).append(flat)
                    sizes[key] = start + flat.shape[0]
                    parts.append((spec.side, key, start, flat.shape[0], M.shape[:-2]))
                pending.append((id(t), parts))
        factored_groups = {}
        for key, mats in groups.items():
            r, dtype, device, damping = key
            M = mats[0] if len(mats) == 1 else torch.cat(mats)
            eye = torch.eye(r, dtype=dtype, device=device)
            finite = torch.isfinite(M).flatten(-2).all(-1)
            M = torch.where(finite[:, None, None], M, eye)
            D = torch.where(finite[:, None, None], F.damp_gram(M, damping), eye)
            LU, piv, _ = torch.linalg.lu_factor_ex(D)
            factored_groups[key] = (LU, piv, finite)
        self._solves = {}
        for tid, parts in pending:
            solves = []
            ok = None
            for side, key, start, count, batch in parts:
                LU, piv, finite = factored_groups[key]
                lu = (LU[start:start + count].reshape(*batch, *LU.shape[-2:]),
                      piv[start:start + count].reshape(*batch, piv.shape[-1]))
                solves.append((side, lu))
                if len(parts) > 1:  # several sides: keep g when any of them is not finite
                    f = finite[start:start + count].all()
                    ok = f if ok is None else ok & f
            self._solves[tid] = (solves, ok)
        self._stale = False
        self.refreshes += 1

    def apply(self, tid: int, g: torch.Tensor) -> torch.Tensor:
        """The preconditioned gradient of the factor ``id(tensor) == tid``."""
        if self._stale:
            with torch.no_grad():
                self._refresh()
        solves, ok = self._solves[tid]
        out = g
        for side, lu in solves:
            out = F._gram_solve(side, lu[0], out, lu=lu)
        return out if ok is None else torch.where(ok, out, g)

    def register(self) -> list:
        """Register the hooks; returns handles (``remove()``)."""
        handles = []
        for b in self.bindings:
            found = factored(b.module, b.param_name)
            if found is None:
                continue
            fac, factors = found
            pairs = _pair_grams(factors, b.constraint.factor_grams(factors), f"layer '{b.name}': {b.constraint!r}")
            for t, _ in pairs:
                if t.is_floating_point() and t.requires_grad:
                    handles.append(t.register_hook(lambda g, tid=id(t): self.apply(tid, g)))
            handles.append(fac.register_forward_pre_hook(self.mark_stale))
        return handles


def precondition(bindings) -> list:
    """Register the constraints' factor preconditioners as gradient hooks on the trainable
    factors of every binding structured by :func:`structure` (:class:`~admm_compress.sets.LowRank`:
    ScaledGD; :class:`~admm_compress.sets.TTRank`: its per-core form; a
    :class:`~admm_compress.sets.Sum`: its components'): the Gram matrices of
    :meth:`~admm_compress.sets.Constraint.factor_grams` through one :class:`ScaledGDHooks` for
    all of them, and the maps of a set that overrides
    :meth:`~admm_compress.sets.Constraint.factor_grad_preconditioners` as they are.  Returns the
    handles; ``h.remove()`` on each undoes it (:func:`release` drops the factors, and their hooks
    with them)."""
    bindings = list(bindings)
    batched = [b for b in bindings if _batched_grams(b)]
    handles = ScaledGDHooks(batched).register() if batched else []
    ids = {id(b) for b in batched}
    return handles + [t.register_hook(fn) for b in bindings if id(b) not in ids for t, fn in factor_grad_maps(b)]


def release(bindings) -> None:
    """Remove the :class:`Factored` parametrizations, leaving the dense structured weights."""
    for b in bindings:
        if parametrize.is_parametrized(b.module, b.param_name) and any(
                isinstance(p, Factored) for p in b.module.parametrizations[b.param_name]):
            parametrize.remove_parametrizations(b.module, b.param_name, leave_parametrized=True)


class Additive(nn.Module):
    """Parametrization ``W = L + S`` of a weight whose components carry their own constraints.

    ``right_inverse(W)`` splits the current weight with ``Sum.decompose`` (alternating
    projections; RASPA Algorithm 1, line 1) in the constraint's view, so registering it keeps the
    weight's value up to the split residual: the first component absorbs that residual
    (``L = W - S``), making the registration exact.  The components are the trainable
    ``parametrizations.weight.original0`` (L) and ``original1`` (S), in the weight's shape.
    """

    def __init__(self, constraint, view: View, shape: Sequence[int], iters: int = 10):
        super().__init__()
        self.constraint = constraint
        self.view = view
        self.shape = tuple(shape)
        self.iters = iters

    def right_inverse(self, weight: torch.Tensor):
        with torch.no_grad():
            v = self.view.to(weight.detach())
            _, S = self.constraint.decompose(v, iters=self.iters)
            S = self.view.back(S, self.shape)
        return (weight.detach() - S).contiguous(), S.contiguous()

    def forward(self, L: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        return L + S


def additive_components(module: nn.Module, name: str = "weight"):
    """``(L, S)`` parameters of a weight parametrized by :class:`Additive`, else None."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    if len(plist) == 1 and isinstance(plist[0], Additive):
        return plist.original0, plist.original1
    return None
