r"""Low-rank induced training by linear-layer composition (LoRITa) and singular-value truncation.

A weight is over-parameterized as a product of ``N`` dense factors that are trained with plain
weight decay; after training the product is collapsed back into the original layer and truncated
with a singular-value rule (LSVT, GSVT or ISVT).  Because (LoRITa Prop. 4.2, Eq. 4-6)

.. math::

    \min_{F_N \cdots F_1 = W} \sum_{i=1}^N \|F_i\|_F^2 \;=\; N \sum_j \sigma_j(W)^{2/N},

weight decay on the factors is a Schatten-:math:`(2/N)` penalty on the weight (Eq. 7-8), with no SVD
during training.

Conventions
-----------
*Matrix view.*  A weight of shape ``(out, in, *k)`` (``nn.Linear``: ``(out, in)``) is seen as the
matrix ``W`` of shape ``(m, n) = (out, in * prod(k))`` (the "channel" view of the library; for a
grouped convolution ``in`` is ``in / groups``).

*Factor order.*  ``W = F_N @ ... @ F_2 @ F_1`` with ``F_1`` the factor applied to the input first:

    ``F_1: (d, n)``,   ``F_2 ... F_{N-1}: (d, d)``,   ``F_N: (m, d)``.

The inner dimension ``d >= min(m, n)`` is chosen by ``inner`` in :func:`apply_factorization`:

* ``"auto"`` (the paper): ``nn.Linear`` uses ``d = in``: LoRITa Sec. 4.1 writes
  ``W = W^1 W^2 ... W^N`` with ``W^1 in R^{m x n}`` and ``W^2 ... W^N in R^{n x n}``, i.e. the input
  passes through ``N - 1`` bias-free square ``Linear(in, in)`` and then ``Linear(in, out)``
  (paper ``W^k`` = our ``F_{N+1-k}``).  Convolutions use ``d = out``: the same rule applied to the
  mode-4 unfolding ``K^(4) in R^{(k k in) x out}`` of Sec. 4.1, i.e. a ``k x k`` convolution
  ``in -> out`` followed by ``N - 1`` bias-free ``1 x 1`` convolutions ``out -> out``.
* ``"in"`` / ``"out"``: ``d = n`` / ``d = m`` for every layer; ``"min"``: ``d = min(m, n)``
  (smallest exact choice, no zero padding); an ``int``: that ``d`` (must be ``>= min(m, n)`` so the
  product can represent every weight, the condition of Prop. 4.2).

*Initialization* (``init`` of :func:`apply_factorization`).  ``"random"`` (the paper, Sec. 5.1:
"initializing from a random state"): independent Gaussian factors, zero mean, every entry of
factor ``i`` with the same variance ``v``, chosen so that the product has the layer's current
mean square, ``E[W_ab^2] = d^{N-1} v^N = mean(W^2)`` (for a freshly built layer: its default
initialization; for PyTorch's ``Linear`` / ``Conv`` that is ``1 / (3 fan_in)``).  The layer's
current *value* is discarded: use it to train from scratch.  ``"svd"``: :func:`balanced_factors`
of the current weight (exact product, minimal factor norm), to compress a trained model.  With the
SVD start, inner directions beyond ``min(m, n)`` (``d > min(m, n)``) start at zero and receive zero
gradient, so they stay unused (``inner="min"`` trains the same function class with fewer
parameters); with the random start every inner direction is used.

*State dict.*  :func:`apply_factorization` uses :func:`torch.nn.utils.parametrize.register_parametrization`,
so the key ``"<layer>.weight"`` is replaced by the ``N`` factors
``"<layer>.parametrizations.weight.original0"`` (``F_1``) ... ``"...original{N-1}"`` (``F_N``); the
bias and every other key are unchanged.  Such a state dict loads into a model factorized with the
same ``n_factors`` and inner dimensions.  To load plain (unfactorized) weights, load them before
factorizing, or assign ``layer.weight = w`` (which re-balances the factors through
``right_inverse``).  :func:`collapse` restores the plain ``"<layer>.weight"`` key.  Create the
optimizer *after* :func:`apply_factorization`: the old weight Parameter is no longer in the model.

*Parameter counts.*  A matrix truncated to rank ``r`` is stored as two factors with
``(m + n) r`` parameters (LoRITa Sec. 4), or dense (``m n``) when that is not smaller:
:func:`lowrank_param_count`.  ISVT removes ``m + n`` parameters per singular value.

Size (~490 lines, a fifth docstring): the N-factor product in its three layers -- pure
functions (factor shapes, balanced and random splits), the :mod:`torch.nn.utils.parametrize`
module :class:`FactorProduct`, and the model helpers that apply, read and collapse it -- one idea
whose parts are tested together.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import numbers
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..._validation import check_float, check_int
from ...functional import svd

__all__ = [
    "FactorProduct",
    "factor_shapes",
    "balanced_factors",
    "random_factors",
    "apply_factorization",
    "collapse",
    "is_factorized",
    "factor_parameters",
    "factor_sq_norm",
    "lowrank_param_count",
    "truncate_to_ranks",
    "lsvt",
    "gsvt",
    "isvt",
]

log = logging.getLogger(__name__)

_DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INNER_CHOICES = ("auto", "in", "out", "min")
INITS = ("random", "svd")


# ============================================================================ pure functions
def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """``(m, n) = (shape[0], prod(shape[1:]))``: the channel view of a weight of ``shape``."""
    return int(shape[0]), int(math.prod(shape[1:]))


def factor_shapes(m: int, n: int, n_factors: int, inner_dim: int | None = None) -> list[tuple[int, int]]:
    """Shapes of ``F_1 ... F_N`` in application order for an ``(m, n)`` matrix.

    ``[(d, n), (d, d), ..., (d, d), (m, d)]`` with ``d = inner_dim`` (default ``min(m, n)``);
    ``[(m, n)]`` for ``n_factors = 1``.
    """
    d = min(m, n) if inner_dim is None else int(inner_dim)
    if n_factors == 1:
        return [(m, n)]
    return [(d, n)] + [(d, d)] * (n_factors - 2) + [(m, d)]


def _random_orthogonal(d: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Haar-distributed ``d x d`` orthogonal matrix (QR of a Gaussian with the sign fix)."""
    dev = generator.device if generator is not None else like.device
    g = torch.randn(d, d, generator=generator, dtype=like.dtype, device=dev).to(like.device)
    q, r = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign


