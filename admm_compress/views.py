"""Views: how a weight tensor becomes the matrix or tensor a constraint set acts on.

A constraint set knows nothing about layers.  A :class:`View` maps a weight of a given shape
to the object the set sees (``to``) and back (``back``); both are reshapes/permutations, so
``back(to(w), w.shape) == w`` exactly and a projection in the view is a projection of the
weight (the maps are orthogonal: they permute entries).

=============  ====================================================================
name           viewed shape of a weight ``(O, I, *k)`` (conv) or ``(O, I)`` (linear)
=============  ====================================================================
``matrix``     2-D: as is; n-D: ``(O, I * prod(k))``
``channel``    ``(O, I * prod(k))`` (conv1d/2d/3d; 2-D weights as is).  A rank-``r``
               factorization is a ``k``-sized conv ``I -> r`` then a 1x1 conv ``r -> O``
               (LRPET Sec. III-E).
``spatial``    conv2d only: permute to ``(O, kh, I, kw)`` and reshape to ``(O*kh, I*kw)``;
               rank ``r`` = a ``1 x kw`` conv ``I -> r`` then a ``kh x 1`` conv ``r -> O``
               (Decomposable-Net's spatial-wise decomposition, transposed).
``identity``   the tensor as is (for :class:`~admm_compress.Cardinality`)
:class:`TTView`  tensor-train layouts, three named ones:

               * ``TTView.oki()`` (:class:`TTOKIView`, layout ``"oki"``): ``(O, prod(k), I)``,
                 the 3-way tensor whose TT ranks ``(r_1, r_2)`` are RASPA Tables 8-10's
                 ``(1, r_1, r_2, 1)`` and reproduce Table 1's compression; a TT of it is
                 three stock convolutions ``1x1 I -> r_2``, ``kh x kw r_2 -> r_1``,
                 ``1x1 r_1 -> O`` (:mod:`admm_compress.layers.tt`).  RASPA's default.
               * ``TTView.paired()`` (:class:`TTPairedView`, layout ``"paired"``):
                 ``(o_1 i_1, prod(k), o_2 i_2)``, Eq. 9's two paired channel modes with the
                 kernel mode in the middle; the tensor RASPA Table 10's DenseNet-40 ranks
                 belong to (ranks above ``O``).  Equal to ``"oki"`` on square layers.
               * ``TTView(out_factors, in_factors)`` / ``TTView.eq9(...)`` (layout
                 ``"eq9"``): the literal reading of RASPA Eq. 9,
                 ``(prod(k), o_1 i_1, ..., o_d i_d)``.
=============  ====================================================================

:func:`get_view` resolves a name (or ``"auto"``) to a view; :func:`check_module` refuses
layers a view cannot represent faithfully (grouped or transposed convolutions).

Size (~770 lines): every view a set acts through -- matrix, channel, spatial, input-channel and
the tensor-train layouts -- with the one registry (:data:`VIEWS`, :func:`get_view`) and the
module checks that refuse a view before training.
"""
from __future__ import annotations

import abc

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ._validation import check_int, where_prefix

__all__ = [
    "View",
    "MatrixView",
    "ChannelView",
    "SpatialView",
    "IdentityView",
    "TTView",
    "TTOKIView",
    "TTPairedView",
    "paired_split",
    "TT_LAYOUTS",
    "tt_layout_view",
    "balanced_factors",
    "get_view",
    "check_module",
    "VIEWS",
]


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


def _at_least_2d(shape: Sequence[int], where, who: str) -> tuple[int, ...]:
    """``shape`` as ints; raises naming ``where`` and ``who`` (the view) if it has < 2 dimensions."""
    shape = _shape(shape)
    if len(shape) < 2:
        raise ValueError(f"{where_prefix(where)}{who} needs a weight with at least 2 dimensions, got shape {shape}")
    return shape


