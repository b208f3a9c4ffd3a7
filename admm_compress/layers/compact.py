"""Compact layers produced by :func:`admm_compress.export`.

Low-rank layers are exported as stock ``nn.Sequential`` pairs of ``nn.Linear`` / ``nn.ConvNd``
(nothing custom to count, trace or script).  The few custom modules here are the ones that have
no stock counterpart: sparse layers whose cost is their number of non-zeros, channel
selection/scatter for structured sparsity, and the sum of two branches (``W = L + S``).  Each
registers a MAC counter with :mod:`admm_compress.complexity`.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SparseLinear", "SparseConv1d", "SparseConv2d", "IndexSelect", "IndexScatter", "SumBranches"]


class _SparseMixin:
    """Weight kept densely with a fixed 0/1 ``mask`` buffer; the effective weight is ``weight * mask``.

    MACs are counted from ``mask.sum()`` (unstructured sparsity: what a sparse kernel would do).
    Gradients of masked entries are zero, so fine-tuning keeps the support.

    *Storage*: the state dict holds only the ``nnz`` values of ``weight * mask`` and the support in
    its smallest encoding (bitmask, COO or CSR; :mod:`admm_compress.storage`), not the dense
    weight and mask; ``load_state_dict`` restores both bit for bit (and still accepts the dense form).
    ``state_dict(keep_vars=True)`` (the live Parameters, as exporters ask for) keeps the dense form.

    *Execution*: ``kernel`` is ``"dense"`` (the stock dense op) or ``"csr"`` (a
    ``torch.sparse_csr`` matrix product; im2col via ``F.unfold`` for convolutions).
    :func:`admm_compress.select_kernels` measures both per layer and input shape and sets the
    faster one.  With autograd on (training) the effective weight is ``weight * mask`` at every
    call, so masked entries get no gradient.  Without autograd (``torch.no_grad`` /
    ``inference_mode``) in eager mode, the dense kernel uses ``weight`` itself, checked once per
    weight version to be zero off the support (the per-call product costs as much memory traffic
    as a batch-1 layer itself), and the CSR kernel a cached CSR copy of the weight.  Tracing,
    scripting, ``torch.export`` and ONNX export always see the plain ``weight * mask`` + dense op.
    """

    kernel = "dense"  # "dense" or "csr"; see select_kernels

    def _init_mask(self, mask: torch.Tensor):
        self.register_buffer("mask", mask.to(dtype=self.weight.dtype, device=self.weight.device))
        with torch.no_grad():
            self.weight.mul_(self.mask)
        self.kernel = "dense"
        self.kernel_timing = None  # set by select_kernels: {"dense_ms", "csr_ms", "input_shape"}
        self._csr_cache: tuple | None = None
        self._zero_off_support: tuple | None = None

    @property
    def nnz(self) -> int:
        return int(self.mask.count_nonzero())

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", nnz={self.nnz}/{self.weight.numel()}, kernel={self.kernel}"
        t = getattr(self, "kernel_timing", None)
        if t:
            s += f" (dense {t['dense_ms']:.3g} ms, csr {t['csr_ms']:.3g} ms)"
        return s

    # ---------------------------------------------------------------- compact state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # keep_vars=True asks for the live Parameters (the TorchScript-based ONNX exporter matches
        # graph inputs to them): only the default, saved form is compact
        if keep_vars or prefix + "weight" not in destination or prefix + "mask" not in destination:
            return
        from ..storage import encode_support

        w = destination.pop(prefix + "weight").detach()
        mask = destination.pop(prefix + "mask").detach()
        fmt, idx = encode_support(mask)
        destination[prefix + "weight_values"] = (w * mask)[mask != 0].clone()
        for key, t in idx.items():
            destination[prefix + "weight_" + key] = t.to(w.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        from ..storage import SUPPORT_KEYS, decode_support

        vkey = prefix + "weight_values"
        fmts = [f for f, keys in SUPPORT_KEYS.items() if all(prefix + "weight_" + k in state_dict for k in keys)]
        if vkey in state_dict and fmts:
            fmt = fmts[0]
            idx = {k: state_dict.pop(prefix + "weight_" + k) for k in SUPPORT_KEYS[fmt]}
            values = state_dict.pop(vkey)
            try:
                sup = decode_support(fmt, idx, tuple(self.weight.shape))
            except ValueError as e:
                error_msgs.append(f"{prefix}weight_{SUPPORT_KEYS[fmt][0]}: {e}")
                return
            k = int(sup.count_nonzero())
            if values.dim() != 1 or values.numel() != k:
                error_msgs.append(f"{vkey}: {values.numel()} values for a support of {k} entries "
                                  f"(weight shape {tuple(self.weight.shape)})")
                return
            w = torch.zeros(self.weight.shape, dtype=values.dtype, device=values.device)
            w[sup.to(values.device)] = values
            state_dict[prefix + "weight"] = w
            state_dict[prefix + "mask"] = sup.to(dtype=values.dtype, device=values.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ CSR execution
    @torch.jit.unused
    def _eager_inference(self, x: torch.Tensor) -> bool:
        """No autograd, not tracing / compiling: the cached fast paths may run."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling() or _fx_tracing():
            return False
        return True

    @torch.jit.unused
    def _key(self) -> tuple:
        w, m = self.weight, self.mask
        return (w.data_ptr(), w._version, m.data_ptr(), m._version, w.dtype)

    @torch.jit.unused
    def _inference_weight(self) -> torch.Tensor:
        """The dense effective weight without the per-call ``weight * mask``: ``weight`` itself
        once checked (per weight / mask version) to be zero off the support, which export and
        masked fine-tuning keep; ``weight * mask`` otherwise."""
        key = self._key()
        check = getattr(self, "_zero_off_support", None)
        if check is None or check[0] != key:
            ok = not bool((self.weight.detach() * (self.mask == 0)).any())
            self._zero_off_support = check = (key, ok)
        return self.weight if check[1] else self.weight * self.mask

    @torch.jit.unused
    def _csr_weight(self) -> torch.Tensor:
        """``weight * mask`` as a ``(rows, cols)`` CSR matrix, rebuilt when the weight or mask changed."""
        w, m = self.weight, self.mask
        key = self._key()
        cache = getattr(self, "_csr_cache", None)
        if cache is None or cache[0] != key:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                csr = (w.detach() * m).reshape(w.shape[0], -1).to_sparse_csr()
            self._csr_cache = cache = (key, csr)
        return cache[1]

    def __getstate__(self):  # the CSR cache is derived data: not pickled / deep-copied
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_csr_cache"] = None
        state["_zero_off_support"] = None
        return state


