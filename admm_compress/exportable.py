"""What :func:`admm_compress.export` can realize, decided before any training.

The rule of the library: everything a solver's ``prepare`` accepts, ``export`` turns into a
smaller, working model.  :func:`refusal` answers, for one bound weight (module, parameter,
constraint, view), whether export can build a compact layer for it; :func:`resolve
<admm_compress.specs.resolve>` calls it for every binding, so an impossible spec raises at
``Solver(...).prepare`` / ``fit`` -- not after a training run.  :func:`shrink_warning` names the
layers export would keep dense because the compact form is not smaller (a rank at or above the
break-even ``m n / (m + n)``), with the numbers.

What export realizes (module x constraint x view):

==================================  ==========================================================
constraint                          layers and views
==================================  ==========================================================
``LowRank`` / ``SchattenP``         ``nn.Linear`` (matrix / identity view); ``nn.Conv1d/2d/3d``
                                    with ``groups=1`` (``"channel"``/``"matrix"`` view);
                                    ``nn.Conv2d`` with zero padding (``"spatial"`` view)
``Cardinality`` (unstructured)      ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (any ``groups``)
``Cardinality(group_dim=0 | 1)``    ``nn.Linear``, ``nn.Conv1d/2d/3d`` with ``groups=1``;
                                    ``group_dim`` means output (0) / input (1) channels whatever
                                    the view (the weight is grouped as stored)
``TTRank``                          a :class:`~admm_compress.views.TTView` on ``nn.Conv2d`` /
                                    ``nn.Linear`` (plus the checks its exporter registers)
``Sum(a, b)``                       both components as above, on the same view
==================================  ==========================================================

Everything else -- transposed, 3-D sparse or embedding layers, BatchNorm scales, biases, LSTM
or fused attention parameters (unless a registered checker accepts them) -- is refused with
the layer, the set, the view and the fix in the message.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .sets import Cardinality, LowRank, SchattenP, Sum, TTRank
from .sets.base import Constraint
from .views import MATRIX_VIEWS, IdentityView, MatrixView, SpatialView, TTView, View

__all__ = ["refusal", "shrink_warning", "register_checker", "structured_on_weight"]

# extra checkers: (module, param_name, constraint, view) -> message | None; a message refuses,
# ``ACCEPT`` accepts (skipping the built-in rules), None defers to the next checker.
Checker = Callable[[nn.Module, str, Constraint, View], "str | None"]
_CHECKERS: list[Checker] = []
ACCEPT = ""  # a checker returning the empty string accepts the binding


def register_checker(check: Checker) -> None:
    """Add a rule consulted before the built-in ones (e.g. for a module type with its own exporter).

    ``check(module, param_name, constraint, view)`` returns a refusal message, ``""`` to accept,
    or ``None`` to leave the decision to the other rules.
    """
    if check not in _CHECKERS:
        _CHECKERS.insert(0, check)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _kind(m: nn.Module) -> str:
    s = type(m).__name__
    if isinstance(m, nn.modules.conv._ConvNd):
        s += f"(groups={m.groups})" if m.groups != 1 else ""
    return s


def structured_on_weight(c: Constraint, module: nn.Module) -> bool:
    """True if ``c`` is a structured ``Cardinality`` on a conv weight (grouped by channels as stored)."""
    return (isinstance(c, Cardinality) and c.group_dim is not None
            and isinstance(module, nn.modules.conv._ConvNd))


def _custom_exporter(c: Constraint, v: View) -> bool:
    """True if an exporter registered besides the built-in ones handles ``(c, v)`` (e.g. TRP's VH view)."""
    from .export import _BUILTIN, _EXPORTERS

    return any(match(c, v) for match, build in _EXPORTERS if build not in _BUILTIN)


def _lowrank_rule(m: nn.Module, c: Constraint, v: View) -> str | None:
    if isinstance(v, TTView):
        return "a TTView is for TTRank; low rank needs view='channel' (conv) or the default"
    if isinstance(v, IdentityView) and (not isinstance(m, nn.Linear)):
        return ("view='identity' keeps the conv weight 4-D and low rank needs a matrix: use "
                "view='channel' (out, in*kh*kw) or view='spatial' (out*kh, in*kw)")
    if not isinstance(v, MATRIX_VIEWS) and not _custom_exporter(c, v):
        return (f"low-rank export knows views 'matrix', 'channel' and 'spatial', not {v.name!r} "
                f"(register an exporter for it with admm_compress.export.register_exporter)")
    if isinstance(m, nn.Linear):
        return None
    if not isinstance(m, _CONV):
        return f"low-rank export builds nn.Linear / nn.Conv1d/2d/3d layers, not {_kind(m)}"
    if m.groups != 1:
        return (f"a grouped/depthwise convolution (groups={m.groups}) has no low-rank factorization "
                f"as two stock convs; exclude it (exclude=[...]) or target only groups=1 convs")
    if isinstance(v, SpatialView):
        if m.padding_mode != "zeros":
            return (f"the spatial split (1 x kw conv then kh x 1 conv) cannot reproduce "
                    f"padding_mode={m.padding_mode!r}; use view='channel'")
        if isinstance(m.padding, str) and m.padding == "same":
            if any(d * (k - 1) % 2 for k, d in zip(m.kernel_size, m.dilation)):
                return ("padding='same' with an even kernel is asymmetric and cannot be split "
                        "into 1 x kw and kh x 1 convs; use view='channel'")
    return None


def _sparse_rule(m: nn.Module, c: Cardinality, v: View) -> str | None:
    if c.group_dim is None:
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            return None
        return (f"sparse export builds SparseLinear / SparseConv1d / SparseConv2d, not {_kind(m)}; "
                f"exclude it")
    if c.group_dim not in (0, 1):
        return (f"group_dim={c.group_dim}: structured sparsity is exported as whole output "
                f"channels (group_dim=0) or input channels (group_dim=1) of the weight; "
                f"use 0 or 1")
    if not isinstance(m, (nn.Linear,) + _CONV):
        return f"structured sparse export builds nn.Linear / nn.Conv1d/2d/3d layers, not {_kind(m)}; exclude it"
    if isinstance(m, _CONV) and m.groups != 1:
        return (f"channel pruning of a grouped/depthwise convolution (groups={m.groups}) changes "
                f"its groups; use unstructured Cardinality (group_dim=None) or exclude it")
    if isinstance(m, _CONV) and not isinstance(v, IdentityView):
        return (f"structured sparsity on a conv acts on the weight as stored; view {v.name!r} "
                f"mixes channels with kernel taps (inside Sum: use group_dim=None)")
    if isinstance(m, nn.Linear) and not isinstance(v, (MatrixView, IdentityView)):
        return f"structured sparsity on a Linear needs the (out, in) weight, not view {v.name!r}"
    return None


def _tt_rule(m: nn.Module, c: Constraint, v: View) -> str | None:
    from .views import TTOKIView, TTPairedView

    if not (isinstance(v, TTView) or getattr(v, "name", None) == "tt"):
        return ("TTRank acts on a tensorized weight: pass view=admm_compress.views.TTView.oki() "
                "(or use methods.raspa / solver admm_tt, which choose one)")
    if isinstance(m, _CONV) and m.groups != 1:
        return f"TT export of a grouped/depthwise convolution (groups={m.groups}) is not supported; exclude it"
    if isinstance(v, (TTOKIView, TTPairedView)):  # stock 1x1 -> k x k -> 1x1 layers: any conv dimension, padding mode
        if not isinstance(m, (nn.Linear,) + _CONV):
            return f"TT export builds layers for nn.Linear and nn.Conv1d/2d/3d, not {_kind(m)}; exclude it"
        return None
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        return (f"the 'eq9' TT layout exports nn.Conv2d and nn.Linear only, not {_kind(m)}; use "
                f"view=TTView.oki() (any conv) or exclude it")
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        return (f"the 'eq9' TT layer pads with zeros; padding_mode={m.padding_mode!r} cannot be "
                f"reproduced: use view=TTView.oki() or exclude it")
    return None


def _rule(m: nn.Module, c: Constraint, v: View) -> str | None:
    c = getattr(c, "export_as", c)
    if isinstance(c, Sum):
        for part in c.sets:
            msg = _rule(m, part, v)
            if msg:
                return f"component {part!r} of the Sum: {msg}"
        return None
    if isinstance(c, (LowRank, SchattenP)):
        return _lowrank_rule(m, c, v)
    if isinstance(c, Cardinality):
        return _sparse_rule(m, c, v)
    if isinstance(c, TTRank):
        return _tt_rule(m, c, v)
    return (f"no exporter for {type(c).__name__}; register one with "
            f"admm_compress.export.register_exporter (and a checker with "
            f"admm_compress.exportable.register_checker)")


def refusal(module: nn.Module, param_name: str, constraint: Constraint, view: View) -> str | None:
    """Why ``export`` could not build a compact layer for this weight (None: it can).

    The message names the reason and the fix; the caller prefixes the layer and the spec.
    """
    for check in _CHECKERS:
        msg = check(module, param_name, constraint, view)
        if msg is not None:
            return msg or None
    from .attention import check_binding as attention_refusal  # fused attention parameters

    msg = attention_refusal(module, param_name, constraint, view)
    if msg:
        return msg
    if param_name != "weight":
        return (f"export builds compact layers from a module's 'weight'; '{param_name}' of "
                f"{_kind(module)} cannot be exported (constrain 'weight', or exclude the layer)")
    if isinstance(module, nn.modules.conv._ConvNd) and getattr(module, "transposed", False):
        return (f"{_kind(module)} is a transposed convolution, which export does not rebuild; "
                f"exclude it")
    if not isinstance(module, (nn.Linear,) + _CONV):
        return (f"{_kind(module)} has no compact exported form (export rebuilds nn.Linear and "
                f"nn.Conv1d/2d/3d); exclude it or target those types")
    return _rule(module, constraint, view)


def shrink_warning(module: nn.Module, constraint: Constraint, view: View, shape) -> str | None:
    """A message when the exported layer would not be smaller than the dense one (None: it is)."""
    c = getattr(constraint, "export_as", constraint)
    if getattr(c, "sized_at_export", False):
        return None
    if isinstance(c, TTRank):
        from .layers.tt import tt_macs_warning  # local: layers imports export's modules

        return tt_macs_warning(module, c, view, shape)
    if isinstance(c, LowRank) and not isinstance(view, TTView):
        vs = tuple(view.viewed_shape(tuple(shape)))
        if len(vs) != 2:
            return None
        r = c.rank_for(vs)
        if r is None:
            return None
        m, n = vs
        if r * (m + n) >= m * n:
            return (f"{c!r} keeps rank {r} of a {m} x {n} matrix: the factors hold r(m+n) = "
                    f"{r * (m + n)} numbers >= {m * n} dense, so export keeps this layer dense "
                    f"(the rank is still cut); a rank below {m * n / (m + n):.1f} makes it smaller")
    return None
