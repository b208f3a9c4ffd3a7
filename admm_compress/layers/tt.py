"""Layers for tensor-train (TT) weights, for the three named TT layouts of :mod:`admm_compress.views`.

* ``"oki"`` (:meth:`TTView.oki`, ``(O, kh*kw, I)``, RASPA's default): a TT weight *is* three
  stock layers, :func:`tt_oki_modules` (``1x1 I -> r_2``, ``kh x kw r_2 -> r_1``, ``1x1 r_1 -> O``;
  two ``nn.Linear`` for a linear layer), counted by ptflops' own counters, as fast as their MACs.
* ``"paired"`` (:meth:`TTView.paired`, ``(o_1 i_1, kh*kw, o_2 i_2)``, RASPA Table 10):
  :class:`TTPairedConv`, the same three stock layers with the channel factors ``i_1``, ``o_2``
  moved to the batch dimension (fewer parameters than ``"oki"`` on narrow layers, more MACs).
* ``"eq9"`` (:class:`TTView`, the literal reading of RASPA Eq. 9): :class:`TTConv2d` /
  :class:`TTLinear` below, evaluated core by core (a registered MAC counter).

Every exported TT layer (:class:`TTConv2d`, :class:`TTLinear`, the stock chains) runs under
``torch.jit.script`` and ``torch.export.export`` with the eager outputs.  A plain
:class:`TTRank` spec whose TT layer would cost more MACs than the dense one is reported at
``prepare`` (:func:`tt_macs_warning`).

The exporter (:func:`export_tt`) is registered explicitly by :mod:`admm_compress.export` next to
the built-in ones.  The same ``"oki"`` map has other stock realizations (the first or last 1x1
folded into the kxk conv, or one dense conv); :func:`admm_compress.layers.tt_realize.realize_tt`
picks one per layer of an exported model, by MACs or by measured latency.

Eq. 9 layout in detail.  A ``Conv2d`` kernel ``W`` of shape ``(O, I, kh, kw)`` seen through the RASPA tensorization
(Eq. 9; :class:`~admm_compress.views.TTView` with ``O = o_1 ... o_d``, ``I = i_1 ... i_d``,
``K = kh * kw``)

.. math::

    \\widetilde W[(k_1, k_2), (o_1, i_1), \\dots, (o_d, i_d)]
        = C_0(k_1 k_2)\\, C_1(o_1 i_1) \\cdots C_d(o_d i_d)

is applied to an input without ever forming ``W``, as a sequence of stock convolutions:

1. **spatial core** ``C_0`` (``K x r_1``): every input channel is convolved with the ``r_1``
   ``kh x kw`` filters of ``C_0`` (stride, padding and dilation of the original layer), i.e.
   one ``Conv2d(1, r_1, (kh, kw))`` on the input reshaped to ``(N * I, 1, H, W)``;
   ``z[n, i, r_1, p] = sum_k C_0[k, r_1] x[n, i, p + k]``.  Cost ``I r_1 K`` MACs per output
   position.  (For a 1x1 kernel the kernel mode is absent from the view, ``r_1 = 1``, and this
   step is a zero-cost pad + subsample.)
2. **channel cores** ``C_j`` (``r_j x o_j i_j x r_{j+1}``), ``j = 1..d``: each is a ``1 x 1``
   convolution contracting ``(r_j, i_j)`` into ``(o_j, r_{j+1})``, with the already produced
   output factors ``o_1..o_{j-1}`` in the batch dimension and the remaining input factors
   ``i_{j+1}..i_d`` in a spatial dimension.  Cost ``O_{<j} I_{>j} r_j i_j o_j r_{j+1}`` MACs
   per output position (``O_{<j} = o_1 ... o_{j-1}``, ``I_{>j} = i_{j+1} ... i_d``).

So ``y = conv(x, W)`` exactly (up to rounding), with
``MACs = P (I r_1 K + sum_j O_{<j} I_{>j} r_j i_j o_j r_{j+1}) + P O`` (bias) for ``P`` output
positions; compare ``P O I K`` for the dense layer.  Note that a TT kernel with few parameters
is not always cheaper to *apply*: the ``r_j r_{j+1}`` products can exceed ``O I K / ...`` for
large ranks, which :func:`tt_conv_macs_per_position` lets one check before exporting.

The MACs are given to :func:`admm_compress.complexity` (``backend="pytorch"``) by a counter
registered when this module is imported; the ``"aten"`` backend counts the same convolutions
directly (without the bias add).

Size (~730 lines, a sixth this docstring): the TT layers of the three layouts with the MAC formulas
the counters, the prepare-time warning and the exporter all share; the other realizations of
the oki chain are in :mod:`admm_compress.layers.tt_realize`.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .._validation import check_int
from ..sets import TTRank
from ..sets.base import Constraint
from ..views import TTOKIView, TTPairedView, TTView, View

__all__ = ["TTConv2d", "TTLinear", "tt_conv_macs_per_position", "tt_oki_modules", "tt_oki_cost",
           "TTPairedConv", "tt_paired_cost", "tt_layer_cost",
           "resolve_tt_view", "is_tt", "export_tt", "tt_macs_warning",
           "tt_layer_macs_per_position"]

log = logging.getLogger(__name__)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (check_int(name, v, low=0), check_int(name, v, low=0))
    v = tuple(v)
    if len(v) != 2:
        raise ValueError(f"TTConv2d: {name}={v} must be an int or a pair of ints")
    return (check_int(name, v[0], low=0), check_int(name, v[1], low=0))


def tt_conv_macs_per_position(in_channels: int, kernel_numel: int, out_factors: Sequence[int],
                              in_factors: Sequence[int], ranks: Sequence[int], bias: bool = False) -> int:
    """MACs of :class:`TTConv2d` per output position (batch 1), see the module docstring.

    Parameters
    ----------
    in_channels : int
        ``I``.
    kernel_numel : int
        ``K = kh * kw``.  With ``K = 1`` there is no spatial core.
    out_factors, in_factors : sequence of int
        ``(o_1..o_d)``, ``(i_1..i_d)``.
    ranks : sequence of int
        Internal TT ranks of the viewed tensor: ``(r_1..r_d)`` when ``K > 1`` (``d`` ranks
        of a ``d + 1``-way tensor), ``(r_2..r_d)`` when ``K = 1`` (then ``r_1 = 1``).
    bias : bool
        Add ``O`` for the bias (ptflops' convention).
    """
    d = len(out_factors)
    ranks = list(ranks)
    if kernel_numel > 1:
        r = [ranks[0]] + ranks[1:] + [1]  # r_1 .. r_{d+1}
        macs = in_channels * ranks[0] * kernel_numel
    else:
        r = [1] + ranks + [1]
        macs = 0
    for j in range(d):
        o_lt = math.prod(out_factors[:j])
        i_gt = math.prod(in_factors[j + 1:])
        macs += o_lt * i_gt * r[j] * in_factors[j] * out_factors[j] * r[j + 1]
    if bias:
        macs += math.prod(out_factors)
    return int(macs)


class TTConv2d(nn.Module):
    """2-D convolution with a TT-format kernel (RASPA Eq. 9), computed core by core.

    Parameters
    ----------
    cores : sequence of Tensor
        TT cores of the viewed kernel as :meth:`TTRank.factorize` returns them:
        ``G_k: (r_{k-1}, n_k, r_k)`` with ``n_0 = kh * kw`` (only when ``kh * kw > 1``) and
        ``n_j = o_j * i_j`` (pair index ``o_j * i_j_size + i_j``), ``r_0 = r_end = 1``.
        Stored as trainable parameters ``cores.<k>`` (copied).
    out_factors, in_factors : sequence of int
        ``O = prod(out_factors)``, ``I = prod(in_factors)`` (same length ``d``).
    kernel_size, stride, padding, dilation :
        As :class:`torch.nn.Conv2d` (``padding_mode="zeros"``, ``groups=1``); ``padding`` may
        be ``"valid"`` / ``"same"`` (stride 1) like ``Conv2d``.
    bias : Tensor, optional
        ``(O,)``; stored as the trainable parameter ``bias``.

    Notes
    -----
    ``forward`` equals ``F.conv2d(x, self.dense_weight(), bias, stride, padding, dilation)``
    up to rounding.  Cost per output position: :func:`tt_conv_macs_per_position`.
    """

    def __init__(self, cores: Sequence[torch.Tensor], out_factors: Sequence[int], in_factors: Sequence[int],
                 kernel_size, stride=1, padding=0, dilation=1, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_factors = tuple(check_int(f"out_factors[{j}]", v, low=1, where="TTConv2d")
                                 for j, v in enumerate(out_factors))
        self.in_factors = tuple(check_int(f"in_factors[{j}]", v, low=1, where="TTConv2d")
                                for j, v in enumerate(in_factors))
        if len(self.out_factors) != len(self.in_factors) or not self.out_factors:
            raise ValueError(f"TTConv2d: out_factors={self.out_factors} and in_factors={self.in_factors} "
                             f"must be non-empty and of the same length")
        self.d = len(self.out_factors)
        self.out_channels = math.prod(self.out_factors)
        self.in_channels = math.prod(self.in_factors)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        K = self.kernel_size[0] * self.kernel_size[1]
        self.has_spatial_core = K > 1
        self._first_channel_core = 1 if K > 1 else 0
        cores = [c.detach() for c in cores]
        expected = ([K] if K > 1 else []) + [o * i for o, i in zip(self.out_factors, self.in_factors)]
        if len(cores) != len(expected):
            raise ValueError(f"TTConv2d: got {len(cores)} cores for a viewed tensor of shape "
                             f"{tuple(expected)} ({len(expected)} modes)")
        prev = 1
        for k, (c, n) in enumerate(zip(cores, expected)):
            if c.dim() != 3 or c.shape[0] != prev or c.shape[1] != n:
                raise ValueError(f"TTConv2d: core {k} has shape {tuple(c.shape)}, expected "
                                 f"({prev}, {n}, r_{k + 1})")
            prev = c.shape[2]
        if prev != 1:
            raise ValueError(f"TTConv2d: the last core must end in rank 1, got {tuple(cores[-1].shape)}")
        self.cores = nn.ParameterList([nn.Parameter(c.clone().contiguous()) for c in cores])
        if bias is not None:
            if tuple(bias.shape) != (self.out_channels,):
                raise ValueError(f"TTConv2d: bias has shape {tuple(bias.shape)}, expected ({self.out_channels},)")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    # torch.jit.script compiles properties unless listed here (``ranks`` is for inspection only)
    __jit_unused_properties__ = ["ranks"]

    # ------------------------------------------------------------------ info
    @property
    def ranks(self) -> tuple[int, ...]:
        """Internal TT ranks of the viewed kernel (``len = number of cores - 1``)."""
        return tuple(int(c.shape[2]) for c in self.cores[:-1])

    def macs_per_position(self) -> int:
        """MACs per output position (batch 1), bias included."""
        return tt_conv_macs_per_position(self.in_channels, self.kernel_size[0] * self.kernel_size[1],
                                         self.out_factors, self.in_factors, self.ranks,
                                         bias=self.bias is not None)

    def dense_weight(self) -> torch.Tensor:
        """The ``(O, I, kh, kw)`` kernel the cores represent (for checks; not used in forward)."""
        from ..functional import tt_to_tensor

        view = TTView(self.out_factors, self.in_factors)
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        t = tt_to_tensor(list(self.cores)).reshape(view.viewed_shape(shape))
        return view.back(t, shape)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, out_factors={self.out_factors}, "
                f"in_factors={self.in_factors}, ranks={self.ranks}, bias={self.bias is not None}")

    # --------------------------------------------------------------- forward
    # Written for torch.jit.script as well as eager / torch.export: no augmented integer
    # assignment, no starred arguments, no super() call, no slicing of the ParameterList.
    def _spatial(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
        """Step 1: ``(N, I, H, W)`` -> ``(N, r_1, I, P)`` and the output size."""
        N, I = x.shape[0], x.shape[1]
        if self.has_spatial_core:
            c0 = self.cores[0]  # (1, K, r1)
            r1 = c0.shape[2]
            w0 = c0.reshape(-1, r1).t().reshape(r1, 1, self.kernel_size[0], self.kernel_size[1])
            z = F.conv2d(x.reshape(N * I, 1, x.shape[2], x.shape[3]), w0, None, self.stride,
                         self.padding, self.dilation)
            Ho, Wo = z.shape[-2], z.shape[-1]
            return z.reshape(N, I, r1, Ho * Wo).transpose(1, 2), r1, Ho, Wo
        # 1x1 kernel: padding + stride only (dilation is irrelevant; "valid"/"same" pad nothing)
        if not isinstance(self.padding, str):
            ph, pw = self.padding[0], self.padding[1]
            if ph != 0 or pw != 0:
                x = F.pad(x, [pw, pw, ph, ph])
        if self.stride[0] != 1 or self.stride[1] != 1:
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        Ho, Wo = x.shape[-2], x.shape[-1]
        return x.reshape(N, 1, I, Ho * Wo), 1, Ho, Wo

    def _forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        z, r, Ho, Wo = self._spatial(x)
        P = Ho * Wo
        B = N
        rest = self.in_channels
        j = 0
        for k, core in enumerate(self.cores):  # unrolled by TorchScript: no continue
            if k >= self._first_channel_core:
                o, i = self.out_factors[j], self.in_factors[j]
                r_next = core.shape[2]
                rest = rest // i
                z = z.reshape(B, r * i, rest, P)
                w = core.reshape(r, o, i, r_next).permute(1, 3, 0, 2).reshape(o * r_next, r * i, 1, 1)
                z = F.conv2d(z, w)  # (B, o * r_next, rest, P): memory order (B, o, r_next, i_{j+1}, ...)
                B = B * o
                r = r_next
                j = j + 1
        y = z.reshape(N, self.out_channels, Ho, Wo)
        bias = self.bias
        if bias is not None:
            y = y + bias.reshape(1, -1, 1, 1)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_conv(x)


class TTLinear(TTConv2d):
    """:class:`torch.nn.Linear` with a TT-format ``(O, I)`` weight: a 1x1 :class:`TTConv2d`.

    The weight viewed by :class:`~admm_compress.views.TTView` has the modes
    ``(o_1 i_1, ..., o_d i_d)`` (no kernel mode).  Inputs ``(..., I)``, outputs ``(..., O)``;
    ``forward`` equals ``F.linear(x, self.dense_weight(), bias)`` up to rounding.
    """

    def __init__(self, cores: Sequence[torch.Tensor], out_factors: Sequence[int], in_factors: Sequence[int],
                 bias: torch.Tensor | None = None):
        super().__init__(cores, out_factors, in_factors, kernel_size=1, bias=bias)
        self.in_features, self.out_features = self.in_channels, self.out_channels

    def dense_weight(self) -> torch.Tensor:
        """The ``(O, I)`` weight the cores represent."""
        return super().dense_weight().reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"out_factors={self.out_factors}, in_factors={self.in_factors}, ranks={self.ranks}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        shape[-1] = self.out_features
        y = self._forward_conv(x.reshape(-1, self.in_features, 1, 1))
        return y.reshape(shape)


# ----------------------------------------------------------------- complexity counter
def _tt_macs(module: TTConv2d, inputs, output) -> int:
    """ptflops ``pytorch`` counter: per-position MACs times output positions and batch."""
    return module.macs_per_position() * int(output.shape[0]) * int(output.shape[-2] * output.shape[-1])


def _tt_linear_macs(module: TTLinear, inputs, output) -> int:
    """Per-row MACs times the number of rows (all leading dimensions)."""
    return module.macs_per_position() * (int(output.numel()) // module.out_features)


def register_counters() -> None:
    """Teach :func:`admm_compress.complexity` the TT layers' MACs (called once by
    :mod:`admm_compress.layers`)."""
    from ..complexity import register_counter

    register_counter(TTConv2d, _tt_macs)
    register_counter(TTLinear, _tt_linear_macs)
    register_counter(TTPairedConv, _tt_paired_macs)



# ----------------------------------------------------------------- "oki" layout: stock layers
def _conv_cls(m: nn.Module):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[m.weight.dim() - 2]


def tt_oki_modules(cores: Sequence[torch.Tensor], module: nn.Module, bias: torch.Tensor | None = None) -> nn.Sequential:
    """The stock layers that apply an ``"oki"`` TT weight (:meth:`TTView.oki`) like ``module``.

    With cores ``G_1: (1, O, r_1)``, ``G_2: (r_1, K, r_2)``, ``G_3: (r_2, I, 1)`` of the viewed
    tensor ``(O, K, I)`` (``W[o, i, k] = sum_{a,b} G_1[o, a] G_2[a, k, b] G_3[b, i]``):

    * convolution ``(O, I, *k)``, ``K > 1``: ``ConvNd(I -> r_2, 1x1)`` (``G_3``), ``ConvNd(r_2 ->
      r_1, k)`` (``G_2``, with the layer's stride, padding, dilation and padding mode) and
      ``ConvNd(r_1 -> O, 1x1)`` (``G_1``, bias).  Exact for every padding mode: the first
      convolution is a per-pixel linear map without bias, so it commutes with padding.
    * ``K = 1`` (linear layers, 1x1 convolutions): the size-1 middle core is an ``r_1 x r_2``
      matrix, folded into the last factor (``O r_2 <= O r_1 + r_1 r_2`` since ``r_2 <= r_1``):
      ``Linear(I -> r_2)``, ``Linear(r_2 -> O)`` (or two 1x1 convolutions, the stride on the
      first when there is no padding).

    MACs per output position: ``r_2 I (H_in W_in / P) + r_1 r_2 K + O r_1`` (+ ``O`` bias) for
    ``K > 1``, all counted by ptflops' stock counters.

    Parameters
    ----------
    cores : sequence of 3 Tensors
        As :meth:`TTRank.factorize` returns them for the ``(O, K, I)`` view.
    module : nn.Linear or nn.Conv1d/2d/3d
        The dense layer replaced (its shape, stride, padding, dilation, padding mode, dtype and
        device are copied; ``groups`` must be 1).
    bias : Tensor, optional
        Added by the last layer.
    """
    if len(cores) != 3:
        raise ValueError(f"tt_oki_modules: expected the 3 TT cores of an (O, K, I) tensor, got {len(cores)}")
    g1, g2, g3 = (c.detach() for c in cores)
    O, K, I = g1.shape[1], g2.shape[1], g3.shape[1]
    r1, r2 = g1.shape[2], g3.shape[0]
    if tuple(g1.shape) != (1, O, r1) or tuple(g2.shape) != (r1, K, r2) or tuple(g3.shape) != (r2, I, 1):
        raise ValueError(f"tt_oki_modules: core shapes {[tuple(c.shape) for c in cores]} do not chain as "
                         f"(1, O, r1), (r1, K, r2), (r2, I, 1)")
    fk = {"device": module.weight.device, "dtype": module.weight.dtype}
    A = g1[0]                      # (O, r1)
    C = g3[:, :, 0]                # (r2, I)
    has_bias = bias is not None
    if isinstance(module, nn.Linear):
        if K != 1:
            raise ValueError(f"tt_oki_modules: a Linear layer has K=1, got cores for K={K}")
        first = nn.Linear(I, r2, bias=False, **fk)
        second = nn.Linear(r2, O, bias=has_bias, **fk)
        with torch.no_grad():
            first.weight.copy_(C)
            second.weight.copy_(A @ g2[:, 0, :])
            if has_bias:
                second.bias.copy_(bias)
        return nn.Sequential(first, second)
    if not isinstance(module, nn.modules.conv._ConvNd) or getattr(module, "transposed", False) or module.groups != 1:
        raise ValueError(f"tt_oki_modules: needs nn.Linear or an ungrouped nn.Conv1d/2d/3d, got {module!r}")
    Conv = _conv_cls(module)
    nd = module.weight.dim() - 2
    one = (1,) * nd
    k = tuple(module.kernel_size)
    if K != math.prod(k):
        raise ValueError(f"tt_oki_modules: cores have K={K} but the kernel {k} has {math.prod(k)} taps")
    if K == 1:
        # a 1x1 kernel pads nothing with "valid" / "same"
        no_pad = isinstance(module.padding, str) or all(p == 0 for p in module.padding)
        if no_pad:  # stride first: the 1x1 maps run at the output resolution
            first = Conv(I, r2, 1, stride=module.stride, bias=False, **fk)
            second = Conv(r2, O, 1, bias=has_bias, **fk)
        else:
            first = Conv(I, r2, 1, bias=False, **fk)
            second = Conv(r2, O, 1, stride=module.stride, padding=module.padding,
                          padding_mode=module.padding_mode, bias=has_bias, **fk)
        with torch.no_grad():
            first.weight.copy_(C.reshape(r2, I, *one))
            second.weight.copy_((A @ g2[:, 0, :]).reshape(O, r2, *one))
            if has_bias:
                second.bias.copy_(bias)
        return nn.Sequential(first, second)
    first = Conv(I, r2, 1, bias=False, **fk)
    middle = Conv(r2, r1, k, stride=module.stride, padding=module.padding, dilation=module.dilation,
                  padding_mode=module.padding_mode, bias=False, **fk)
    last = Conv(r1, O, 1, bias=has_bias, **fk)
    with torch.no_grad():
        first.weight.copy_(C.reshape(r2, I, *one))
        # G_2[a, k, b] -> weight[a, b, *k]
        middle.weight.copy_(g2.permute(0, 2, 1).reshape(r1, r2, *k))
        last.weight.copy_(A.reshape(O, r1, *one))
        if has_bias:
            last.bias.copy_(bias)
    return nn.Sequential(first, middle, last)


def tt_oki_cost(shape: Sequence[int], ranks: Sequence[int], in_positions: int = 1,
                out_positions: int = 1, bias: bool = False, padded: bool = False) -> tuple[int, int]:
    """``(params, MACs)`` of :func:`tt_oki_modules` for a weight of ``shape`` and effective ranks.

    Parameters
    ----------
    shape : (O, I, *k)
    ranks : (r_1, r_2)
        Effective (capped) TT ranks, :meth:`TTRank.rank_for` of the ``(O, K, I)`` view.
    in_positions, out_positions : int
        Spatial positions of the layer's input and output (1 for a linear layer).
    bias : bool
        Count the bias (``O`` parameters, ``O`` MACs per output position, ptflops' convention).
    padded : bool
        ``K = 1`` only: the layer pads (then the first 1x1 map runs at ``in_positions``; without
        padding the stride is applied first and both maps run at ``out_positions``).
    """
    O, I = int(shape[0]), int(shape[1])
    K = math.prod(int(s) for s in shape[2:])
    r1, r2 = int(ranks[0]), int(ranks[1])
    b = O if bias else 0
    if K == 1:
        params = r2 * I + O * r2
        macs = r2 * I * (in_positions if padded else out_positions) + O * r2 * out_positions
    else:
        params = r2 * I + r1 * K * r2 + O * r1
        macs = r2 * I * in_positions + (r1 * K * r2 + O * r1) * out_positions
    return params + b, macs + b * out_positions


# ----------------------------------------------------------------- "paired" layout
class TTPairedConv(nn.Module):
    r"""A ``"paired"`` TT weight (:meth:`TTView.paired`) applied by three stock layers.

    With ``O = o_1 o_2``, ``I = i_1 i_2`` and cores ``G_1: (1, o_1 i_1, r_1)``, ``G_2: (r_1, K, r_2)``,
    ``G_3: (r_2, o_2 i_2, 1)`` of the viewed tensor (``W[(o_1, o_2), (i_1, i_2), k] = sum_{a,b}
    G_1[(o_1, i_1), a] G_2[a, k, b] G_3[b, (o_2, i_2)]``), a convolution ``y = W * x`` is

    1. ``first``: ``ConvNd(i_2 -> o_2 r_2, 1x1)`` on the input seen as ``(N i_1, i_2, ...)``
       (``G_3``; a per-pixel linear map without bias, so it commutes with any padding);
    2. ``middle``: ``ConvNd(r_2 -> r_1, k)`` on ``(N i_1 o_2, r_2, ...)`` (``G_2``, the layer's
       stride, padding, dilation and padding mode);
    3. ``last``: ``ConvNd(i_1 r_1 -> o_1, 1x1)`` on ``(N o_2, i_1 r_1, ...)`` (``G_1``), then the
       output channels ``(o_1, o_2)`` are put back in order and the bias is added.

    For ``nn.Linear`` (``K = 1``) the three maps are ``nn.Linear`` layers on the last dimension.
    Parameters: ``o_2 r_2 i_2 + r_1 K r_2 + o_1 i_1 r_1`` (+ ``O`` bias); MACs per output position
    (``s = prod(stride)`` input positions per output position):
    ``s I o_2 r_2 + i_1 o_2 r_1 K r_2 + O i_1 r_1`` (+ ``O``), :func:`tt_paired_cost`.  With
    ``i_1 = o_2 = 1`` (square layers, :func:`~admm_compress.views.paired_split`) this is the
    ``"oki"`` chain.  Counted by :func:`admm_compress.complexity` through a registered counter
    (ptflops alone counts the three stock layers and misses only the ``O`` bias additions).
    Runs under ``torch.jit.script`` and ``torch.export.export``.
    """

    def __init__(self, cores: Sequence[torch.Tensor], split, module: nn.Module,
                 bias: torch.Tensor | None = None):
        super().__init__()
        (o1, o2), (i1, i2) = split
        g1, g2, g3 = (c.detach() for c in cores)
        r1, K, r2 = g2.shape
        O, I = o1 * o2, i1 * i2
        if (tuple(g1.shape) != (1, o1 * i1, r1) or tuple(g3.shape) != (r2, o2 * i2, 1)):
            raise ValueError(f"TTPairedConv: core shapes {[tuple(c.shape) for c in cores]} do not chain as "
                             f"(1, o1 i1, r1), (r1, K, r2), (r2, o2 i2, 1) for split {split}")
        fk = {"device": module.weight.device, "dtype": module.weight.dtype}
        self.o1, self.o2, self.i1, self.i2, self.r1, self.r2 = o1, o2, i1, i2, int(r1), int(r2)
        self.out_channels, self.in_channels = O, I
        self.linear = isinstance(module, nn.Linear)
        w3 = g3[:, :, 0].reshape(r2, o2, i2).transpose(0, 1).reshape(o2 * r2, i2)   # [(o2, b), i2]
        w1 = g1[0].reshape(o1, i1 * r1)                                              # [o1, (i1, a)]
        if self.linear:
            if K != 1:
                raise ValueError(f"TTPairedConv: a Linear layer has K=1, got cores for K={K}")
            self.first = nn.Linear(i2, o2 * r2, bias=False, **fk)
            self.middle = nn.Linear(r2, r1, bias=False, **fk)
            self.last = nn.Linear(i1 * r1, o1, bias=False, **fk)
            ws = (w3, g2[:, 0, :], w1)
        else:
            if not isinstance(module, nn.modules.conv._ConvNd) or module.groups != 1 or module.transposed:
                raise ValueError(f"TTPairedConv: needs nn.Linear or an ungrouped nn.Conv1d/2d/3d, got {module!r}")
            Conv = _conv_cls(module)
            nd = module.weight.dim() - 2
            k = tuple(module.kernel_size)
            if K != math.prod(k):
                raise ValueError(f"TTPairedConv: cores have K={K} but the kernel {k} has {math.prod(k)} taps")
            one = (1,) * nd
            self.first = Conv(i2, o2 * r2, 1, bias=False, **fk)
            self.middle = Conv(r2, r1, k, stride=module.stride, padding=module.padding, dilation=module.dilation,
                               padding_mode=module.padding_mode, bias=False, **fk)
            self.last = Conv(i1 * r1, o1, 1, bias=False, **fk)
            ws = (w3.reshape(o2 * r2, i2, *one), g2.permute(0, 2, 1).reshape(r1, r2, *k),
                  w1.reshape(o1, i1 * r1, *one))
        with torch.no_grad():
            for m, w in zip((self.first, self.middle, self.last), ws):
                m.weight.copy_(w)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(**fk).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1, o2, i1, i2, r1, r2 = self.o1, self.o2, self.i1, self.i2, self.r1, self.r2
        if self.linear:
            lead = list(x.shape[:-1])
            m = x.numel() // self.in_channels
            z = self.first(x.reshape(m, i1, i2))                       # (m, i1, o2 r2)
            z = self.middle(z.reshape(m, i1, o2, r2))                  # (m, i1, o2, r1)
            y = self.last(z.transpose(1, 2).reshape(m, o2, i1 * r1))   # (m, o2, o1)
            y = y.transpose(1, 2).reshape(lead + [self.out_channels])
            if self.bias is not None:
                y = y + self.bias
            return y
        n = x.shape[0]
        sp = list(x.shape[2:])
        z = self.first(x.reshape([n * i1, i2] + sp))                   # (n i1, o2 r2, *sp)
        z = self.middle(z.reshape([n * i1 * o2, r2] + sp))             # (n i1 o2, r1, *sp')
        sp = list(z.shape[2:])
        z = z.reshape([n, i1, o2, r1] + sp).transpose(1, 2).reshape([n * o2, i1 * r1] + sp)
        y = self.last(z)                                               # (n o2, o1, *sp')
        y = y.reshape([n, o2, o1] + sp).transpose(1, 2).reshape([n, self.out_channels] + sp)
        if self.bias is not None:
            y = y + self.bias.reshape([1, self.out_channels] + [1] * len(sp))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, split=(({self.o1}, {self.o2}), ({self.i1}, {self.i2})), "
                f"ranks=({self.r1}, {self.r2}), bias={self.bias is not None}")


def tt_paired_cost(shape: Sequence[int], split, ranks: Sequence[int], in_positions: int = 1,
                   out_positions: int = 1, bias: bool = False) -> tuple[int, int]:
    """``(params, MACs)`` of :class:`TTPairedConv` for a weight of ``shape`` (``(O, I, *k)``), the
    channel split ``((o_1, o_2), (i_1, i_2))`` and effective ranks ``(r_1, r_2)``; positions as in
    :func:`tt_oki_cost` (the first map runs at the input resolution)."""
    (o1, o2), (i1, i2) = split
    O, I = int(shape[0]), int(shape[1])
    K = math.prod(int(s) for s in shape[2:])
    r1, r2 = int(ranks[0]), int(ranks[1])
    b = O if bias else 0
    params = o2 * r2 * i2 + r1 * K * r2 + o1 * i1 * r1
    macs = I * o2 * r2 * in_positions + (i1 * o2 * r1 * K * r2 + O * i1 * r1) * out_positions
    return params + b, macs + b * out_positions


def _tt_paired_macs(module: TTPairedConv, inputs, output) -> int:
    """:func:`tt_paired_cost` at the call's input / output positions, times the batch."""
    x = inputs[0]
    if module.linear:
        rows = int(x.numel()) // module.in_channels
        p_in = p_out = 1
    else:
        rows = int(x.shape[0])
        p_in, p_out = math.prod(x.shape[2:]), math.prod(output.shape[2:])
    k = 1 if module.linear else module.middle.weight[0, 0].numel()
    shape = (module.out_channels, module.in_channels, k)
    split = ((module.o1, module.o2), (module.i1, module.i2))
    return rows * tt_paired_cost(shape, split, (module.r1, module.r2), p_in, p_out, module.bias is not None)[1]


def tt_layer_cost(tv: View, shape: Sequence[int], ranks: Sequence[int], in_positions: int = 1,
                  out_positions: int = 1, padded: bool = False) -> tuple[int, int]:
    """``(TT values, MACs)`` of the layer :func:`export_tt` builds for a weight of ``shape`` seen
    through the fixed TT view ``tv`` (:func:`resolve_tt_view`) with effective ranks ``ranks``
    (no bias): :func:`tt_oki_cost` (``"oki"``), :func:`tt_paired_cost` (``"paired"``), or the
    core sizes and :func:`tt_conv_macs_per_position` times ``out_positions`` (``"eq9"``).
    Positions as in :func:`tt_oki_cost`; ``padded`` matters for ``"oki"`` 1x1 kernels only."""
    shape = tuple(int(s) for s in shape)
    if isinstance(tv, TTOKIView):
        return tt_oki_cost(shape, ranks, in_positions, out_positions, padded=padded)
    if isinstance(tv, TTPairedView):
        return tt_paired_cost(shape, tv.split_for(shape), ranks, in_positions, out_positions)
    vs = tuple(tv.viewed_shape(shape))
    r = (1, *(int(x) for x in ranks), 1)
    params = sum(r[k] * n * r[k + 1] for k, n in enumerate(vs))
    macs = tt_conv_macs_per_position(shape[1], math.prod(shape[2:]), tv.out_factors, tv.in_factors, ranks)
    return params, macs * out_positions


# ----------------------------------------------------------------- prepare-time MACs check
def _pads(m: nn.Module) -> bool:
    """Whether a layer pads its input (numeric non-zero padding; "same"/"valid" and Linear: no)."""
    pad = getattr(m, "padding", 0)
    if isinstance(pad, str):
        return False
    return any(int(p) != 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,)))