def _fx_tracing() -> bool:
    from torch.fx import _symbolic_trace as st

    probe = getattr(st, "is_fx_symbolic_tracing", None) or getattr(st, "is_fx_tracing", None)
    return bool(probe()) if probe is not None else False


def _csr_matmul_cols(w_csr: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``w_csr @ cols[b]`` for each ``b`` of a ``(B, K, L)`` dense tensor: ``(B, rows, L)``."""
    B, K, L = cols.shape
    if B == 1:
        return (w_csr @ cols[0]).unsqueeze(0)
    out = w_csr @ cols.transpose(0, 1).reshape(K, B * L)
    return out.reshape(-1, B, L).transpose(0, 1)


class SparseLinear(_SparseMixin, nn.Linear):
    """``nn.Linear`` with a fixed sparsity mask (cardinality-constrained weight)."""

    def __init__(self, in_features, out_features, bias=True, mask=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask(torch.ones_like(self.weight) if mask is None else mask)

    def forward(self, x):
        if not torch.jit.is_scripting():
            if self._eager_inference(x):
                if self.kernel == "csr" and x.device.type == "cpu":
                    return self._forward_csr(x)
                return F.linear(x, self._inference_weight(), self.bias)
        return F.linear(x, self.weight * self.mask, self.bias)

    @torch.jit.unused
    def _forward_csr(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = (self._csr_weight() @ x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class _SparseConvMixin(_SparseMixin):
    def forward(self, x):
        if not torch.jit.is_scripting():
            if self._eager_inference(x):
                if self.kernel == "csr" and x.device.type == "cpu" and self._csr_conv_ok():
                    return self._forward_csr(x)
                return self._conv_forward(x, self._inference_weight(), self.bias)
        return self._conv_forward(x, self.weight * self.mask, self.bias)

    @torch.jit.unused
    def _csr_conv_ok(self) -> bool:
        return self.groups == 1 and self.padding_mode == "zeros" and not isinstance(self.padding, str)

    @torch.jit.unused
    def _forward_csr(self, x: torch.Tensor) -> torch.Tensor:
        one_d = self.weight.dim() == 3
        unbatched = x.dim() == self.weight.dim() - 1
        if unbatched:
            x = x.unsqueeze(0)
        if one_d:  # a Conv1d is a Conv2d of height 1
            x = x.unsqueeze(2)
            k, s, p, d = (1, *self.kernel_size), (1, *self.stride), (0, *self.padding), (1, *self.dilation)
        else:
            k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        B, C, H, W = x.shape
        oh = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        ow = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        if k == (1, 1) and s == (1, 1) and p == (0, 0):
            cols = x.reshape(B, C, H * W)
        else:
            cols = F.unfold(x, k, dilation=d, padding=p, stride=s)
        y = _csr_matmul_cols(self._csr_weight(), cols)  # (B, out, oh * ow)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(-1)
        y = y.reshape(B, self.out_channels, ow) if one_d else y.reshape(B, self.out_channels, oh, ow)
        return y.squeeze(0) if unbatched else y


class SparseConv1d(_SparseConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with a fixed sparsity mask."""

    def __init__(self, *args, mask=None, **kw):
        super().__init__(*args, **kw)
        self._init_mask(torch.ones_like(self.weight) if mask is None else mask)


class SparseConv2d(_SparseConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with a fixed sparsity mask."""

    def __init__(self, *args, mask=None, **kw):
        super().__init__(*args, **kw)
        self._init_mask(torch.ones_like(self.weight) if mask is None else mask)


class IndexSelect(nn.Module):
    """Keep the channels ``index`` along ``dim`` (input side of a structurally pruned layer)."""

    def __init__(self, index: torch.Tensor, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x):
        return torch.index_select(x, self.dim, self.index)


class IndexScatter(nn.Module):
    """Put ``x``'s channels at positions ``index`` of a zero tensor with ``size`` channels along ``dim``.

    The output side of a layer whose output filters were pruned: the following layers see the
    original shape, with the pruned channels equal to zero (plus the bias, passed separately).
    """

    def __init__(self, index: torch.Tensor, size: int, dim: int = 1, bias: torch.Tensor | None = None):
        """``bias``: added to the scattered output; shaped to broadcast against it (``(C,)`` for
        ``dim=-1``, ``(C, 1, 1)`` for a Conv2d output with ``dim=1``)."""
        super().__init__()
        self.dim = dim
        self.size = int(size)
        index = index.to(torch.long)
        self.register_buffer("index", index)
        # gather map: output channel j reads input channel gather[j]; pruned channels read the
        # appended zero channel (index len(index)).  A gather, not a scatter into a new tensor,
        # so the module traces with torch.fx and scripts with TorchScript (no shape arithmetic).
        gather = torch.full((self.size,), index.numel(), dtype=torch.long, device=index.device)
        gather[index] = torch.arange(index.numel(), device=index.device)
        self.register_buffer("gather", gather)
        if bias is not None:
            # added to the output as is: shape it to broadcast, e.g. (C, 1, 1) for a Conv2d output
            if bias.shape[0] != self.size:
                raise ValueError(f"IndexScatter: bias has {bias.shape[0]} entries along its first "
                                 f"dimension, expected size={self.size}")
            self.register_buffer("fill", bias.detach().clone())
        else:
            self.fill = None

    def forward(self, x):
        zero = x.narrow(self.dim, 0, 1) * 0
        out = torch.index_select(torch.cat([x, zero], self.dim), self.dim, self.gather)
        if self.fill is not None:
            out = out + self.fill
        return out


class SumBranches(nn.Module):
    """``y = a(x) + b(x)``: the layer of a weight ``W = L + S`` (one branch per component)."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x):
        return self.a(x) + self.b(x)


# ------------------------------------------------------------------ cost counters (ptflops "pytorch")
def _sparse_macs(module, inputs, output) -> int:
    """Each output element of output channel/feature ``o`` costs ``nnz(W[o])`` MACs, plus one for
    the bias (ptflops' convention for dense layers), so a dense mask gives the stock count."""
    per_out = output.numel() // output.shape[1 if isinstance(module, nn.modules.conv._ConvNd) else -1]
    nnz_rows = module.mask.reshape(module.mask.shape[0], -1).count_nonzero(dim=1)  # per output channel
    macs = int(nnz_rows.sum()) * per_out
    if module.bias is not None:
        macs += output.numel()
    return macs


def _sparse_params(module) -> int:
    return module.nnz + (module.bias.numel() if module.bias is not None else 0)


def _zero_macs(module, inputs, output) -> int:
    return 0


def _scatter_macs(module, inputs, output) -> int:
    return output.numel() if module.fill is not None else 0


def register_counters() -> None:
    """Teach :func:`admm_compress.complexity` these layers' MACs and parameters (called once by
    :mod:`admm_compress.layers`)."""
    from ..complexity import register_counter

    for cls in (SparseLinear, SparseConv1d, SparseConv2d):
        register_counter(cls, _sparse_macs, _sparse_params)
    register_counter(IndexSelect, _zero_macs, lambda m: 0)
    # the scattered bias (``fill``) is the layer's bias: its numbers are parameters and adding it
    # costs one MAC per output element (ptflops' convention for a dense layer's bias)
    register_counter(IndexScatter, _scatter_macs, lambda m: m.fill.numel() if m.fill is not None else 0)