def balanced_factors(w: torch.Tensor, n_factors: int, inner_dim: int | None = None,
                     generator: torch.Generator | None = None) -> list[torch.Tensor]:
    r"""Balanced factors ``F_1 ... F_N`` (application order) with ``F_N @ ... @ F_1 = W`` exactly.

    With the reduced SVD ``W = U diag(s) V^T`` (``k = min(m, n)`` terms), ``P = [I_k; 0]`` (``d x k``)
    and orthogonal mixings ``Q_1 ... Q_{N-1}`` (identity unless ``generator`` is given):

    .. math::

        F_1 = Q_1 P S^{1/N} V^T,\quad F_i = Q_i P S^{1/N} P^T Q_{i-1}^T,\quad
        F_N = U S^{1/N} P^T Q_{N-1}^T .

    Every factor has singular values ``s^{1/N}`` (padded with zeros), so the factors are balanced
    (``F_{i+1}^T F_{i+1} = F_i F_i^T``) and attain the minimum of Prop. 4.2 (LoRITa Eq. 4 with
    ``p_i = 2``): ``sum_i ||F_i||_F^2 = N sum_j s_j^{2/N}``.

    Parameters
    ----------
    w : Tensor
        Matrix ``(m, n)``, or a weight ``(out, in, *k)`` taken in the ``(out, in * prod(k))`` view.
    n_factors : int
        ``N >= 1`` (``N = 1`` returns a copy of the matrix).
    inner_dim : int, optional
        ``d >= min(m, n)``; default ``min(m, n)``.  Inner directions beyond the rank are zero
        rows/columns; they stay at zero gradient under training (a saddle of the product).
    generator : torch.Generator, optional
        Draws the random orthogonal mixings; without it the middle factors are diagonal.

    Returns
    -------
    list of Tensor
        Shapes :func:`factor_shapes`, dtype and device of ``w``.  Computed in ``float64`` (``float32`` on MPS) and
        cast back, so the product equals ``w`` to the rounding of ``w.dtype``.  Cost: one SVD,
        ``O(m n min(m, n))``, plus ``O(N d^3)`` for the mixings.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() < 2:
        raise TypeError(f"w must be a floating-point tensor with at least 2 dimensions, got "
                        f"{type(w).__name__}" + (f" of shape {tuple(w.shape)}, dtype {w.dtype}"
                                                 if isinstance(w, torch.Tensor) else ""))
    n_factors = check_int("n_factors", n_factors, low=1)
    m, n = _matrix_shape(w.shape)
    k = min(m, n)
    d = k if inner_dim is None else check_int("inner_dim", inner_dim, low=k)
    mat = w.detach().reshape(m, n)
    if n_factors == 1:
        return [mat.clone()]
    # float64 for an exact product; MPS has no float64
    work = mat.to(torch.float32 if mat.device.type == "mps" else torch.float64)
    U, s, Vh = svd(work)        # (m,k) (k,) (k,n)
    root = s.pow(1.0 / n_factors)
    P = torch.zeros(d, k, dtype=work.dtype, device=work.device)
    P[:k, :k] = torch.eye(k, dtype=work.dtype, device=work.device)
    if generator is None:
        Q = [None] * (n_factors - 1)
    else:
        Q = [_random_orthogonal(d, work, generator) for _ in range(n_factors - 1)]

    def left(q, x):      # q @ x, q = None means identity
        return x if q is None else q @ x

    def right(x, q):     # x @ q^T
        return x if q is None else x @ q.T

    factors = [left(Q[0], P @ (root[:, None] * Vh))]
    mid = P @ torch.diag(root) @ P.T
    for i in range(1, n_factors - 1):
        factors.append(right(left(Q[i], mid), Q[i - 1]))
    factors.append(right((U * root) @ P.T, Q[-1]))
    # copy: the middle factors share one tensor when no mixing is drawn, and .to() is a no-op
    # for float64 weights, so without it the factors would alias each other
    return [f.to(w.dtype, copy=True) for f in factors]


def random_factors(shape: Sequence[int], n_factors: int, inner_dim: int | None = None, *,
                   mean_square: float, dtype=torch.float32, device=None,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    r"""Independent Gaussian factors ``F_1 ... F_N`` whose product has ``E[W_ab^2] = mean_square``.

    ``F_i`` has i.i.d. ``N(0, v)`` entries with ``v = (mean_square / d^{N-1})^{1/N}``: for
    independent zero-mean factors ``E[(F_N \cdots F_1)_{ab}^2] = d^{N-1} v^N`` (each inner sum over
    ``d`` terms multiplies the second moment by ``d v``).  Shapes :func:`factor_shapes` of the
    ``(m, n)`` view of ``shape``; ``d`` as there.
    """
    n_factors = check_int("n_factors", n_factors, low=1)
    mean_square = check_float("mean_square", mean_square, low=0.0)
    m, n = _matrix_shape(shape)
    d = min(m, n) if inner_dim is None else check_int("inner_dim", inner_dim, low=min(m, n))
    std = (mean_square / d ** (n_factors - 1)) ** (0.5 / n_factors)
    dev = generator.device if generator is not None else device
    return [(torch.randn(a, b, generator=generator, dtype=dtype, device=dev) * std).to(device)
            for a, b in factor_shapes(m, n, n_factors, d)]


def lowrank_param_count(m: int, n: int, rank: int) -> int:
    """Parameters of an ``(m, n)`` matrix stored at rank ``r``: ``min(m n, (m + n) r)``.

    ``(m + n) r`` are the two factors of the truncated SVD (LoRITa Sec. 4); a layer for which
    that is not smaller stays dense (as :func:`admm_compress.export` does).
    """
    return min(m * n, (m + n) * rank)


def _reconstruct(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, r: int) -> torch.Tensor:
    """``U_r diag(s_r) Vh_r``, the r-term truncation (``SVD_r`` of the paper)."""
    return (U[:, :r] * s[:r]) @ Vh[:r]


# ============================================================================ parametrization
class FactorProduct(nn.Module):
    r"""Parametrization ``weight = reshape(F_N @ ... @ F_1)`` for ``register_parametrization``.

    The factors are the parametrization's "originals" (``original0 = F_1`` ... ``original{N-1} =
    F_N``), held by ``module.parametrizations.weight``; this module holds no parameters, only the
    shapes.  ``right_inverse(W)`` returns :func:`balanced_factors` of ``W``, so registering with
    ``unsafe=False`` keeps the weight's value and assigning ``module.weight = W`` re-balances.
    Forward cost: one chained product (``torch.linalg.multi_dot``), ``O(m d n + N d^2 n)`` at
    worst per call.

    Parameters
    ----------
    shape : sequence of int
        Shape of the weight, ``(out, in)`` or ``(out, in, *k)``.
    n_factors : int
        ``N >= 2``.
    inner_dim : int, optional
        ``d >= min(m, n)`` of the ``(m, n)`` view; default ``min(m, n)``.
    generator : torch.Generator, optional
        Random orthogonal mixing of the balanced factors (see :func:`balanced_factors`).
    """

    def __init__(self, shape: Sequence[int], n_factors: int, inner_dim: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        shape = tuple(int(v) for v in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must have at least 2 positive dimensions, got {shape}")
        self.n_factors = check_int("n_factors", n_factors, low=2)
        self.shape = shape
        self.m, self.n = _matrix_shape(shape)
        k = min(self.m, self.n)
        self.inner_dim = k if inner_dim is None else check_int(
            "inner_dim", inner_dim, low=k, where=f"weight of shape {shape}")
        self.generator = generator

    @property
    def factor_shapes(self) -> list[tuple[int, int]]:
        """Shapes of ``F_1 ... F_N`` (application order)."""
        return factor_shapes(self.m, self.n, self.n_factors, self.inner_dim)

    def forward(self, *factors: torch.Tensor) -> torch.Tensor:
        if len(factors) != self.n_factors:
            raise ValueError(f"FactorProduct expects {self.n_factors} factors, got {len(factors)}")
        return torch.linalg.multi_dot(list(reversed(factors))).reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, this FactorProduct was built "
                             f"for {self.shape}")
        return tuple(balanced_factors(weight, self.n_factors, self.inner_dim, self.generator))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, n_factors={self.n_factors}, inner_dim={self.inner_dim}"


# ============================================================================ model helpers
def is_factorized(module: nn.Module) -> bool:
    """``True`` if ``module.weight`` is parametrized by a :class:`FactorProduct`."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, FactorProduct) for p in module.parametrizations["weight"])


