"""Attention layers whose projections are ordinary sub-modules, so compressed ones work.

PyTorch's :class:`torch.nn.MultiheadAttention` does not *call* its output projection: it reads
``out_proj.weight`` / ``out_proj.bias`` and hands them to a fused kernel
(``F.multi_head_attention_forward`` or ``aten._native_multi_head_attention``), and its
``q``/``k``/``v`` projection is one fused parameter ``in_proj_weight`` ``(3E, E)``.  Likewise
:class:`torch.nn.TransformerEncoderLayer`'s inference fast path
(``aten._transformer_encoder_layer_fwd``) reads ``linear1.weight`` / ``linear2.weight``.  A
low-rank ``Sequential`` or a sparse layer put in their place by :func:`admm_compress.export`
therefore either crashes (``'Sequential' object has no attribute 'weight'``) or is silently
bypassed (its MACs never fall).

Choice made here
----------------
Rather than exporting into a dense form the fused kernels accept (which would keep the dense
cost), :func:`convert` **replaces** the attention modules by equivalent ones that call every
projection as a module:

* :class:`MultiheadAttention` -- same constructor attributes, call signature and return value
  as ``nn.MultiheadAttention`` (``batch_first``, unbatched inputs, ``key_padding_mask``,
  ``attn_mask`` bool or float, ``need_weights``, ``average_attn_weights``, ``is_causal``,
  ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``, dropout), with four sub-modules
  ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (any module mapping ``(..., in)`` to
  ``(..., out)``: ``nn.Linear``, a low-rank ``nn.Sequential``, a sparse layer) and a
  parameter-free :class:`ScaledDotProductAttention` core
  ``softmax(q k^T / sqrt(d) + mask) v`` (Vaswani et al. 2017, Eq. 1) whose MACs are
  registered with :mod:`admm_compress.complexity`.
* :class:`TransformerEncoderLayer` -- a subclass of ``nn.TransformerEncoderLayer`` whose
  ``forward`` is the stock layer's non-fused path (``_sa_block`` / ``_ff_block``, unchanged),
  so ``isinstance`` checks and every attribute still hold.  An ``nn.TransformerEncoder``
  holding such layers gets ``use_nested_tensor = False`` (the nested-tensor path would read
  the fused weights); its outputs at *padded* positions (``src_key_padding_mask``) are then the
  ones of PyTorch's training path instead of the zeros of its fused inference path (they are
  padding either way; all other positions are equal within float error).

``convert(model)`` on an uncompressed model changes no output (beyond float rounding) and no
count of either ptflops backend.  :func:`admm_compress.export` calls
``convert(model, only_changed=True)`` after swapping layers (before the cross-layer channel
removal), which converts exactly the attention / encoder layers whose projections it replaced,
so untouched layers keep PyTorch's fused kernels.  The converted modules trace with
:mod:`torch.fx` (layout and mask handling sit in ``torch.fx.wrap``-ed helpers; projections and
the core appear as module calls).  They are not TorchScript-scriptable.

Cost of the replacement: the three ``q``/``k``/``v`` products run as three ``addmm`` calls
instead of one fused ``(3E, E)`` product (same MACs), and the module runs PyTorch's unfused
attention math (``F.scaled_dot_product_attention``), not the fused inference kernel.

The fused ``in_proj_weight``
----------------------------
A constraint on ``nn.MultiheadAttention.in_proj_weight`` (or ``q/k/v_proj_weight``) is
refused (:func:`check_binding`, called when a spec is prepared): export builds layers from a
module's ``weight`` and the fused tensor belongs to no layer.  The fix is to call
:func:`convert` **before** training: the model then has separate ``nn.Linear`` ``q_proj``,
``k_proj``, ``v_proj`` layers (the rows ``[0:E]``, ``[E:2E]``, ``[2E:3E]`` of
``in_proj_weight``), which ``Constrain(nn.Linear, ...)`` selects like any other layer, with
one rank / support per projection (the usual choice in the low-rank transformer literature).

Size (~460 lines, a fifth this docstring): a drop-in for PyTorch's attention needs its whole
forward contract -- masks, batch-first layouts, head splitting, ``need_weights``, the encoder
layer's fast-path switch -- plus the conversion and the spec check; split, the pieces would only
make sense together.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MultiheadAttention", "ScaledDotProductAttention", "TransformerEncoderLayer", "convert",
           "check_binding", "FUSED_PARAMS"]

log = logging.getLogger(__name__)

#: parameters of ``nn.MultiheadAttention`` that no exported layer can be built from
FUSED_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

_STOCK_LINEAR = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, name: str) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s mask convention as an additive float mask (True -> -inf)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"MultiheadAttention: {name} must be a bool or float tensor, got dtype {mask.dtype}")
    return mask.to(dtype)


class ScaledDotProductAttention(nn.Module):
    r"""The attention core :math:`\mathrm{softmax}(q k^\top / \sqrt{d} + M)\, v` (no parameters).

    Inputs are ``(N, H, L, d)`` queries, ``(N, H, S, d)`` keys and ``(N, H, S, d_v)`` values and
    an optional additive float mask broadcastable to ``(N, H, L, S)``.  Cost of one call:
    ``N H L S (d + d_v)`` MACs for the two products (plus, in the count registered for the
    ptflops ``"pytorch"`` backend, ``N L H d`` for scaling ``q`` and ``N H L S`` for the softmax,
    the convention of ptflops' ``nn.MultiheadAttention`` hook, so a converted dense layer counts
    exactly as the stock one).

    Returns ``(out, weights)``; ``weights`` (``(N, H, L, S)``, after dropout as in PyTorch) only
    when ``need_weights``, else ``None`` and the product runs through
    :func:`torch.nn.functional.scaled_dot_product_attention`.
    """

    def forward(self, q, k, v, attn_mask=None, dropout_p: float = 0.0, need_weights: bool = False):
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p), None
        return _attention_with_weights(q, k, v, attn_mask, dropout_p)


@torch.fx.wrap
def _attention_with_weights(q, k, v, attn_mask, dropout_p: float):
    # ``@`` and ``torch.softmax`` rather than torch.matmul / F.softmax: ptflops' pytorch backend
    # patches the latter and would count them on top of the core's registered counter.
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


@torch.fx.wrap
def _to_batch_first(query, key, value, key_padding_mask, batch_first: bool):
    """``(query, key, value, key_padding_mask)`` as ``(N, L, E)`` / ``(N, S)`` tensors."""
    if query.dim() not in (2, 3):
        raise ValueError(f"MultiheadAttention: query must be 2-D (unbatched) or 3-D, got shape "
                         f"{tuple(query.shape)}")
    if query.dim() == 2:  # unbatched (L, E) -> (1, L, E)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        return query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), key_padding_mask
    if not batch_first:
        return query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), key_padding_mask
    return query, key, value, key_padding_mask


@torch.fx.wrap
def _split_heads(q, k, v, attn_mask, key_padding_mask, bias_k, bias_v, num_heads: int, add_zero_attn: bool):
    """Projected ``(N, L, E)`` tensors -> ``(N, H, L, d)`` heads and one additive mask
    broadcastable to ``(N, H, L, S)`` (``add_bias_kv`` / ``add_zero_attn`` as PyTorch does)."""
    n, lq, e = q.shape
    d = e // num_heads
    am = _additive_mask(attn_mask, q.dtype, "attn_mask")
    kpm = _additive_mask(key_padding_mask, q.dtype, "key_padding_mask")
    if bias_k is not None:
        k = torch.cat([k, bias_k.expand(n, 1, -1)], dim=1)
        v = torch.cat([v, bias_v.expand(n, 1, -1)], dim=1)
        am = F.pad(am, (0, 1)) if am is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    q = q.reshape(n, lq, num_heads, d).transpose(1, 2)
    k = k.reshape(n, k.shape[1], num_heads, d).transpose(1, 2)
    v = v.reshape(n, v.shape[1], num_heads, d).transpose(1, 2)
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(n, num_heads, 1, d)], dim=2)
        v = torch.cat([v, v.new_zeros(n, num_heads, 1, d)], dim=2)
        am = F.pad(am, (0, 1)) if am is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    mask = None
    if am is not None:  # (L, S) or (N*H, L, S)
        mask = am if am.dim() == 2 else am.reshape(n, num_heads, lq, am.shape[-1])
    if kpm is not None:  # (N, S)
        kpm = kpm.reshape(n, 1, 1, kpm.shape[-1])
        mask = kpm if mask is None else mask + kpm
    return q, k, v, mask


@torch.fx.wrap
def _from_batch_first(out, weights, query, batch_first: bool, need_weights: bool, average_attn_weights: bool):
    """Back to the caller's layout; weights averaged over heads or not, as PyTorch returns them."""
    batched = query.dim() == 3
    if not batched:
        out = out.squeeze(0)
    elif not batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    if average_attn_weights:
        weights = weights.mean(dim=1)
    if not batched:
        weights = weights.squeeze(0)
    return out, weights


