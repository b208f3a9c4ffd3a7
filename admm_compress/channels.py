"""Cross-layer channel removal after structured-sparsity export (exact, graph-based).

Exporting a weight with structured sparsity (``Cardinality(group_dim=0 | 1)``) shrinks only that
layer: pruned output filters are scattered back as constant channels (:class:`IndexScatter`),
pruned input channels are dropped by an :class:`IndexSelect` in front of the layer, so the
neighbours still produce or read every channel.  :func:`remove_channels` finds, with a
:mod:`torch.fx` trace, the chains

    producer -> [IndexScatter] -> links -> [IndexSelect] -> consumer

in which every value is used exactly once (no residual add, no concatenation, no module reuse).
Links are BatchNorm (running statistics), element-wise activations, dropout and per-channel
pooling (max, adaptive, average).  In the channel space between the two
layers the producer makes ``avail`` channels (all, or its kept filters) and the consumer reads
``read`` (all, or its selected inputs):

* ``avail & read`` survive: the producer's filters, the BatchNorm entries and the consumer's
  input columns of every other channel are deleted;
* ``avail - read`` (made, never read) simply disappear;
* ``read - avail`` are constants ``c_j`` (the producer's bias pushed through the links).  If all
  are 0 they disappear too; otherwise ``sum_k W[:, j, k] * c_j`` is folded into the consumer's
  bias, which is exact for a Linear consumer or a convolution without padding (a padded
  convolution sees the constant only partly at the borders: that chain is left as is, logged).

The result computes the same function in eval mode (and, when no constant is folded, in train
mode too: BatchNorm is per channel).  Producers and consumers are stock ``nn.Linear`` /
``nn.Conv1d/2d/3d`` (``groups == 1``) or the masked :class:`SparseLinear` /
:class:`SparseConv*`; a low-rank pair exported as ``nn.Sequential`` takes part through its last
(producer) or first (consumer) layer.  Anything else in the chain (flatten, LayerNorm, a custom
module) stops it: the layer keeps its scatter/select form, which is correct, only less compact.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import IndexScatter, IndexSelect, SparseConv1d, SparseConv2d, SparseLinear, SumBranches
from .specs import replace_module

__all__ = ["remove_channels"]

log = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER = (nn.Linear, *_CONV)  # SparseLinear / SparseConv* are subclasses
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                        nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
                        nn.Identity)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
                          F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
                          F.hardtanh, F.softplus, F.dropout, torch.nn.functional.dropout1d,
                          torch.nn.functional.dropout2d}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
# per-channel pooling that maps a constant channel to the same constant
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}


class _Tracer(fx.Tracer):
    """Stock leaves plus the library's compact layers (their internals are not channel chains)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (IndexSelect, IndexScatter, SparseLinear, SparseConv1d, SparseConv2d, SumBranches)):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class _Chain:
    producer: str              # module name of the producing layer
    scatter: str | None        # its IndexScatter (pruned filters), if any
    links: list[fx.Node]       # BN / element-wise nodes between producer and consumer, in order
    select: str | None         # the consumer's IndexSelect (pruned input channels), if any
    consumer: str              # module name of the consuming layer


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, _LAYER) and getattr(m, "groups", 1) == 1 and not hasattr(m, "parametrizations")


def _link_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'bn', 'dropout', 'ew' (element-wise), 'pool' (per-channel, keeps constants), 'pool-zero'
    (per-channel, keeps only a zero constant) or None (the chain stops here)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _BatchNorm):
            return "bn" if m.running_mean is not None else None
        if isinstance(m, _DROPOUT):
            return "dropout"
        if isinstance(m, _ELEMENTWISE_MODULES):
            return "ew"
        if isinstance(m, _POOL_MODULES) and not getattr(m, "return_indices", False):
            return "pool"
        if isinstance(m, _AVG_POOL_MODULES):
            # zero padding counted in the average changes a constant at the borders
            pads = m.padding if isinstance(m.padding, tuple) else (m.padding,)
            exact = not m.count_include_pad or (all(p == 0 for p in pads) and not m.ceil_mode)
            return "pool" if exact and m.divisor_override is None else "pool-zero"
        return None
    rest = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(a, fx.Node) for a in rest) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS and not node.kwargs.get("return_indices"):
        return "pool"
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return "dropout" if "dropout" in getattr(node.target, "__name__", "") else "ew"
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return "ew"
    return None


def _input(node: fx.Node) -> fx.Node | None:
    a = node.args[0] if node.args else None
    return a if isinstance(a, fx.Node) else None