def tt_layer_macs_per_position(module: nn.Module, constraint: TTRank, view: View,
                               shape: Sequence[int]) -> tuple[int, int]:
    """``(TT MACs, dense MACs)`` per output position of the layer ``export`` builds (no bias).

    ``"oki"``: :func:`tt_oki_cost` (the first 1x1 map of a convolution runs at the input
    resolution, ``prod(stride)`` input positions per output position); ``"paired"``:
    :func:`tt_paired_cost` (likewise); ``"eq9"``:
    :func:`tt_conv_macs_per_position`.  Dense: ``O I K``.
    """
    shape = tuple(int(s) for s in shape)
    O, I, K = shape[0], shape[1], math.prod(shape[2:])
    tv = resolve_tt_view(view, shape)
    ranks = constraint.rank_for(tuple(tv.viewed_shape(shape)))
    stride = math.prod(getattr(module, "stride", (1,)))
    macs = tt_layer_cost(tv, shape, ranks, in_positions=stride, padded=_pads(module))[1]
    return int(macs), O * I * K


def tt_macs_warning(module: nn.Module, constraint: Constraint, view: View, shape: Sequence[int]) -> str | None:
    """A prepare-time message when a plain :class:`TTRank` spec's TT layer costs more MACs per
    output position than the dense layer (None: it does not, or this is not a TT weight).

    Called by :func:`admm_compress.exportable.shrink_warning` (logged as a WARNING by
    ``Solver.prepare`` before any training, prefixed with the spec and the layer name).  RASPA's
    ``L + S`` constraint is checked by :meth:`RaspaSolver.prepare` itself (with ``S``'s cost).
    """
    if not isinstance(constraint, TTRank) or getattr(view, "name", None) != "tt":
        return None
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return None
    try:
        tt, dense = tt_layer_macs_per_position(module, constraint, view, shape)
    except (ValueError, TypeError):  # a shape the view refuses is reported by its own check
        return None
    if tt <= dense:
        return None
    tv = resolve_tt_view(view, tuple(shape))
    layout = getattr(tv, "layout", "eq9")
    ranks = constraint.rank_for(tuple(tv.viewed_shape(tuple(shape))))
    alt = ("" if layout == "oki" else
           ", or the 'oki' layout (view=TTView.oki(); 3 stock convs, usually far fewer MACs)")
    if layout == "paired":
        alt += "; the 'paired' layout saves parameters, not MACs, on layers whose split is not (O, 1), (1, I)"
    return (f"its TT form ({layout} layout, ranks {tuple(ranks)}) costs {tt} MACs per output position, "
            f"more than the dense layer's {dense} (weight {'x'.join(map(str, shape))}); use smaller TT "
            f"ranks{alt}, or ranks from a MACs budget (methods.raspa.tt_ranks_for_budget(model, "
            f"reduction, 'macs'))")


