"""Turn a constrained model into a model of real, smaller layers.

``export(model, spec)`` resolves the spec, asks each constraint for the compact factors of its
(already feasible, or projected here) weight through ``set.factorize`` and swaps the module for
the compact one:

==================  =====================  ==============================================
constraint          view                   exported module
==================  =====================  ==============================================
LowRank/SchattenP   Linear ``(out, in)``   ``Linear(in, r, bias=False)`` -> ``Linear(r, out)``
LowRank/SchattenP   conv ``"channel"``     ``kh x kw`` conv in->r (stride, padding, dilation of
                                           the original, no bias) -> ``1 x 1`` conv r->out (bias)
                                           (LRPET Sec. III-E; LoRITa; Decomposable-Net "channel")
LowRank/SchattenP   conv2d ``"spatial"``   ``1 x kw`` conv in->r (horizontal stride/padding) ->
                                           ``kh x 1`` conv r->out (vertical stride/padding, bias)
                                           (Jaderberg et al. 2014; Decomposable-Net "spatial")
Cardinality         any                    ``SparseLinear`` / ``SparseConv*d`` (mask buffer, MACs
                                           = non-zeros); ``group_dim=0`` on conv/linear: fewer
                                           output filters + ``IndexScatter``; ``group_dim=1``:
                                           ``IndexSelect`` + fewer input channels
Sum(a, b)           any                    ``SumBranches(export_a, export_b)`` (bias in one branch)
TTRank              ``TTView.oki()``       3 stock convs / 2 Linears (:func:`admm_compress.layers.tt.tt_oki_modules`)
TTRank              ``TTView`` (eq9)       :class:`admm_compress.layers.tt.TTConv2d` / ``TTLinear``
==================  =====================  ==============================================

After the swap, :func:`admm_compress.channels.remove_channels` deletes what structured sparsity
left dead in the neighbours (the filters and BatchNorm entries behind pruned input channels, the
inputs behind pruned filters) wherever that is exact; ``remove_channels=False`` keeps the
per-layer ``IndexSelect`` / ``IndexScatter`` form.
A layer whose compact form would store more numbers than the dense one stays dense (logged).
New exporters are added with :func:`register_exporter`.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import functional as F
from .channels import remove_channels as _remove_channels
from .layers import IndexScatter, IndexSelect, SparseConv1d, SparseConv2d, SparseLinear, SumBranches
from .sets import Cardinality, LowRank, SchattenP, Sum
from .sets.base import Constraint
from .specs import resolve, unwrap
from .parametrizations import additive_components
from .views import MATRIX_VIEWS, IdentityView, InputChannelView, MatrixView, SpatialView, View
from .layers import tt as _tt

__all__ = ["export", "register_exporter", "build_compact", "ExportError"]

log = logging.getLogger(__name__)

Exporter = Callable[[nn.Module, Constraint, View, Any, bool], "nn.Module | None"]
_EXPORTERS: list[tuple[Callable[[Constraint, View], bool], Exporter]] = []


class ExportError(ValueError):
    """A constrained layer that cannot be exported as asked."""


def register_exporter(matches: Callable[[Constraint, View], bool], build: Exporter, first: bool = True) -> None:
    """Add an exporter: ``build(module, constraint, view, factors, with_bias) -> module or None``.

    ``None`` means "keep this layer dense".  ``first=True`` gives it priority over the built-ins.
    """
    if first:
        _EXPORTERS.insert(0, (matches, build))
    else:
        _EXPORTERS.append((matches, build))


# ----------------------------------------------------------------- helpers
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_cls(m: nn.Module):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[m.weight.dim() - 2]


def _explicit_padding(m: nn.Module) -> tuple[int, ...] | None:
    """Numeric padding of a conv (``'same'`` converted when symmetric), or None."""
    p = m.padding
    nd = m.weight.dim() - 2
    if isinstance(p, str):
        if p == "valid":
            return (0,) * nd
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return tuple(p)


def _factory(m: nn.Module) -> dict:
    return {"device": m.weight.device, "dtype": m.weight.dtype}


def _bias(m: nn.Module, with_bias: bool):
    b = getattr(m, "bias", None)
    return b if (with_bias and b is not None) else None


def _dense_numel(m: nn.Module) -> int:
    return m.weight.numel()


# ------------------------------------------------------------ low rank
def _factor_pair(factors):
    """``(U, V)`` of a low-rank split, a rank-0 pair as rank 1 with zero factors; ``None`` when the
    pair is not smaller than the dense matrix (the layer stays dense)."""
    U, V = factors
    rows, cols = U.shape[-2], V.shape[-1]
    if U.shape[-1] == 0:
        U, V = U.new_zeros(rows, 1), V.new_zeros(1, cols)
    r = U.shape[-1]
    return None if r * (rows + cols) >= rows * cols else (U, V)


def _linear_pair(m: nn.Linear, U: torch.Tensor, V: torch.Tensor, bias) -> nn.Sequential:
    """``Linear(in, r, no bias)`` with weight ``V`` then ``Linear(r, out)`` with weight ``U`` (and
    the bias): the factored Linear of every low-rank split."""
    r, fk = U.shape[-1], _factory(m)
    first = nn.Linear(m.in_features, r, bias=False, **fk)
    second = nn.Linear(r, m.out_features, bias=bias is not None, **fk)
    with torch.no_grad():
        first.weight.copy_(V)
        second.weight.copy_(U)
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)


def _is_lowrank(c: Constraint, v: View) -> bool:
    # "identity" reaches here only for 2-D (Linear) weights: exportable.refusal rejects it on convs
    return isinstance(c, (LowRank, SchattenP)) and isinstance(v, MATRIX_VIEWS)


def _export_lowrank(m: nn.Module, c: Constraint, v: View, factors, with_bias: bool):
    pair = _factor_pair(factors)  # (m, r), (r, n) with U @ V = the low-rank view of the weight
    if pair is None:
        return None
    U, V = pair
    r = U.shape[-1]
    bias = _bias(m, with_bias)
    fk = _factory(m)
    if isinstance(m, nn.Linear):
        return _linear_pair(m, U, V, bias)
    if not isinstance(m, _CONV):
        raise ExportError(f"low-rank export supports nn.Linear and nn.Conv1d/2d/3d, got {type(m).__name__}")
    if m.groups != 1:
        raise ExportError(f"low-rank export of a grouped convolution (groups={m.groups}) is not supported")
    if m.padding_mode != "zeros" and isinstance(v, SpatialView):
        return None
    Conv = _conv_cls(m)
    out_c, in_c = m.out_channels, m.in_channels
    k = tuple(m.kernel_size)
    if isinstance(v, MatrixView):  # "matrix" / "channel": (out, in*k...)
        first = Conv(in_c, r, k, stride=m.stride, padding=m.padding, dilation=m.dilation, bias=False,
                     padding_mode=m.padding_mode, **fk)
        second = Conv(r, out_c, 1, bias=bias is not None, **fk)
        with torch.no_grad():
            first.weight.copy_(V.reshape(r, in_c, *k))
            second.weight.copy_(U.reshape(out_c, r, *([1] * len(k))))
            if bias is not None:
                second.bias.copy_(bias)
        return nn.Sequential(first, second)
    # spatial: rows (o, y), cols (i, x); W[o, i, y, x] = sum_r U[(o, y), r] V[r, (i, x)]
    pad = _explicit_padding(m)
    if pad is None:
        return None
    kh, kw = k
    (sh, sw), (dh, dw), (ph, pw) = m.stride, m.dilation, pad
    first = nn.Conv2d(in_c, r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), bias=False, **fk)
    second = nn.Conv2d(r, out_c, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                       bias=bias is not None, **fk)
    with torch.no_grad():
        first.weight.copy_(V.reshape(r, in_c, kw).unsqueeze(2))
        second.weight.copy_(U.reshape(out_c, kh, r).permute(0, 2, 1).unsqueeze(-1))
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)


# ---------------------------------------------------------- cardinality
def _is_sparse(c: Constraint, v: View) -> bool:
    return isinstance(c, Cardinality)


def _export_sparse(m: nn.Module, c: Cardinality, v: View, factors, with_bias: bool):
    shape = tuple(m.weight.shape)
    dense = c.reconstruct(factors, tuple(v.viewed_shape(shape)))
    w = v.back(dense, shape)
    bias = _bias(m, with_bias)
    fk = _factory(m)
    if c.group_dim is None:
        mask = (w != 0)
        if isinstance(m, nn.Linear):
            new = SparseLinear(m.in_features, m.out_features, bias=bias is not None, mask=mask, **fk)
        elif isinstance(m, nn.Conv2d):
            new = SparseConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                               dilation=m.dilation, groups=m.groups, bias=bias is not None,
                               padding_mode=m.padding_mode, mask=mask, **fk)
        elif isinstance(m, nn.Conv1d):
            new = SparseConv1d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                               dilation=m.dilation, groups=m.groups, bias=bias is not None,
                               padding_mode=m.padding_mode, mask=mask, **fk)
        else:
            raise ExportError(f"sparse export supports Linear, Conv1d, Conv2d; got {type(m).__name__}")
        with torch.no_grad():
            new.weight.copy_(w * mask)
            if bias is not None:
                new.bias.copy_(bias)
        return new
    # structured: whole output filters (dim 0) or input channels (dim 1) of the *weight*
    if not isinstance(v, (IdentityView, MatrixView)) or c.group_dim not in (0, 1):
        raise ExportError(f"structured sparse export needs group_dim 0 or 1 on the weight itself, got "
                          f"group_dim={c.group_dim} with view {v.name!r}")
    if isinstance(m, _CONV) and m.groups != 1:
        raise ExportError(f"structured sparse export of a grouped convolution (groups={m.groups}) is not supported")
    flat = w.reshape(shape[0], -1) if c.group_dim == 0 else w.transpose(0, 1).reshape(shape[1], -1)
    keep = torch.nonzero(flat.abs().sum(1) > 0).flatten()
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=w.device)
    sub = torch.index_select(w, c.group_dim, keep)
    new = copy.deepcopy(m)
    if parametrize.is_parametrized(new):
        raise ExportError("structured export of a parametrized module")
    with torch.no_grad():
        new.weight = nn.Parameter(sub.clone())
        if c.group_dim == 0:
            # kept filters only; the bias of *all* output channels (a pruned filter still outputs
            # its bias) is added once, after the scatter back to the original channel count.
            if isinstance(m, nn.Linear):
                new.out_features = keep.numel()
            else:
                new.out_channels = keep.numel()
            new.bias = None
            fill = None
            if bias is not None:
                fill = bias.detach().reshape(-1, *([1] * (w.dim() - 2))) if isinstance(m, _CONV) else bias.detach()
            return nn.Sequential(new, IndexScatter(keep, shape[0], dim=-1 if isinstance(m, nn.Linear) else 1,
                                                   bias=fill))
        if isinstance(m, nn.Linear):
            new.in_features = keep.numel()
        else:
            new.in_channels = keep.numel()
        if bias is None:
            new.bias = None
        return nn.Sequential(IndexSelect(keep, dim=1 if not isinstance(m, nn.Linear) else -1), new)


# ------------------------------------------------------------------- sum
def _is_sum(c: Constraint, v: View) -> bool:
    return isinstance(c, Sum)


def _export_sum(m: nn.Module, c: Sum, v: View, factors, with_bias: bool):
    fa, fb = factors
    a = build_compact(m, c.sets[0], v, fa, with_bias=False) or _dense_from(m, c.sets[0], v, fa, False)
    b = build_compact(m, c.sets[1], v, fb, with_bias=with_bias) or _dense_from(m, c.sets[1], v, fb, with_bias)
    return SumBranches(a, b)


def _dense_from(m: nn.Module, c: Constraint, v: View, factors, with_bias: bool) -> nn.Module:
    """A copy of ``m`` whose weight is the reconstruction of ``factors`` (dense fallback)."""
    new = copy.deepcopy(m)
    shape = tuple(m.weight.shape)
    with torch.no_grad():
        new.weight.copy_(v.back(c.reconstruct(factors, tuple(v.viewed_shape(shape))), shape))
        if not with_bias and getattr(new, "bias", None) is not None:
            new.bias = None
    return new


# ------------------------------------------------------------ low rank, input-channel split
def _is_input_channel_lowrank(c, v) -> bool:
    return isinstance(c, (LowRank, SchattenP)) and isinstance(v, InputChannelView)


def _export_input_channel(m: nn.Module, c, v, factors, with_bias: bool):
    """1x1 conv ``I -> r`` then the ``k``-sized conv ``r -> O`` (Linear: two Linears)."""
    pair = _factor_pair(factors)  # (O prod(k), r), (r, I)
    if pair is None:
        return None
    U, V = pair
    r = U.shape[-1]
    bias = _bias(m, with_bias)
    fk = _factory(m)
    if isinstance(m, nn.Linear):
        return _linear_pair(m, U, V, bias)
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if type(m) not in convs:
        raise ExportError(f"input_channel low-rank export supports nn.Linear and nn.Conv1d/2d/3d, got "
                          f"{type(m).__name__}")
    if m.groups != 1:
        raise ExportError(f"input_channel low-rank export of a grouped convolution (groups={m.groups}) "
                          f"is not supported")
    Conv = type(m)
    O, I, *k = m.weight.shape
    first = Conv(I, r, 1, bias=False, **fk)
    second = Conv(r, O, tuple(k), stride=m.stride, padding=m.padding, dilation=m.dilation,
                  bias=bias is not None, padding_mode=m.padding_mode, **fk)
    nd = m.weight.dim()
    with torch.no_grad():
        first.weight.copy_(V.reshape(r, I, *([1] * len(k))))
        second.weight.copy_(U.reshape(O, *k, r).permute(0, nd - 1, *range(1, nd - 1)))
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)


_BUILTIN = (_export_lowrank, _export_sparse, _export_sum)
register_exporter(_is_lowrank, _export_lowrank, first=False)
register_exporter(_is_sparse, _export_sparse, first=False)
register_exporter(_is_sum, _export_sum, first=False)
register_exporter(_tt.is_tt, _tt.export_tt, first=False)
register_exporter(_is_input_channel_lowrank, _export_input_channel, first=False)


def build_compact(m: nn.Module, c: Constraint, v: View, factors, with_bias: bool = True) -> nn.Module | None:
    """The compact module for ``m`` given its constraint, view and factors (None: stay dense)."""
    for matches, build in _EXPORTERS:
        if matches(c, v):
            return build(m, c, v, factors, with_bias)
    raise ExportError(f"no exporter for {type(c).__name__} with view {v.name!r} on {type(m).__name__}; "
                      f"register one with admm_compress.export.register_exporter")


def _spec_of(spec):
    """The specs to export: a compressor's :meth:`export_spec`, or the spec itself."""
    export_spec = getattr(spec, "export_spec", None)
    if callable(export_spec):
        return export_spec()
    return spec