def _find_chains(gm: fx.GraphModule) -> list[_Chain]:
    """``producer -> [IndexScatter] -> links -> [IndexSelect] -> consumer``, each value used once."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def only_user(node: fx.Node) -> fx.Node | None:
        if len(node.users) != 1:
            return None
        nxt = next(iter(node.users))
        return nxt if _input(nxt) is node else None

    def module_node(node: fx.Node | None, kinds) -> bool:
        return (node is not None and node.op == "call_module" and calls[node.target] == 1
                and isinstance(modules[node.target], kinds))

    chains = []
    for node in gm.graph.nodes:
        if not module_node(node, _LAYER) or not _is_layer(modules[node.target]):
            continue
        cur, scatter, links, select = only_user(node), None, [], None
        if module_node(cur, IndexScatter):
            scatter, cur = cur.target, only_user(cur)
        while cur is not None and not module_node(cur, (IndexSelect, *_LAYER)):
            kind = _link_kind(cur, modules)
            if kind is None or (kind == "bn" and calls[cur.target] != 1):  # a shared BN serves others too
                cur = None
                break
            links.append(cur)
            cur = only_user(cur)
        if module_node(cur, IndexSelect):
            select, cur = cur.target, only_user(cur)
        if (cur is None or (scatter is None and select is None) or not module_node(cur, _LAYER)
                or not _is_layer(modules[cur.target])):
            continue
        chains.append(_Chain(node.target, scatter, links, select, cur.target))
    return chains


def _channel_dim_ok(producer: nn.Module, consumer: nn.Module, markers) -> bool:
    """Both layers see channels on the same axis: conv -> conv on dim 1, linear -> linear on dim -1."""
    if isinstance(producer, _CONV) and isinstance(consumer, _CONV):
        return all(m.dim == 1 for m in markers)
    if isinstance(producer, nn.Linear) and isinstance(consumer, nn.Linear):
        return all(m.dim == -1 for m in markers)
    return False


def _slice(layer: nn.Module, dim: int, keep: torch.Tensor) -> None:
    """Keep the output (``dim=0``: rows, bias) or input (``dim=1``) channels ``keep`` of a layer."""
    layer.weight = nn.Parameter(layer.weight.detach().index_select(dim, keep).clone(),
                                requires_grad=layer.weight.requires_grad)
    if dim == 0 and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach().index_select(0, keep).clone(),
                                  requires_grad=layer.bias.requires_grad)
    if hasattr(layer, "mask"):
        layer.mask = layer.mask.index_select(dim, keep).clone()
    linear = isinstance(layer, nn.Linear)
    attr = ("out_features" if linear else "out_channels") if dim == 0 else ("in_features" if linear else "in_channels")
    setattr(layer, attr, keep.numel())


def _slice_bn(bn: _BatchNorm, keep: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            setattr(bn, name, nn.Parameter(p.detach().index_select(0, keep).clone(), requires_grad=p.requires_grad))
    bn.running_mean = bn.running_mean.index_select(0, keep).clone()
    bn.running_var = bn.running_var.index_select(0, keep).clone()
    bn.num_features = keep.numel()


def _run_links(links: list[fx.Node], modules: dict[str, nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The links applied to ``x`` in eval mode (BatchNorm with running statistics, no dropout)."""
    for node in links:
        if _link_kind(node, modules) in ("pool", "pool-zero"):  # a constant (resp. 0) maps to itself
            continue
        if node.op == "call_module":
            m = modules[node.target]
            was = m.training
            m.eval()
            try:
                x = m(x)
            finally:
                m.train(was)
        elif node.op == "call_function":
            if "dropout" in getattr(node.target, "__name__", ""):
                continue
            x = node.target(x, *node.args[1:], **node.kwargs)
        else:
            x = getattr(x, node.target)(*node.args[1:], **node.kwargs)
    return x


def _unpadded(conv: nn.Module) -> bool:
    p = conv.padding
    if isinstance(p, str):
        return p == "valid" or all(k == 1 for k in conv.kernel_size)
    return all(int(v) == 0 for v in p)