# ----------------------------------------------------------------- exporter
def resolve_tt_view(view: View, shape: Sequence[int]) -> View:
    """The fixed TT view a ``"tt"`` view uses for a weight of ``shape``.

    A :class:`TTView`, :class:`TTOKIView` or :class:`TTPairedView` is returned as is; a shape-dependent view (e.g.
    RASPA's automatic ``"eq9"`` tensorization) must provide ``for_shape(shape)``.
    """
    if isinstance(view, (TTView, TTOKIView, TTPairedView)):
        return view
    fs = getattr(view, "for_shape", None)
    if fs is None:
        raise TypeError(f"view {view!r} is named 'tt' but is neither a TTView/TTOKIView nor has for_shape(shape)")
    return fs(tuple(shape))


def is_tt(c: Constraint, v: View) -> bool:
    """Exporter predicate: a :class:`TTRank` on a ``"tt"`` view."""
    return isinstance(c, TTRank) and getattr(v, "name", None) == "tt"


def export_tt(m: nn.Module, c: TTRank, v: View, factors, with_bias: bool):
    """Exporter of a TT-rank weight (registered by :mod:`admm_compress.export`).

    ``"oki"`` layout: :func:`tt_oki_modules` (stock layers; ``None`` -- stay dense -- when that
    stores at least as many numbers as the dense weight).  ``"paired"``: :class:`TTPairedConv`
    (likewise ``None`` when it stores as many numbers; its MACs were reported at ``prepare``).
    ``"eq9"`` layout: ``nn.Conv2d`` /
    ``nn.Linear`` -> :class:`TTConv2d` / :class:`TTLinear`.
    """
    tv = resolve_tt_view(v, tuple(m.weight.shape))
    bias = m.bias if (with_bias and getattr(m, "bias", None) is not None) else None
    if isinstance(tv, TTOKIView):
        cores = [t.to(device=m.weight.device, dtype=m.weight.dtype) for t in factors]
        new = tt_oki_modules(cores, m, bias=bias)
        n_new = sum(int(p.numel()) for p in new.parameters()) - (0 if bias is None else int(bias.numel()))
        if n_new >= m.weight.numel():
            return None
        if isinstance(m, nn.modules.conv._ConvNd) and len(new) == 3:
            # per output position the first 1x1 conv runs prod(stride) times (input resolution)
            s = math.prod(m.stride)
            r1, r2 = new[1].out_channels, new[1].in_channels
            tt_pp = r2 * m.in_channels * s + r1 * new[1].weight[0, 0].numel() * r2 + m.out_channels * r1
            dense_pp = m.weight.numel()
            if tt_pp > dense_pp:
                log.warning("TT layer %d -> %d (stride %s, ranks (%d, %d)) costs about %d MACs per output position, "
                            "more than the dense kernel's %d; lower its TT ranks to save compute",
                            m.in_channels, m.out_channels, tuple(m.stride), r1, r2, tt_pp, dense_pp)
        return new
    if isinstance(tv, TTPairedView):
        cores = [t.to(device=m.weight.device, dtype=m.weight.dtype) for t in factors]
        new = TTPairedConv(cores, tv.split_for(tuple(m.weight.shape)), m, bias=bias)
        n_new = sum(int(p.numel()) for p in new.parameters()) - (0 if bias is None else int(bias.numel()))
        if n_new >= m.weight.numel():
            return None
        return new
    return _export_tt_eq9(m, c, tv, factors, bias)