class View(abc.ABC):
    """Abstract base class: a bijective reshape/permutation of a weight tensor.

    Subclasses implement :meth:`check`, :meth:`viewed_shape`, :meth:`to` and :meth:`back`.
    """

    name: str = "view"

    def check(self, shape: Sequence[int], where: str | None = None) -> None:
        """Raise ``ValueError`` if weights of ``shape`` cannot be seen through this view."""

    @abc.abstractmethod
    def viewed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of ``to(w)`` for a weight of ``shape``."""

    @abc.abstractmethod
    def to(self, w: torch.Tensor) -> torch.Tensor:
        """The viewed tensor (a reshape/permutation of ``w``; may share memory with ``w``)."""

    @abc.abstractmethod
    def back(self, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The weight of ``shape`` whose view is ``t`` (inverse of :meth:`to`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MatrixView(View):
    """2-D weight as is; n-D weight ``(O, ...)`` as ``(O, prod(rest))``."""

    name = "matrix"

    def check(self, shape, where=None):
        _at_least_2d(shape, where, f"view '{self.name}'")

    def viewed_shape(self, shape):
        shape = _shape(shape)
        self.check(shape)
        return (shape[0], math.prod(shape[1:]))

    def to(self, w):
        self.check(w.shape)
        return w.reshape(w.shape[0], -1)

    def back(self, t, shape):
        shape = _shape(shape)
        self.check(shape)
        return t.reshape(shape)


class ChannelView(MatrixView):
    """Convolution ``(O, I, *k)`` as ``(O, I * prod(k))`` (conv1d/2d/3d; 2-D weights as is)."""

    name = "channel"


class SpatialView(View):
    """Conv2d ``(O, I, kh, kw)`` -> permute ``(O, kh, I, kw)`` -> ``(O*kh, I*kw)``.

    A rank-``r`` factorization ``A B`` of this matrix is a ``1 x kw`` convolution ``I -> r``
    (``B`` reshaped to ``(r, I, 1, kw)``) followed by a ``kh x 1`` convolution ``r -> O``
    (``A`` reshaped to ``(O, kh, r)`` and permuted to ``(O, r, kh, 1)``).
    """

    name = "spatial"

    def check(self, shape, where=None):
        shape = _shape(shape)
        if len(shape) != 4:
            raise ValueError(f"{where_prefix(where)}view 'spatial' needs a Conv2d weight (O, I, kh, kw), "
                             f"got shape {shape} ({len(shape)}-D)")

    def viewed_shape(self, shape):
        shape = _shape(shape)
        self.check(shape)
        O, I, kh, kw = shape
        return (O * kh, I * kw)

    def to(self, w):
        self.check(w.shape)
        O, I, kh, kw = w.shape
        return w.permute(0, 2, 1, 3).reshape(O * kh, I * kw)

    def back(self, t, shape):
        shape = _shape(shape)
        self.check(shape)
        O, I, kh, kw = shape
        return t.reshape(O, kh, I, kw).permute(0, 2, 1, 3).contiguous()


class IdentityView(View):
    """The tensor as is."""

    name = "identity"

    def check(self, shape, where=None):
        pass

    def viewed_shape(self, shape):
        return _shape(shape)

    def to(self, w):
        return w

    def back(self, t, shape):
        return t.reshape(_shape(shape))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def balanced_factors(n: int, d: int, strict: bool = False) -> tuple[int, ...]:
    """``d`` integers ``>= 1`` whose product is ``n``, as balanced as possible (descending).

    "Balanced" = the largest factor is as small as possible, then the smallest as large as
    possible (e.g. ``64, 2 -> (8, 8)``, ``48, 2 -> (8, 6)``, ``12, 3 -> (3, 2, 2)``).

    Raises
    ------
    ValueError
        With ``strict=True`` when ``n`` cannot be split into ``d`` factors all ``> 1``
        (e.g. ``n`` prime and ``d > 1``).
    """
    n = check_int("n", n, low=1, where="balanced_factors")
    d = check_int("d", d, low=1, where="balanced_factors")
    best = None

    def rec(rest: int, k: int, cap: int, acc: list[int]):
        nonlocal best
        if k == 1:
            if rest <= cap:
                cand = tuple(acc + [rest])
                key = (max(cand), -min(cand))
                if best is None or key < best[0]:
                    best = (key, cand)
            return
        # next (largest remaining) factor f: f | rest, f <= cap and f^k >= rest
        for f in reversed(_divisors(rest)):
            if f > cap:
                continue
            if f ** k < rest:
                break
            rec(rest // f, k - 1, f, acc + [f])

    rec(n, d, n, [])
    assert best is not None
    out = best[1]
    if strict and min(out) < 2:
        raise ValueError(f"balanced_factors: n={n} cannot be split into d={d} factors > 1 "
                         f"(best: {out}); allowed: n with at least {d} prime factors "
                         f"(with multiplicity)")
    return out


class TTView(View):
    r"""The ``"eq9"`` TT layout: the literal reading of RASPA Eq. 9 for a weight ``(O, I, *k)``.

    (The paper's tables are reproduced by the other named layout, :meth:`TTView.oki`; this one
    with Table 8's ranks stores 81.7 / 50.7 % fewer parameters on ResNet-20 instead of Table 1's
    85.3 / 70.4 %, and its layer is a core-by-core contraction, :class:`~admm_compress.layers.tt.TTConv2d`.)

    With ``O = o_1 ... o_d`` (``out_factors``) and ``I = i_1 ... i_d`` (``in_factors``), the
    viewed tensor is

        ``T[(k_1, k_2), (o_1, i_1), ..., (o_d, i_d)] = W[o, i, k_1, k_2]``

    of shape ``(K, o_1 i_1, ..., o_d i_d)``, ``K = prod(k)`` (kernel mode first, RASPA's core
    ``C_0``), where ``o = (o_1, ..., o_d)`` and ``i = (i_1, ..., i_d)`` are row-major
    (C-order) multi-indices (``o = o_1 * (o_2 ... o_d) + ...``, ``o_1`` most significant) and
    the pair ``(o_j, i_j)`` is the index ``o_j * I_j + i_j`` of mode ``j``.  The kernel mode is
    left out when ``K = 1`` (1x1 convolutions, linear layers): a size-1 mode would force the
    first TT rank to 1.  So a ``(16, 16, 3, 3)`` kernel with ``out_factors=(4, 4)``,
    ``in_factors=(4, 4)`` becomes ``(9, 16, 16)`` with ``TTRank(ranks=(r_1, r_2))`` — RASPA
    Table 8's ``(1, r_1, r_2, 1)``.

    Parameters
    ----------
    out_factors, in_factors : tuple of int
        Equal-length factorizations of the output and input sizes.  :meth:`auto` picks
        balanced ones (:func:`balanced_factors`).
    """

    name = "tt"
    layout = "eq9"

    def __init__(self, out_factors: Sequence[int], in_factors: Sequence[int]):
        for nm, f in (("out_factors", out_factors), ("in_factors", in_factors)):
            if not isinstance(f, (tuple, list)) or len(f) == 0:
                raise TypeError(f"TTView: {nm} must be a non-empty tuple of ints, got {f!r}")
        self.out_factors = tuple(check_int(f"out_factors[{j}]", v, low=1, where="TTView")
                                 for j, v in enumerate(out_factors))
        self.in_factors = tuple(check_int(f"in_factors[{j}]", v, low=1, where="TTView")
                                for j, v in enumerate(in_factors))
        if len(self.out_factors) != len(self.in_factors):
            raise ValueError(f"TTView: out_factors={self.out_factors} and in_factors="
                             f"{self.in_factors} must have the same length d")
        self.d = len(self.out_factors)

    @classmethod
    def eq9(cls, out_factors: Sequence[int], in_factors: Sequence[int]) -> "TTView":
        """The ``"eq9"`` layout (this class): ``TTView.eq9(o, i) == TTView(o, i)``."""
        return cls(out_factors, in_factors)

    @staticmethod
    def oki() -> "TTOKIView":
        """The ``"oki"`` layout ``(O, kh*kw, I)`` (:class:`TTOKIView`; RASPA Tables 1, 8-10)."""
        return TTOKIView()

    @staticmethod
    def paired(split=None) -> "TTPairedView":
        """The ``"paired"`` layout ``(o_1 i_1, kh*kw, o_2 i_2)`` (:class:`TTPairedView`; RASPA
        Table 10)."""
        return TTPairedView(split)

    @classmethod
    def auto(cls, shape: Sequence[int], d: int, strict: bool = False) -> "TTView":
        """Balanced ``d``-factor splits of ``O = shape[0]`` and ``I = shape[1]``."""
        shape = _shape(shape)
        if len(shape) < 2:
            raise ValueError(f"TTView.auto needs a weight with at least 2 dimensions, got {shape}")
        return cls(balanced_factors(shape[0], d, strict), balanced_factors(shape[1], d, strict))

    def check(self, shape, where=None):
        shape = _at_least_2d(shape, where, "TTView (a weight (O, I, *k))")
        O, I = shape[0], shape[1]
        if math.prod(self.out_factors) != O:
            raise ValueError(f"{where_prefix(where)}TTView: out_factors={self.out_factors} multiply to "
                             f"{math.prod(self.out_factors)} but the weight has O={O} outputs "
                             f"(shape {shape})")
        if math.prod(self.in_factors) != I:
            raise ValueError(f"{where_prefix(where)}TTView: in_factors={self.in_factors} multiply to "
                             f"{math.prod(self.in_factors)} but the weight has I={I} inputs "
                             f"(shape {shape})")

    def _K(self, shape):
        return math.prod(shape[2:])

    def viewed_shape(self, shape):
        shape = _shape(shape)
        self.check(shape)
        modes = tuple(o * i for o, i in zip(self.out_factors, self.in_factors))
        K = self._K(shape)
        return ((K,) + modes) if K > 1 else modes

    def _perm(self):
        d = self.d
        # axes of (o_1..o_d, i_1..i_d, K): K first, then (o_j, i_j) pairs
        perm = [2 * d]
        for j in range(d):
            perm += [j, d + j]
        return perm

    def to(self, w):
        shape = _shape(w.shape)
        self.check(shape)
        K = self._K(shape)
        t = w.reshape(*self.out_factors, *self.in_factors, K).permute(*self._perm())
        return t.reshape(self.viewed_shape(shape))

    def back(self, t, shape):
        shape = _shape(shape)
        self.check(shape)
        K = self._K(shape)
        d = self.d
        inter = [K]
        for o, i in zip(self.out_factors, self.in_factors):
            inter += [o, i]
        u = t.reshape(inter)
        inv = [0] * (2 * d + 1)
        for pos, ax in enumerate(self._perm()):
            inv[ax] = pos
        return u.permute(*inv).reshape(shape).contiguous()

    def __repr__(self) -> str:
        return f"TTView(out_factors={self.out_factors}, in_factors={self.in_factors})"


class TTOKIView(View):
    r"""The ``"oki"`` tensor-train layout: a weight ``(O, I, *k)`` as the 3-way ``(O, K, I)``.

    ``T[o, k, i] = W[o, i, k]`` with ``K = prod(k)`` (row-major kernel index; ``K = 1`` for
    linear layers and 1x1 convolutions, the middle mode then has size 1).  A TT decomposition
    with internal ranks ``(r_1, r_2)`` (RASPA Tables 8-10's ``(1, r_1, r_2, 1)``)

    .. math::

        W[o, i, k] = \sum_{a, b} G_1[o, a]\, G_2[a, k, b]\, G_3[b, i]

    is, applied to an input, a 1x1 convolution ``I -> r_2`` (``G_3``), a ``kh x kw``
    convolution ``r_2 -> r_1`` (``G_2``; the layer's stride, padding and dilation) and a 1x1
    convolution ``r_1 -> O`` (``G_1``): three stock layers (see
    :func:`admm_compress.layers.tt.tt_oki_modules`).  It stores ``O r_1 + r_1 K r_2 + r_2 I``
    numbers and costs as many MACs per output position (``r_2 I`` of them at the input
    resolution).  Counting this way with the tables' ranks reproduces RASPA Table 1's
    parameter reductions (ResNet-20: 85.3 / 70.4 %, see ``examples/raspa_table1.py``).

    The TT ranks are capped as :meth:`TTRank.rank_for` does: ``r_1 <= min(O, K I)``,
    ``r_2 <= min(r_1 K, I)``.
    """

    name = "tt"
    layout = "oki"

    def check(self, shape, where=None):
        _at_least_2d(shape, where, "TT view 'oki' (a weight (O, I, *k))")

    def viewed_shape(self, shape):
        shape = _shape(shape)
        self.check(shape)
        return (shape[0], math.prod(shape[2:]), shape[1])

    def to(self, w):
        shape = _shape(w.shape)
        self.check(shape)
        return w.reshape(shape[0], shape[1], -1).transpose(1, 2)

    def back(self, t, shape):
        shape = _shape(shape)
        O, K, I = self.viewed_shape(shape)
        return t.reshape(O, K, I).transpose(1, 2).reshape(shape).contiguous()

    def __eq__(self, other):
        return isinstance(other, TTOKIView)

    def __hash__(self):
        return hash("TTOKIView")

    def __repr__(self) -> str:
        return "TTView.oki()"


def paired_split(O: int, I: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((o_1, o_2), (i_1, i_2))`` of the ``"paired"`` layout for ``O`` outputs, ``I`` inputs.

    ``O = o_1 o_2`` and ``I = i_1 i_2`` with the mode sizes ``o_1 i_1``, ``o_2 i_2`` as equal as
    the divisors allow (the larger first on a tie: RASPA Eq. 9's most balanced pair of channel
    modes, :func:`admm_compress.methods.raspa_tables.paired_modes`); among splits with those
    mode sizes, the smallest ``i_1 o_2`` (every step of the exported layer runs ``i_1 o_2``
    times, :class:`~admm_compress.layers.tt.TTPairedConv`), so a square layer gets
    ``((O, 1), (1, I))``: the ``"oki"`` tensor and its three convolutions.
    ``(12, 24) -> ((6, 2), (3, 8))`` (modes 18, 16).
    """
    O, I = int(O), int(I)
    if O < 1 or I < 1:
        raise ValueError(f"paired_split: O={O}, I={I}; allowed: integers >= 1")
    best = None
    for o1 in (d for d in range(1, O + 1) if O % d == 0):
        for i1 in (d for d in range(1, I + 1) if I % d == 0):
            o2, i2 = O // o1, I // i1
            a, c = o1 * i1, o2 * i2
            key = (abs(a - c), -a, i1 * o2, -o1)
            if best is None or key < best[0]:
                best = (key, ((o1, o2), (i1, i2)))
    return best[1]


class TTPairedView(View):
    r"""The ``"paired"`` tensor-train layout: a weight ``(O, I, *k)`` as the 3-way
    ``(o_1 i_1, K, o_2 i_2)``.

    With ``O = o_1 o_2``, ``I = i_1 i_2`` (row-major: ``o = o_1 o_2' + o_2``) and ``K = prod(k)``,

        ``T[(o_1, i_1), k, (o_2, i_2)] = W[(o_1, o_2), (i_1, i_2), k]``

    -- RASPA Eq. 9's two paired channel modes ``(O_1 x I_1)``, ``(O_2 x I_2)`` with the kernel mode
    in the middle, which is what Table 10's DenseNet-40 ranks (up to 30 on 12-output layers) are
    ranks of.  A TT of it with ranks ``(r_1, r_2)``,
    ``W = sum_{a,b} G_1[(o_1, i_1), a] G_2[a, k, b] G_3[b, (o_2, i_2)]``, stores
    ``o_1 i_1 r_1 + r_1 K r_2 + r_2 o_2 i_2`` numbers (:func:`~admm_compress.methods.raspa_tables.tt_layer_params`)
    and is applied by :class:`~admm_compress.layers.tt.TTPairedConv`: three stock convolutions with
    the factors ``i_1``, ``o_2`` moved to the batch dimension.  Its MACs per output position,
    ``I o_2 r_2 + i_1 o_2 r_1 K r_2 + O i_1 r_1``, exceed its parameter count unless
    ``i_1 = o_2 = 1`` (the ``"oki"`` tensor, which square layers get): this layout saves
    parameters, not compute.

    Parameters
    ----------
    split : ((o_1, o_2), (i_1, i_2)), optional
        Fixed channel factorizations (every weight must match); default: per weight shape,
        :func:`paired_split`.

    The TT ranks are capped as :meth:`TTRank.rank_for` does for the viewed shape.
    """

    name = "tt"
    layout = "paired"

    def __init__(self, split=None):
        if split is not None:
            ok = (isinstance(split, (tuple, list)) and len(split) == 2
                  and all(isinstance(f, (tuple, list)) and len(f) == 2 for f in split))
            if not ok:
                raise TypeError(f"TTPairedView: split must be ((o_1, o_2), (i_1, i_2)), got {split!r}")
            split = tuple(tuple(check_int(f"split[{j}][{k}]", v, low=1, where="TTPairedView")
                                for k, v in enumerate(f)) for j, f in enumerate(split))
        self.split = split

    def split_for(self, shape: Sequence[int], where: str | None = None):
        """``((o_1, o_2), (i_1, i_2))`` for a weight of ``shape``."""
        shape = _at_least_2d(shape, where, "TT view 'paired' (a weight (O, I, *k))")
        O, I = shape[0], shape[1]
        if self.split is None:
            return paired_split(O, I)
        (o1, o2), (i1, i2) = self.split
        if o1 * o2 != O or i1 * i2 != I:
            raise ValueError(f"{where_prefix(where)}TTPairedView: split={self.split} needs O = {o1 * o2}, "
                             f"I = {i1 * i2}, but the weight has shape {shape}")
        return self.split

    def check(self, shape, where=None):
        self.split_for(shape, where)

    def viewed_shape(self, shape):
        shape = _shape(shape)
        (o1, o2), (i1, i2) = self.split_for(shape)
        return (o1 * i1, math.prod(shape[2:]), o2 * i2)

    def to(self, w):
        shape = _shape(w.shape)
        (o1, o2), (i1, i2) = self.split_for(shape)
        K = math.prod(shape[2:])
        return w.reshape(o1, o2, i1, i2, K).permute(0, 2, 4, 1, 3).reshape(o1 * i1, K, o2 * i2)

    def back(self, t, shape):
        shape = _shape(shape)
        (o1, o2), (i1, i2) = self.split_for(shape)
        K = math.prod(shape[2:])
        return t.reshape(o1, i1, K, o2, i2).permute(0, 3, 1, 4, 2).reshape(shape).contiguous()

    def __eq__(self, other):
        return isinstance(other, TTPairedView) and other.split == self.split

    def __hash__(self):
        return hash(("TTPairedView", self.split))

    def __repr__(self) -> str:
        return "TTView.paired()" if self.split is None else f"TTView.paired(split={self.split})"


class AutoTTView(View):
    """RASPA Eq. 9 tensorization whose channel factorizations are chosen per weight shape
    (the default view of :func:`admm_compress.methods.raspa` and ``admm_tt``).

    One spec covers layers of different widths, so the fixed :class:`~admm_compress.views.TTView`
    is picked per shape ``(O, I, *k)`` by :meth:`for_shape`:

    * ``d`` (number of channel modes): as given; otherwise from the length ``m`` of a tuple of
      target ranks (the viewed tensor has ``m + 1`` modes: ``d = m`` for a ``kh x kw > 1``
      kernel, whose kernel mode comes first, ``d = m + 1`` for a 1x1 kernel); otherwise 2
      (RASPA Tables 8-11 use three-way tensors ``(1, r_1, r_2, 1)``).
    * factors: ``None`` -> :func:`~admm_compress.views.balanced_factors` of ``O`` and ``I``
      into ``d`` factors; a pair ``(out_factors, in_factors)`` for every layer; or a mapping
      ``{channels: factors}`` giving the factorization of each channel count.

    Parameters
    ----------
    d : int, optional
    factors : None, pair of tuples, or mapping int -> tuple
    n_ranks : int, optional
        Length of the target rank tuple (used when ``d`` is None).
    """

    name = "tt"

    def __init__(self, d: int | None = None, factors: Any = None, n_ranks: int | None = None):
        self.d = None if d is None else check_int("d", d, low=1, where="AutoTTView")
        self.n_ranks = None if n_ranks is None else check_int("n_ranks", n_ranks, low=1, where="AutoTTView")
        if factors is not None and not isinstance(factors, Mapping):
            if not (isinstance(factors, (tuple, list)) and len(factors) == 2
                    and all(isinstance(f, (tuple, list)) for f in factors)):
                raise TypeError(f"AutoTTView: factors must be None, a pair (out_factors, in_factors) "
                                f"of int tuples, or a mapping {{channels: factors}}, got {factors!r}")
            factors = (tuple(factors[0]), tuple(factors[1]))
        elif isinstance(factors, Mapping):
            factors = {check_int("factors key", k, low=1, where="AutoTTView"): tuple(v)
                       for k, v in factors.items()}
        self.factors = factors
        self._cache: dict[tuple, TTView] = {}

    def _d_for(self, shape) -> int:
        if self.d is not None:
            return self.d
        if self.n_ranks is not None:
            K = math.prod(shape[2:])
            return self.n_ranks if K > 1 else self.n_ranks + 1
        return 2

    def for_shape(self, shape: Sequence[int], where: str | None = None) -> TTView:
        """The :class:`TTView` for a weight of ``shape`` (raises naming ``where`` if impossible)."""
        shape = tuple(int(s) for s in shape)
        if shape in self._cache:
            return self._cache[shape]
        if len(shape) < 2:
            raise ValueError(f"{where_prefix(where)}TT view needs a weight (O, I, *k), got shape {shape}")
        O, I = shape[0], shape[1]
        d = self._d_for(shape)
        if self.factors is None:
            of, inf = balanced_factors(O, d), balanced_factors(I, d)
        elif isinstance(self.factors, tuple):
            of, inf = self.factors
        else:
            missing = [c for c in (O, I) if c not in self.factors]
            if missing:
                raise ValueError(f"{where_prefix(where)}factors has no factorization for {missing[0]} channels "
                                 f"(weight shape {shape}); given for {sorted(self.factors)}")
            of, inf = self.factors[O], self.factors[I]
        for nm, f, n in (("out", of, O), ("in", inf, I)):
            if math.prod(f) != n:
                raise ValueError(f"{where_prefix(where)}cannot factor the {n} {nm}put channels as {tuple(f)} "
                                 f"(product {math.prod(f)}; weight shape {shape})")
            if (self.d is not None or self.n_ranks is not None) and len(f) != d:
                raise ValueError(f"{where_prefix(where)}{nm}put factors {tuple(f)} have {len(f)} entries but the "
                                 f"tensorization of weight shape {shape} needs d={d}")
        view = TTView(of, inf)
        self._cache[shape] = view
        return view

    def check(self, shape, where=None):
        self.for_shape(shape, where).check(shape, where)

    def viewed_shape(self, shape):
        return self.for_shape(shape).viewed_shape(shape)

    def to(self, w):
        return self.for_shape(w.shape).to(w)

    def back(self, t, shape):
        return self.for_shape(shape).back(t, shape)

    def __repr__(self):
        return f"AutoTTView(d={self.d}, factors={self.factors})"


#: The named tensor-train layouts (``methods.raspa(layout=...)``, ``solvers/admm_tt``).
TT_LAYOUTS = ("oki", "eq9", "paired")


def tt_layout_view(layout: str) -> View:
    """The view of a shape-free named TT layout: ``"oki"`` -> :meth:`TTView.oki`, ``"paired"`` ->
    :meth:`TTView.paired` (``"eq9"`` needs channel factorizations: :class:`TTView`,
    :class:`AutoTTView`)."""
    if layout == "oki":
        return TTOKIView()
    if layout == "paired":
        return TTPairedView()
    raise ValueError(f"tt_layout_view: layout={layout!r}; allowed: 'oki', 'paired' (for 'eq9' build a TTView "
                     f"or AutoTTView with its channel factors)")


class InputChannelView(View):
    """Convolution ``(O, I, *k)`` -> permute ``(O, *k, I)`` -> ``(O * prod(k), I)`` (Linear: as is).

    The low-rank split on the *input* side: a rank-``r`` factorization ``A B`` of this matrix
    (``A``: ``O prod(k) x r``, ``B``: ``r x I``) is exported as a 1x1 conv ``I -> r`` (``B``)
    followed by the ``k``-sized conv ``r -> O`` (``A`` permuted to ``(O, r, *k)``; the
    original stride, padding, padding mode, dilation and bias).  Exact for every padding mode: a
    bias-free 1x1 conv commutes with zero, reflect, replicate and circular padding.

    For a square ``c -> c`` layer at rank ``r`` it has the MACs of the ``"channel"`` split
    (``k``-sized conv ``I -> r`` then 1x1 ``r -> O``), ``r (I + prod(k) O)`` per output pixel,
    but the ``k``-sized conv keeps its ``O`` output channels: ONNX Runtime's blocked (NCHWc)
    convolutions and PyTorch's CPU kernels run a conv with few *input* channels far closer to
    their peak than one with few *output* channels.  Measured on ResNet-56 at ``LowRank(0.25)``
    (0.279x MACs both, 1 thread, ``benchmarks/latency_onnx.py``): see
    ``docs/results/latency_onnx.md``.  A different matricization than ``"channel"``: a different
    constraint set (the rank of ``(O k^2, I)`` instead of ``(O, I k^2)``), so the projected weight
    and the accuracy after training differ; ``LowRank(ratio=q)`` keeps ``q min(O prod(k), I)``.

    Use ``ac.Constrain(..., ac.LowRank(ratio=q), view=InputChannelView())``; a 3-input stem
    (``min = 3``) is better left on ``"channel"``.
    """

    name = "input_channel"

    def check(self, shape, where=None):
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            pre = f"{where}: " if where else ""
            raise ValueError(f"{pre}view 'input_channel' needs a Linear or conv weight (O, I, *k), got shape {shape}")

    def viewed_shape(self, shape):
        shape = tuple(int(d) for d in shape)
        self.check(shape)
        O, I, *k = shape
        return (O * math.prod(k), I)

    def to(self, w):
        self.check(w.shape)
        nd = w.dim()
        return w.permute(0, *range(2, nd), 1).reshape(-1, w.shape[1])

    def back(self, t, shape):
        shape = tuple(int(d) for d in shape)
        self.check(shape)
        O, I, *k = shape
        nd = len(shape)
        return t.reshape(O, *k, I).permute(0, nd - 1, *range(1, nd - 1)).contiguous()


VIEWS: dict[str, View] = {
    "matrix": MatrixView(),
    "channel": ChannelView(),
    "spatial": SpatialView(),
    "identity": IdentityView(),
    "input_channel": InputChannelView(),
}


def get_view(spec, shape: Sequence[int] | None = None) -> View:
    """Resolve ``spec`` (a registered name, ``"auto"`` or a :class:`View`) to a view.

    ``"auto"``: ``"matrix"`` for 2-D weights, ``"channel"`` for convolutions (needs ``shape``).
    When ``shape`` is given it is checked (:meth:`View.check`).
    """
    if isinstance(spec, View):
        view = spec
    elif isinstance(spec, str):
        if spec == "auto":
            if shape is None:
                raise ValueError("get_view: view='auto' needs the weight shape")
            view = VIEWS["matrix"] if len(shape) == 2 else VIEWS["channel"]
        elif spec in VIEWS:
            view = VIEWS[spec]
        else:
            raise ValueError(f"view={spec!r} is not a known view; choose one of "
                             f"{sorted(VIEWS) + ['auto']} or pass a View (e.g. TTView)")
    else:
        raise TypeError(f"view must be a name or a View instance, got {type(spec).__name__}")
    if shape is not None:
        view.check(_shape(shape))
    return view


def check_module(view: View, module: nn.Module, where: str | None = None) -> None:
    """Refuse modules whose weight layout the view cannot represent faithfully.

    Grouped convolutions (``groups > 1``) store ``(O, I / groups, *k)``: the matrix/TT views
    of that tensor do not describe the layer's linear map and cannot be exported as a
    factorized layer, so every view except ``"identity"`` refuses them.  Transposed
    convolutions store ``(I, O / groups, *k)`` and are refused likewise.  ``"spatial"``
    additionally needs a :class:`torch.nn.Conv2d`.
    """
    if not isinstance(view, View):
        raise TypeError(f"{where_prefix(where)}view must be a View, got {type(view).__name__}")
    if isinstance(view, IdentityView):
        return
    kind = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        if getattr(module, "transposed", False):
            raise ValueError(f"{where_prefix(where)}{kind} is a transposed convolution (weight layout "
                             f"(in, out/groups, *k)); view '{view.name}' supports ordinary "
                             f"convolutions only (use view='identity' with Cardinality)")
        if module.groups > 1:
            raise ValueError(f"{where_prefix(where)}{kind} has groups={module.groups}; a grouped "
                             f"convolution's weight (O, I/groups, *k) cannot be seen through view "
                             f"'{view.name}' (only groups=1; use view='identity' with "
                             f"Cardinality for grouped/depthwise convolutions)")
        if isinstance(view, SpatialView) and not isinstance(module, nn.Conv2d):
            raise ValueError(f"{where_prefix(where)}view 'spatial' needs an nn.Conv2d, got {kind}")
    elif isinstance(view, SpatialView):
        raise ValueError(f"{where_prefix(where)}view 'spatial' needs an nn.Conv2d, got {kind}")
    if getattr(view, "name", None) == "tt":
        _check_tt_module(view, module, where)


def _check_tt_module(view: View, module: nn.Module, where: str | None) -> None:
    """Refuse layers whose TT weight :func:`admm_compress.export` cannot build (at prepare time).

    ``"oki"`` (:class:`TTOKIView`) and ``"paired"`` (:class:`TTPairedView`): ``nn.Linear`` and
    ``nn.Conv1d/2d/3d`` with any padding mode
    (groups/transposed are refused above).  ``"eq9"`` (:class:`TTView` and shape-dependent
    views with ``for_shape``): ``nn.Linear`` and ``nn.Conv2d`` with ``padding_mode='zeros'``
    (:class:`~admm_compress.layers.tt.TTConv2d`).
    """
    kind = type(module).__name__
    layout = getattr(view, "layout", "eq9")
    if layout in ("oki", "paired"):
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ValueError(f"{where_prefix(where)}TT view {layout!r} on a {kind}: its TT weight can be exported only "
                             f"for nn.Linear and nn.Conv1d/2d/3d; exclude this layer (exclude=...) or "
                             f"constrain it with another set")
        return
    if isinstance(module, nn.Linear):
        return
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"{where_prefix(where)}TT view 'eq9' ({view!r}) on a {kind}: the Eq. 9 layout is "
                         f"exported as TTConv2d / TTLinear, for nn.Conv2d and nn.Linear only; use "
                         f"TTView.oki() (layout='oki'), which exports every nn.Conv1d/2d/3d")
    if module.padding_mode != "zeros":
        raise ValueError(f"{where_prefix(where)}TT view 'eq9' ({view!r}) on a {kind} with padding_mode="
                         f"{module.padding_mode!r}: TTConv2d supports padding_mode='zeros' only; use "
                         f"TTView.oki() (layout='oki'), which keeps any padding mode")


#: The views whose matrix the built-in low-rank / structured exporters know how to rebuild
#: layers from (checked with ``isinstance``, never by name: a user's view that reuses a name is
#: not mistaken for one of these).
MATRIX_VIEWS = (MatrixView, SpatialView, IdentityView)