def _has_matrix_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 2 and w.is_floating_point()


def _select(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """Resolve ``targets`` (names/globs, types, predicate or None) to ``(name, module)`` pairs."""
    named = dict(model.named_modules())
    if targets is None:
        targets = _DEFAULT_TYPES
    if isinstance(targets, type) or (isinstance(targets, tuple) and targets
                                     and all(isinstance(t, type) for t in targets)):
        out = [(nm, m) for nm, m in named.items() if isinstance(m, targets) and _has_matrix_weight(m)]
        if not out:
            raise ValueError(f"targets={targets!r} matched no module with a weight of >= 2 dimensions")
        return out
    if callable(targets):
        out = [(nm, m) for nm, m in named.items() if nm and _has_matrix_weight(m) and targets(nm, m)]
        if not out:
            raise ValueError("targets (a predicate) matched no module with a weight of >= 2 dimensions")
        return out
    if isinstance(targets, str):
        targets = [targets]
    try:
        items = list(targets)
    except TypeError:
        raise TypeError(f"targets must be None, module names or globs, a module type or a "
                        f"predicate (name, module) -> bool, got {type(targets).__name__}") from None
    out, seen = [], set()
    for t in items:
        if not isinstance(t, str):
            raise TypeError(f"targets must contain module names (str), got {t!r} ({type(t).__name__})")
        if any(c in t for c in "*?["):
            hits = [nm for nm, m in named.items()
                    if nm and fnmatch.fnmatchcase(nm, t) and _has_matrix_weight(m)]
            if not hits:
                raise ValueError(f"targets: the glob {t!r} matched no module with a weight of >= 2 dimensions")
        elif t in named and t:
            hits = [t]
        else:
            close = [nm for nm in named if nm and t.split(".")[-1] in nm][:5]
            raise ValueError(f"targets: the model has no module named {t!r}"
                             + (f"; similar names: {close}" if close else ""))
        for nm in hits:
            if nm not in seen:
                seen.add(nm)
                out.append((nm, named[nm]))
    return out


def _resolve_inner(name: str, module: nn.Module, inner) -> int:
    m, n = _matrix_shape(module.weight.shape)
    if isinstance(inner, str):
        if inner == "auto":
            inner = "in" if isinstance(module, nn.Linear) else "out"
        return {"in": n, "out": m, "min": min(m, n)}[inner]
    return check_int("inner", inner, low=min(m, n), where=f"layer {name!r} (matrix {m} x {n})")


def apply_factorization(model: nn.Module, targets=None, n_factors: int = 3, *, inner="auto",
                        generator: torch.Generator | None = None, init: str = "svd") -> list[str]:
    """Replace the weight of every targeted layer by a product of ``n_factors`` trainable factors.

    Registers a :class:`FactorProduct` on ``module.weight`` with
    ``torch.nn.utils.parametrize.register_parametrization(..., unsafe=False)``; the weight's value
    and the model's outputs are unchanged (factors from :func:`balanced_factors`).  Train the
    factors with weight decay (LoRITa Eq. 8; ``weight_decay=wd`` in an optimizer adds
    ``wd / 2 * factor_sq_norm``) and call :func:`collapse` afterwards.  The model is modified in
    place; see the module docstring for the factor order and the state-dict keys.

    Parameters
    ----------
    model : nn.Module
    targets : None, str, iterable of str, type, tuple of types or callable
        Module names (``fnmatch`` globs allowed), module types, or a predicate
        ``(name, module) -> bool``.  ``None``: every ``nn.Linear`` and ``nn.Conv1d/2d/3d``.
        Globs, types and predicates select only modules with a weight of >= 2 dimensions; an
        explicit name of a module without one is an error.
    n_factors : int
        ``N >= 2`` (``N = 1`` is the plain model: do not call this function).
    inner : {"auto", "in", "out", "min"} or int
        Inner dimension ``d`` of the factors, see the module docstring (``"auto"`` follows the paper).
    generator : torch.Generator, optional
        ``init="svd"``: random orthogonal mixing of the initial factors; ``init="random"``: the
        draws of the factors (default: the global torch RNG, like ``nn.init``).
    init : {"svd", "random"}
        ``"svd"``: balanced factors of the current weight (the product equals it); ``"random"``:
        :func:`random_factors` with the mean square of the current weight (training from scratch,
        the paper); see the module docstring.

    Returns
    -------
    list of str
        The names of the factorized modules, in module order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    n_factors = check_int("n_factors", n_factors, low=2)
    if isinstance(inner, str):
        inner_name = inner
        if inner_name not in _INNER_CHOICES:
            raise ValueError(f"inner={inner!r} is not allowed; choose one of {list(_INNER_CHOICES)} "
                             "or an int >= min(m, n)")
    elif isinstance(inner, bool) or not isinstance(inner, numbers.Integral):
        raise TypeError(f"inner must be one of {list(_INNER_CHOICES)} or an int, got {inner!r}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not allowed; choose one of {list(INITS)}")
    selected = _select(model, targets)
    plan = []
    for name, module in selected:
        if not _has_matrix_weight(module):
            raise ValueError(f"layer {name!r} ({type(module).__name__}) has no floating-point weight "
                             "with >= 2 dimensions to factorize")
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"layer {name!r}: its weight is already parametrized "
                             f"({'factorized' if is_factorized(module) else 'by another parametrization'})"
                             "; collapse or remove it first")
        plan.append((name, module, _resolve_inner(name, module, inner)))
    for name, module, d in plan:
        w = module.weight.detach()
        fp = FactorProduct(module.weight.shape, n_factors, d, generator if init == "svd" else None)
        parametrize.register_parametrization(module, "weight", fp, unsafe=False)
        if init == "random":
            ms = float(w.to(torch.float64).pow(2).mean())
            draws = random_factors(w.shape, n_factors, d, mean_square=ms, dtype=w.dtype, device=w.device,
                                   generator=generator)
            with torch.no_grad():
                for i, f in enumerate(draws):
                    getattr(module.parametrizations.weight, f"original{i}").copy_(f)
        log.debug("factorized %s: weight %s = product of %s", name, fp.shape, fp.factor_shapes)
    log.info("factorized %d layer(s) into %d factors each", len(plan), n_factors)
    return [name for name, _, _ in plan]


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All factor Parameters of the factorized layers (for an optimizer param group)."""
    out = []
    for module in model.modules():
        if is_factorized(module):
            plist = module.parametrizations["weight"]
            out.extend(getattr(plist, f"original{i}") for i in range(plist.ntensors))
    return out


def factor_sq_norm(model: nn.Module) -> torch.Tensor:
    r"""``sum_l sum_i ||F_{l,i}||_F^2`` over the factorized layers: the weight-decay term of Eq. 8.

    Differentiable (usable as an explicit penalty).  For balanced factors it equals
    ``N sum_l sum_j sigma_j(W_l)^{2/N}`` (Prop. 4.2) and bounds it from above otherwise.
    Returns a 0-dim tensor (0 on the model's device when nothing is factorized).
    """
    params = factor_parameters(model)
    if not params:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return sum(f.pow(2).sum() for f in params)


def collapse(model: nn.Module) -> list[str]:
    """Remove every :class:`FactorProduct`, leaving the product as the plain ``weight`` Parameter.

    Uses ``parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)`` (which
    also removes any other parametrization stacked on that weight); the module gets back its
    original class and its ``"<layer>.weight"`` state-dict key.  In place; returns the names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = []
    for name, module in list(model.named_modules()):
        if not is_factorized(module):
            continue
        requires_grad = any(p.requires_grad for p in module.parametrizations["weight"].parameters())
        with torch.no_grad():
            value = module.weight.detach().clone()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        # a fresh leaf Parameter holding the product (no autograd history to the old factors)
        module.weight = nn.Parameter(value, requires_grad=requires_grad)
        names.append(name)
    log.info("collapsed %d factorized layer(s)", len(names))
    return names


# The truncation rules (LSVT / GSVT / ISVT) live in .truncation; their names stay importable from
# here (admm_compress.factorization.gsvt, ...), as before the split.
from .truncation import _sample_batch, gsvt, isvt, lsvt, truncate_to_ranks  # noqa: E402,F401