def _shared_tensors(root: nn.Module) -> set[int]:
    """ids of parameters/buffers registered under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, t in (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)):
        seen[id(t)] = seen.get(id(t), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _positions(index: torch.Tensor, size: int) -> torch.Tensor:
    """``pos[j]`` = where channel ``j`` sits in ``index`` (``-1``: not in it)."""
    pos = torch.full((size,), -1, dtype=torch.long, device=index.device)
    pos[index] = torch.arange(index.numel(), device=index.device)
    return pos


def _apply(gm: fx.GraphModule, root: nn.Module, ch: _Chain) -> str | None:
    """Remove the channels of one chain in place; returns a reason when it cannot be exact.

    In the full channel space (``size`` channels between the two layers): the producer makes
    ``avail`` (all, or the scatter's kept filters), the consumer reads ``read`` (all, or its
    select).  The channels ``K = avail & read`` survive; ``read - avail`` are constants, folded
    into the consumer's bias or, when zero, dropped; ``avail - read`` are never read.
    """
    modules = dict(gm.named_modules())
    producer, consumer = modules[ch.producer], modules[ch.consumer]
    scatter = modules[ch.scatter] if ch.scatter else None
    select = modules[ch.select] if ch.select else None
    links = [modules[n.target] for n in ch.links if n.op == "call_module"]
    shared = _shared_tensors(root)
    if any(id(t) in shared for m in (producer, consumer, *links) for t in (*m.parameters(), *m.buffers())):
        return "a weight or buffer of the chain is shared with another module (tied)"
    if not _channel_dim_ok(producer, consumer, [m for m in (scatter, select) if m is not None]):
        return "producer and consumer do not share a channel axis"
    size = scatter.size if scatter is not None else producer.weight.shape[0]
    bns = [modules[n.target] for n in ch.links if n.op == "call_module" and isinstance(modules[n.target], _BatchNorm)]
    if any(bn.num_features != size for bn in bns):
        return "a BatchNorm in the chain does not match the channel count"
    dev = producer.weight.device
    avail_pos = _positions(scatter.index, size) if scatter is not None else torch.arange(size, device=dev)
    read_pos = _positions(select.index, size) if select is not None else torch.arange(size, device=dev)
    if consumer.weight.shape[1] != (select.index.numel() if select is not None else size):
        return "the consumer's inputs do not match the channel count"
    keep = torch.nonzero((avail_pos >= 0) & (read_pos >= 0)).flatten()          # K, full-space ids
    const_ids = torch.nonzero((avail_pos < 0) & (read_pos >= 0)).flatten()      # read constants
    if keep.numel() == 0:
        return "no channel made by the producer is read by the consumer (zero-width layers are not built)"
    fill = None
    if scatter is not None:
        ref = producer.weight
        fill = (scatter.fill.reshape(size) if scatter.fill is not None
                else ref.new_zeros(size)).to(dtype=ref.dtype, device=ref.device)
    contrib = None
    if const_ids.numel():
        shape = (1, size) + ((1,) * (producer.weight.dim() - 2) if isinstance(producer, _CONV) else ())
        with torch.no_grad():
            c = _run_links(ch.links, modules, fill.reshape(shape)).reshape(size)[const_ids]
        if bool((c != 0).any()):
            kinds = {_link_kind(n, modules) for n in ch.links}
            if "dropout" in kinds:
                return "non-zero pruned channels pass a dropout"
            if "pool-zero" in kinds:
                return "non-zero pruned channels pass an average pooling that counts its zero padding"
            if isinstance(consumer, _CONV) and not _unpadded(consumer):
                return ("pruned channels are non-zero constants and the consumer convolution pads "
                        "(folding them into its bias would be wrong at the borders)")
            w = consumer.weight.detach()
            if hasattr(consumer, "mask"):
                w = w * consumer.mask
            cols = w.index_select(1, read_pos[const_ids])
            contrib = cols.reshape(w.shape[0], const_ids.numel(), -1).sum(-1) @ c
            if not bool((contrib != 0).any()):
                contrib = None  # the constants meet zero columns: nothing to fold
            elif consumer.bias is None and int(cols.count_nonzero()) < w.shape[0]:
                # a new bias costs one add per output; the removed inputs must pay for it
                return ("folding the pruned constants would add a bias costing more MACs than the "
                        "removed inputs save")
    # --- everything checked: modify
    with torch.no_grad():
        if contrib is not None:
            if consumer.bias is None:
                consumer.bias = nn.Parameter(contrib.clone(), requires_grad=consumer.weight.requires_grad)
            else:
                consumer.bias.add_(contrib)
        if scatter is not None and scatter.fill is not None:  # it added every channel's bias: give the kept ones back
            kept_bias = fill.index_select(0, scatter.index)
            if producer.bias is None:
                producer.bias = nn.Parameter(kept_bias.clone(), requires_grad=producer.weight.requires_grad)
            else:
                producer.bias.add_(kept_bias)
    _slice(producer, 0, avail_pos[keep])
    for bn in bns:
        _slice_bn(bn, keep)
    _slice(consumer, 1, read_pos[keep])
    for name in (ch.scatter, ch.select):
        if name:
            replace_module(root, name, nn.Identity())
    return None


@torch.no_grad()
def remove_channels(model: nn.Module) -> int:
    """Remove, in place and exactly, the channels that structured-sparsity export left dead.

    Parameters
    ----------
    model : nn.Module
        An exported model (:func:`admm_compress.export` calls this unless
        ``remove_channels=False``).  Its forward pass must trace with :mod:`torch.fx`; if it
        does not, nothing is changed (logged at INFO).

    Returns
    -------
    int
        The number of producer/consumer pairs shrunk (each loses its ``IndexScatter`` and/or
        ``IndexSelect``, replaced by ``nn.Identity``).  In eval mode the model computes the same
        function as before (up to float rounding of a folded bias).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_channels: model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, (IndexSelect, IndexScatter)) for m in model.modules()):
        return 0
    removed, skipped = 0, set()
    while True:
        try:
            gm = fx.GraphModule(model, _Tracer().trace(model))
        except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
            log.info("channels of structurally pruned layers kept: %s does not trace with torch.fx (%s: %s)",
                     type(model).__name__, type(e).__name__, e)
            return removed
        chains = [c for c in _find_chains(gm) if (c.scatter, c.select) not in skipped]
        if not chains:
            return removed
        reason = _apply(gm, model, chains[0])
        if reason is None:
            removed += 1
            log.debug("removed pruned channels between '%s' and '%s'", chains[0].producer, chains[0].consumer)
        else:
            skipped.add((chains[0].scatter, chains[0].select))
            log.info("pruned channels between '%s' and '%s' kept: %s", chains[0].producer, chains[0].consumer, reason)