def _export_tt_eq9(m: nn.Module, c: TTRank, tv: TTView, factors, bias):
    """``nn.Conv2d`` / ``nn.Linear`` with a TT-rank weight -> :class:`TTConv2d` / :class:`TTLinear`
    (None: stay dense)."""
    if isinstance(m, nn.Linear):
        cores = list(factors)
        if sum(int(t.numel()) for t in cores) >= m.weight.numel():
            return None
        new = TTLinear([t.to(device=m.weight.device, dtype=m.weight.dtype) for t in cores], tv.out_factors,
                       tv.in_factors, bias=bias)
        if new.macs_per_position() - (m.out_features if bias is not None else 0) >= m.weight.numel():
            log.warning("TTLinear %d -> %d with ranks %s costs more MACs than the dense layer; lower the "
                        "TT ranks to save compute", m.in_features, m.out_features, new.ranks)
        return new
    if not isinstance(m, nn.Conv2d):
        log.info("TT export builds TTConv2d / TTLinear for nn.Conv2d / nn.Linear only; %s stays dense",
                 type(m).__name__)
        return None
    if m.groups != 1 or m.padding_mode != "zeros":
        log.info("TT export needs groups=1 and padding_mode='zeros' (got groups=%d, padding_mode=%r); "
                 "layer stays dense", m.groups, m.padding_mode)
        return None
    cores = list(factors)
    n_tt = sum(int(t.numel()) for t in cores)
    if n_tt >= m.weight.numel():
        return None
    new = TTConv2d([t.to(device=m.weight.device, dtype=m.weight.dtype) for t in cores], tv.out_factors,
                   tv.in_factors, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                   bias=bias)
    dense_pp = m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
    tt_pp = new.macs_per_position() - (m.out_channels if bias is not None else 0)
    if tt_pp >= dense_pp:
        log.warning("TTConv2d %s -> %s with ranks %s costs %d MACs per output position, more than the "
                    "dense kernel's %d (fewer parameters: %d < %d); lower the TT ranks to save compute",
                    m.in_channels, m.out_channels, new.ranks, tt_pp, dense_pp, n_tt, m.weight.numel())
    return new