def _core_macs(module, inputs, output) -> int:
    q, k = inputs[0], inputs[1]
    v = inputs[2]
    n_h = q.shape[:-2].numel()
    lq, s, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return int(n_h * lq * s * (d + dv) + q.numel() + n_h * lq * s)


class MultiheadAttention(nn.Module):
    """Drop-in for :class:`torch.nn.MultiheadAttention` with the projections as sub-modules.

    Parameters
    ----------
    embed_dim, num_heads : int
        As in ``nn.MultiheadAttention``; ``embed_dim`` must be divisible by ``num_heads``.
    q_proj, k_proj, v_proj, out_proj : nn.Module
        ``q_proj``: ``(..., embed_dim) -> (..., embed_dim)``; ``k_proj``: ``kdim -> embed_dim``;
        ``v_proj``: ``vdim -> embed_dim``; ``out_proj``: ``embed_dim -> embed_dim``.  Any module
        (``nn.Linear``, a low-rank ``nn.Sequential``, a sparse layer); they are called, never
        read.
    dropout : float
        Dropout on the attention weights in training mode.
    batch_first : bool
        Inputs ``(N, L, E)`` if True, ``(L, N, E)`` otherwise; 2-D inputs are unbatched.
    bias_k, bias_v : nn.Parameter, optional
        ``(1, 1, embed_dim)`` key/value biases appended to the sequence (``add_bias_kv``).
    add_zero_attn : bool
        Append a zero key/value (after the head split) as PyTorch does.
    kdim, vdim : int, optional
        Key/value feature sizes (default ``embed_dim``).

    Notes
    -----
    :meth:`from_torch` builds one from an ``nn.MultiheadAttention``: ``q_proj``/``k_proj``/
    ``v_proj`` are ``nn.Linear`` layers holding copies of the rows of ``in_proj_weight`` (or
    of ``q/k/v_proj_weight``) and ``in_proj_bias``; ``out_proj`` is the module itself (moved,
    not copied).
    """

    def __init__(self, embed_dim: int, num_heads: int, q_proj: nn.Module, k_proj: nn.Module,
                 v_proj: nn.Module, out_proj: nn.Module, dropout: float = 0.0, batch_first: bool = False,
                 bias_k: torch.Tensor | None = None, bias_v: torch.Tensor | None = None,
                 add_zero_attn: bool = False, kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        if not isinstance(embed_dim, int) or not isinstance(num_heads, int) or embed_dim < 1 or num_heads < 1 \
                or embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim!r}) must be a positive int divisible "
                             f"by num_heads ({num_heads!r})")
        for name, m in (("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj), ("out_proj", out_proj)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"MultiheadAttention: {name} must be an nn.Module, got {type(m).__name__}")
        if (bias_k is None) != (bias_v is None):
            raise ValueError("MultiheadAttention: give both bias_k and bias_v or neither")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj
        self.attention = ScaledDotProductAttention()
        self.out_proj = out_proj
        self.bias_k = bias_k if bias_k is None or isinstance(bias_k, nn.Parameter) else nn.Parameter(bias_k)
        self.bias_v = bias_v if bias_v is None or isinstance(bias_v, nn.Parameter) else nn.Parameter(bias_v)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """An equivalent module built from ``mha`` (its ``out_proj`` module is reused as is)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_torch: expected nn.MultiheadAttention, got {type(mha).__name__}")
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight.detach()
            weights = (w[:E], w[E:2 * E], w[2 * E:])
            rg = mha.in_proj_weight.requires_grad
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
            rg = mha.q_proj_weight.requires_grad
        b = mha.in_proj_bias
        biases = (None, None, None) if b is None else (b.detach()[:E], b.detach()[E:2 * E], b.detach()[2 * E:])
        projs = []
        for w, bias in zip(weights, biases):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if bias is not None:
                    lin.bias.copy_(bias)
            lin.weight.requires_grad_(rg)
            if bias is not None:
                lin.bias.requires_grad_(b.requires_grad)
            projs.append(lin)
        new = cls(E, mha.num_heads, *projs, mha.out_proj, dropout=mha.dropout, batch_first=mha.batch_first,
                  bias_k=mha.bias_k, bias_v=mha.bias_v, add_zero_attn=mha.add_zero_attn,
                  kdim=mha.kdim, vdim=mha.vdim)
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """Same arguments and returns as :meth:`torch.nn.MultiheadAttention.forward`."""
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True needs attn_mask (it is a hint that "
                               "attn_mask is the causal mask, as in torch.nn.MultiheadAttention)")
        # the layout and mask handling live in torch.fx-wrapped helpers, so that the module traces
        # (torch.fx sees the projections and the core as calls; channels.remove_channels, graph
        # questions and user tools keep working on exported transformers)
        nle = _to_batch_first(query, key, value, key_padding_mask, self.batch_first)
        q, k, v = self.q_proj(nle[0]), self.k_proj(nle[1]), self.v_proj(nle[2])
        heads = _split_heads(q, k, v, attn_mask, nle[3], self.bias_k, self.bias_v, self.num_heads,
                             self.add_zero_attn)
        attended = self.attention(heads[0], heads[1], heads[2], heads[3],
                                  self.dropout if self.training else 0.0, need_weights)
        out = self.out_proj(attended[0].transpose(1, 2).flatten(2))
        return _from_batch_first(out, attended[1], query, self.batch_first, need_weights, average_attn_weights)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without the fused inference path.

    The stock layer's eval-mode fast path reads ``linear1.weight`` / ``linear2.weight`` and the
    attention's fused weights; this subclass always runs the stock layer's own non-fused code
    (``_sa_block`` then ``_ff_block``, pre- or post-norm), which *calls* ``self_attn``,
    ``linear1`` and ``linear2``.  Made from an existing layer by :func:`convert` (same object,
    class changed; all attributes kept).
    """

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


def _is_stock_linear(m: nn.Module) -> bool:
    return type(m) in _STOCK_LINEAR


@torch.no_grad()
def convert(model: nn.Module, only_changed: bool = False) -> nn.Module:
    """Replace PyTorch's fused attention modules in ``model`` (in place) by equivalent ones.

    Every ``nn.MultiheadAttention`` becomes a :class:`MultiheadAttention` (separate
    ``q_proj``/``k_proj``/``v_proj`` ``nn.Linear`` layers, the same ``out_proj``); every
    ``nn.TransformerEncoderLayer`` becomes a :class:`TransformerEncoderLayer` (no fused path);
    an ``nn.TransformerEncoder`` holding converted layers stops using nested tensors.

    Parameters
    ----------
    model : nn.Module
        Modified in place (also returned).  A module registered under several names is
        replaced at every one.
    only_changed : bool
        Convert only the modules that need it: an attention whose ``out_proj`` is no longer a
        plain ``nn.Linear`` (a low-rank ``Sequential``, a sparse layer...), an encoder layer whose
        ``linear1``/``linear2`` is not a plain ``nn.Linear`` or whose ``self_attn`` was
        converted.  This is what :func:`admm_compress.export` does last.  ``False`` (use
        before training): convert all, so that the ``q``/``k``/``v`` projections become layers
        a spec can constrain.

    Returns
    -------
    nn.Module
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(only_changed, bool):
        raise TypeError(f"convert: only_changed must be a bool, got {only_changed!r}")
    from .specs import replace_module, unwrap

    root = unwrap(model)
    done: dict[int, nn.Module] = {}
    n_attn = n_layer = 0
    for name, m in list(root.named_modules(remove_duplicate=False)):
        if not name or type(m) is not nn.MultiheadAttention:
            continue
        if only_changed and _is_stock_linear(m.out_proj):
            continue
        if id(m) not in done:
            done[id(m)] = MultiheadAttention.from_torch(m)
            n_attn += 1
        replace_module(root, name, done[id(m)])
    for name, m in list(root.named_modules()):
        if type(m) is nn.TransformerEncoderLayer:
            if only_changed and _is_stock_linear(m.linear1) and _is_stock_linear(m.linear2) \
                    and isinstance(m.self_attn, nn.MultiheadAttention):
                continue
            m.__class__ = TransformerEncoderLayer
            n_layer += 1
    for m in root.modules():
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(l, TransformerEncoderLayer) for l in m.layers):
            m.use_nested_tensor = False
    if n_attn or n_layer:
        log.info("attention.convert: %d nn.MultiheadAttention and %d nn.TransformerEncoderLayer replaced by "
                 "modules that call their projections", n_attn, n_layer)
    return model


def check_binding(module: nn.Module, param_name: str, constraint, view, name: str = "") -> str | None:
    """Why export cannot realize ``constraint`` on ``module.<param_name>``, or ``None`` if it can.

    Only attention-specific reasons are checked here: a constraint on a tensor that belongs to
    the attention module itself rather than to one of its projection layers -- the fused
    projections of ``nn.MultiheadAttention`` (``in_proj_weight``, ``q/k/v_proj_weight``; fix:
    :func:`convert` before training) and ``in_proj_bias`` / ``bias_k`` / ``bias_v``.  The
    ``nn.Linear`` layers inside attention and encoder layers (``out_proj``, ``linear1``,
    ``linear2``, and ``q_proj``/``k_proj``/``v_proj`` after :func:`convert`) are exported like
    any ``nn.Linear`` (the attention module is converted at export), so they return ``None``.

    Parameters
    ----------
    module : nn.Module
    param_name : str
    constraint : Constraint
    view : View or str
    name : str, optional
        The module's name in the model, for the message.

    Returns
    -------
    str or None
        A refusal message naming the layer, the set, the view and the fix.
    """
    if not isinstance(module, (nn.MultiheadAttention, MultiheadAttention)):
        return None
    view_name = getattr(view, "name", view)
    where = f"layer '{name}'" if name else f"a {type(module).__name__} layer"
    if isinstance(module, MultiheadAttention) or param_name not in FUSED_PARAMS:
        # in_proj_bias, bias_k, bias_v: added or concatenated, not the weight of a layer
        return (f"{where} ({type(module).__module__}.{type(module).__name__}): {constraint!r} with view "
                f"{view_name!r} on '{param_name}': export builds compact layers from a layer's 'weight' "
                f"and this tensor is not one. Fix: constrain the projection layers inside it instead "
                f"(Constrain('{name + '.' if name else ''}*_proj', ...) or Constrain(nn.Linear, ...)).")
    what = ("the fused q/k/v projection (3*embed_dim x embed_dim)" if param_name == "in_proj_weight"
            else "a projection nn.MultiheadAttention hands to its fused kernel")
    return (f"{where} (nn.MultiheadAttention): {constraint!r} with view {view_name!r} on "
            f"'{param_name}', {what}: export cannot build a compact layer from it, since "
            f"nn.MultiheadAttention reads that tensor directly instead of calling a layer. Fix: call "
            f"admm_compress.attention.convert(model) before creating the solver; it replaces every "
            f"nn.MultiheadAttention by an equivalent admm_compress.attention.MultiheadAttention with "
            f"separate nn.Linear q_proj/k_proj/v_proj/out_proj layers, which a spec such as "
            f"Constrain('{name + '.' if name else ''}*_proj', ...) or Constrain(nn.Linear, ...) then "
            f"constrains and export shrinks.")


def _register_counters():
    from .complexity import register_counter

    register_counter(ScaledDotProductAttention, _core_macs, lambda m: 0)


_register_counters()