def _pin_data_rule(b) -> Constraint | None:
    """``LowRank(rank=k)`` for a weight under a data-dependent rank rule (``energy=``), or None.

    The rule is not idempotent (applied to its own output it may cut again), so export must not
    re-select: it keeps the weight's numerical rank ``k`` when the rule keeps all of it (the weight
    is a fixed point, :meth:`LowRank.contains`), and refuses otherwise.
    """
    c = b.constraint
    if getattr(c, "sized_at_export", False):
        raise ExportError(f"layer '{b.name}': {c!r} is a placeholder whose rank is chosen at export; "
                          f"export through the compressor (ac.export(model, solver) or "
                          f"solver.export(model, ...)), which picks the size")
    if not (isinstance(c, LowRank) and c.energy is not None):
        if isinstance(c, Sum) and any(isinstance(s, LowRank) and s.energy is not None for s in c.sets):
            raise ExportError(f"layer '{b.name}': {c!r} has a component that selects its rank from the "
                              f"data; export it with the solver that trained it (solver.export(model) or "
                              f"ac.export(model, solver)), or pin the rank with LowRank(rank=k)")
        return None
    v = b.to_view(b.param.detach())
    if not c.contains(v):
        raise ExportError(f"layer '{b.name}': {c!r} selects the rank from the data and this weight is "
                          f"not a fixed point of the rule (applying it again would cut further), so "
                          f"the rank training selected is unknown here; export with the solver that "
                          f"trained it (solver.export(model) or ac.export(model, solver)), or pin the "
                          f"rank with LowRank(rank=k)")
    return LowRank(rank=F.numerical_rank(v))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module ``name`` is, under every name it is registered at.

    A module held at several attributes (``self.a = self.b = nn.Linear(...)``) is listed once
    by ``named_modules()``; replacing it at one name only would leave the others dense.
    """
    old = root.get_submodule(name)
    names = [n for n, m in root.named_modules(remove_duplicate=False) if m is old and n] or [name]
    for n in names:
        parent_name, _, attr = n.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, new)


@torch.no_grad()
def export(model: nn.Module, spec, inplace: bool = False, remove_channels: bool = True, *,
           latency_aware: bool = False, example_inputs=None) -> nn.Module:
    """A model whose constrained layers are replaced by compact ones.

    Parameters
    ----------
    model : nn.Module
        The trained model (a DDP wrapper is unwrapped).  Weights that are not exactly feasible
        are projected first (``factorize`` projects), so the exported model equals the
        *projected* dense model.
    spec : Constrain, list of Constrain, or a compressor (a Solver or a method)
        A compressor is exported through its :meth:`export_spec` -- what its training selected
        (TRP's and LoRITa's kept ranks, Decomposable-Net's configured size), so
        ``export(model, solver)`` equals ``solver.export(model)``.  A plain spec whose rule
        picks the rank from the data (``LowRank(energy=...)``) is exported at the numerical
        rank of the (finalized) weight when the rule keeps all of it, and refused otherwise:
        re-applying the rule to a truncated weight would cut again.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.
    remove_channels : bool
        After structured-sparsity export, also delete the dead channels of the neighbouring
        layers (the producer's filters and BatchNorm entries behind a pruned input channel; the
        consumer's inputs behind a pruned filter) where that is exact, see
        :func:`admm_compress.channels.remove_channels`.  ``False`` keeps every layer's
        ``IndexSelect`` / ``IndexScatter`` form.
    latency_aware : bool
        After the export, time each replaced layer against the dense layer holding the same
        (constrained) weight on its real input and keep the dense one where it is faster; sparse
        layers first get their faster kernel.  See :func:`admm_compress.deploy.keep_faster` (the
        per-layer report is logged).  Needs ``example_inputs``; not with ``inplace=True``.
    example_inputs : Tensor or tuple of Tensor
        A deployment-sized input for ``latency_aware``.

    Returns
    -------
    nn.Module
        In eval/train mode as the input; parametrizations (LoRITa factors, fine-tuning
        structure) are collapsed first.
    """
    if not isinstance(model, nn.Module):
        hint = (" (a state_dict? build the model and call model.load_state_dict(...) first)"
                if isinstance(model, dict) else "")
        raise TypeError(f"export: model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    if not isinstance(inplace, bool):
        raise TypeError(f"export: inplace must be a bool, got {inplace!r}")
    if not isinstance(remove_channels, bool):
        raise TypeError(f"export: remove_channels must be a bool, got {remove_channels!r}")
    if latency_aware is not False:
        example_inputs = _check_latency_args(latency_aware, inplace, example_inputs)
    spec = _spec_of(spec)
    src = unwrap(model)
    out = src if inplace else copy.deepcopy(src)
    if not inplace:
        # deepcopy shares the dynamic ``Parametrized<Module>`` class with the source; removing a
        # parametrization from the copy would delete the property from that shared class and
        # break the source.  Give every parametrized copy a class of its own.
        for mod in out.modules():
            if parametrize.is_parametrized(mod):
                cls = type(mod)
                mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    bindings = resolve(spec, out)
    pinned = {b.key: _pin_data_rule(b) for b in bindings}
    factors_of = {}
    for b in bindings:
        if b.param_name != "weight":
            raise ExportError(f"layer '{b.name}': export builds layers from 'weight', not '{b.param_name}'")
        comps = additive_components(b.module, b.param_name)
        if comps is not None and isinstance(b.constraint, Sum):  # W = L + S: factor each component
            factors_of[b.key] = b.constraint.factorize(tuple(b.to_view(t.detach()) for t in comps))
    for name, mod in list(out.named_modules()):  # collapse LoRITa factors, fine-tuning structure, L + S
        if parametrize.is_parametrized(mod):
            for p in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, p, leave_parametrized=True)
    for b in bindings:
        c = pinned[b.key] or b.constraint
        factors = factors_of.get(b.key)
        if factors is None:
            factors = c.factorize(b.to_view(b.param.detach()))
        new = build_compact(b.module, c, b.view, factors, with_bias=True)
        if new is None:
            log.warning("layer '%s' stays dense: its compact form (%r) would not be smaller", b.name, c)
            with torch.no_grad():  # still the projected weight, so outputs match the projected model
                b.module.weight.copy_(b.view.back(c.reconstruct(factors, b.viewed_shape), b.shape))
            continue
        new.train(b.module.training)
        _set_submodule(out, b.name, new)
    from .attention import convert as _convert_attention  # fused attention reads weights: see attention.py

    _convert_attention(out, only_changed=True)
    if remove_channels:
        n = _remove_channels(out)
        if n:
            log.info("removed the pruned channels of %d neighbouring layer pair(s)", n)
    if latency_aware:
        from .deploy import keep_faster

        keep_faster(out, model, spec, *example_inputs)
    return out


def _check_latency_args(latency_aware, inplace: bool, example_inputs) -> tuple:
    if not isinstance(latency_aware, bool):
        raise TypeError(f"export: latency_aware must be a bool, got {latency_aware!r}")
    if inplace:
        raise ValueError("export: latency_aware=True needs inplace=False (the dense layers are rebuilt from "
                         "the original model)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ValueError(f"export: latency_aware=True needs example_inputs (a tensor or a tuple of tensors), "
                         f"got {type(example_inputs).__name__}")
    return tuple(example_inputs)
