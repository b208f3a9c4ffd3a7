"""``export(model, spec)``: swap every constrained layer of a model for its compact form.

The spec (or a compressor's :meth:`export_spec`) is resolved on a copy of the model; each weight's
parametrizations (LoRITa factors, fine-tuning structure, ``L + S``) are collapsed; each constraint
gives the compact factors of its (already feasible, or projected here) weight through
``set.factorize``; :func:`admm_compress.export.build_compact` turns them into a module (the
exporter table of :mod:`admm_compress.export.registry`), which replaces the layer under every name
it is registered at.  Fused attention is re-derived, dead neighbouring channels are removed
(:func:`admm_compress.channels.remove_channels`), and with ``latency_aware=True`` a layer keeps
its dense form where that is measured faster (:func:`admm_compress.deploy.keep_faster`).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import functional as F
from ..channels import remove_channels as _remove_channels
from ..parametrizations import additive_components
from ..sets import LowRank, Sum
from ..sets.cardinality import joint_factors
from ..sets.base import Constraint
from ..specs import replace_module, resolve, unwrap
from .registry import ExportError, build_compact

__all__ = ["export"]

#: values of ``export(..., tt_realization=...)``
TT_REALIZATIONS = ("chain", "macs", "latency")

log = logging.getLogger(__name__)


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


@torch.no_grad()
def export(model: nn.Module, spec, inplace: bool = False, remove_channels: bool = True, *,
           latency_aware: bool = False, example_inputs=None, tt_realization: str = "chain") -> nn.Module:
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
        A deployment-sized input for ``latency_aware`` and ``tt_realization="latency"``.
    tt_realization : {"chain", "macs", "latency"}
        How an ``"oki"`` TT layer is realized.  ``"chain"`` (default): the three stock convs
        ``1x1 -> kxk -> 1x1``.  ``"macs"`` / ``"latency"``: per layer, the realization of the same
        linear map (the chain, the first or last 1x1 folded into the kxk conv, or one dense conv)
        with the fewest MACs / the shortest time measured on ``example_inputs``, see
        :func:`admm_compress.layers.tt_realize.realize_tt`.  A layer realized densely counts dense
        MACs.  The outputs are the same in every case (up to float rounding).

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
    if tt_realization not in TT_REALIZATIONS:
        raise ValueError(f"export: tt_realization must be one of {', '.join(map(repr, TT_REALIZATIONS))}, "
                         f"got {tt_realization!r}")
    if latency_aware is not False:
        example_inputs = _check_latency_args(latency_aware, inplace, example_inputs)
    elif tt_realization == "latency" or (tt_realization == "macs" and example_inputs is not None):
        example_inputs = _as_inputs(example_inputs, f"tt_realization={tt_realization!r}")
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
    factors_of.update(joint_factors(bindings))  # Cardinality(scope="global"): one budget over its layers
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
        replace_module(out, b.name, new)
    from ..attention import convert as _convert_attention  # fused attention reads weights: see attention.py

    _convert_attention(out, only_changed=True)
    if remove_channels:
        n = _remove_channels(out)
        if n:
            log.info("removed the pruned channels of %d neighbouring layer pair(s)", n)
    if tt_realization != "chain":
        from ..layers.tt_realize import realize_tt

        realize_tt(out, tt_realization, example_inputs)
    if latency_aware:
        from ..deploy import keep_faster

        keep_faster(out, model, spec, *example_inputs)
    return out


def _check_latency_args(latency_aware, inplace: bool, example_inputs) -> tuple:
    if not isinstance(latency_aware, bool):
        raise TypeError(f"export: latency_aware must be a bool, got {latency_aware!r}")
    if inplace:
        raise ValueError("export: latency_aware=True needs inplace=False (the dense layers are rebuilt from "
                         "the original model)")
    return _as_inputs(example_inputs, "latency_aware=True")


def _as_inputs(example_inputs, needed_by: str) -> tuple:
    """``example_inputs`` as a non-empty tuple; raises naming what needs it."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ValueError(f"export: {needed_by} needs example_inputs (a tensor or a tuple of tensors), "
                         f"got {type(example_inputs).__name__}")
    return tuple(example_inputs)
