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
"""
from __future__ import annotations

import fnmatch
import logging
import math
import numbers
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..._validation import check_float, check_int
from ...functional import compute_dtype, rank_from_ratio, svd, svdvals, truncated_svd

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


# ============================================================================ truncation
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
        values, owner = [], []
        for i, (name, module) in enumerate(layers):
            m, n = _matrix_shape(module.weight.shape)
            w = module.weight.detach().reshape(m, n)
            s = svdvals(w.to(compute_dtype(w.dtype))).cpu()
            top = s[0]
            norm = s / top if top > 0 else torch.zeros_like(s)
            norm[0] = float("inf")                 # each layer's largest value is always kept
            values.append(norm)
            owner.append(torch.full((s.numel(),), i, dtype=torch.long))
        values, owner = torch.cat(values), torch.cat(owner)
        order = torch.sort(values, descending=True, stable=True).indices[:k]
        counts = torch.bincount(owner[order], minlength=len(layers))
        for (name, module), c in zip(layers, counts.tolist()):
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
