"""Cheapest stock realization of an exported ``"oki"`` TT conv chain (and of ``L + S``), per layer.

The ``"oki"`` TT weight ``W[o, i, k] = sum_{a,b} A[o, a] G[a, k, b] C[b, i]`` (cores of the
``(O, kh*kw, I)`` view, ranks ``(r_1, r_2)``) is exported by :func:`.tt.tt_oki_modules` as the
chain ``1x1 I -> r_2`` (``C``), ``kxk r_2 -> r_1`` (``G``), ``1x1 r_1 -> O`` (``A``).  The same
linear map has three more stock realizations, obtained by multiplying adjacent factors:

================  ============================================  ================================
name              layers                                        MACs per output position
================  ============================================  ================================
``"chain"``       ``1x1 I->r2``, ``kxk r2->r1``, ``1x1 r1->O``  ``s r_2 I + K r_1 r_2 + O r_1``
``"fold_first"``  ``kxk I->r1`` (``G C``), ``1x1 r1->O``        ``K I r_1 + O r_1``
``"fold_last"``   ``1x1 I->r2``, ``kxk r2->O`` (``A G``)        ``s r_2 I + K r_2 O``
``"dense"``       ``kxk I->O`` (``A G C``)                      ``K I O``
================  ============================================  ================================

(``s`` = input positions per output position of the first 1x1 map, ``prod(stride)`` for a
"same"-padded layer; ``K = kh kw``; plus ``O`` for a bias.)  Folding is exact in exact
arithmetic: a 1x1 convolution without bias is a per-pixel linear map, so it commutes with the
kxk convolution's padding (any padding mode), and a trailing 1x1 stride-1 convolution is a
per-pixel map of the kxk convolution's output.  In float the outputs differ by rounding only.

Which realization is fastest is not always the one with the fewest MACs: on CPU, thin
convolutions (few channels) run at a small fraction of the MAC throughput of wide ones and
every extra layer costs a kernel call.  :func:`realize_tt` therefore chooses per layer, either

* ``rule="macs"``: the fewest MACs (ties: fewer layers), or
* ``rule="latency"``: the fastest on the layer's real input (recorded by running
  ``model(*example_inputs)``; every candidate timed in interleaved rounds, process CPU time
  with one torch thread), where a candidate with more MACs than the fewest-MACs one must be
  faster by ``margin``.

An ``L + S`` layer (:class:`~.compact.SumBranches` of such a chain and a sparse convolution) gets
one more candidate, ``"dense_sum"``: one dense convolution holding ``L + S`` (dense MACs: the
sparse branch is no longer counted at its non-zeros).  The sparse branch itself is left to
:func:`admm_compress.deploy.select_kernels` (dense or CSR kernel).

The exported model keeps its interface; the chosen modules are stock ``nn.Conv*d`` in an
``nn.Sequential`` (or a single conv), counted by ptflops' own counters.

Measured (``benchmarks/tt_latency.py``, ``docs/results/tt_latency.md``, one CPU thread): on
ResNet-56 at -75 % MACs the latency rule lifts the realized share of the MAC reduction from
0.20-0.29 (chain) to 0.31-0.68, keeping 8-19 of the 55 layers dense; on VGG-16 from 0.61-0.96 to
0.64-1.01.  The MACs rule keeps the chain on 53 of 55 ResNet-56 layers.
"""
from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from ..specs import replace_module
from .compact import SumBranches, _SparseConvMixin

__all__ = ["REALIZATIONS", "is_oki_chain", "chain_realizations", "realization_macs", "realize_tt"]

log = logging.getLogger(__name__)

#: names of the realizations of a 3-conv chain, in order of preference on ties
REALIZATIONS = ("chain", "fold_first", "fold_last", "dense")


def _is_conv(m) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and not getattr(m, "transposed", False) \
        and not isinstance(m, _SparseConvMixin) and m.groups == 1


def _is_pointwise(m, stride_ok: bool = False) -> bool:
    """A 1x1 conv with no padding / dilation effect (stride 1 unless ``stride_ok``)."""
    return (_is_conv(m) and all(k == 1 for k in m.kernel_size) and not isinstance(m.padding, str)
            and all(p == 0 for p in m.padding) and (stride_ok or all(s == 1 for s in m.stride)))


def is_oki_chain(m: nn.Module) -> bool:
    """Whether ``m`` is an ``nn.Sequential`` of three convolutions ``1x1 (no bias)``, ``k (no
    bias)``, ``1x1`` with matching channels -- the form :func:`.tt.tt_oki_modules` builds."""
    if type(m) is not nn.Sequential or len(m) != 3:
        return False
    a, b, c = m[0], m[1], m[2]
    if not (_is_pointwise(a) and _is_conv(b) and _is_pointwise(c)):
        return False
    if not (type(a) is type(b) is type(c)) or a.bias is not None or b.bias is not None:
        return False
    return a.out_channels == b.in_channels and b.out_channels == c.in_channels


def _new_conv(ref: nn.Module, cin: int, cout: int, kernel, weight: torch.Tensor, bias, *, spatial: bool):
    """A conv of ``ref``'s class: ``spatial`` copies ``ref``'s stride/padding/dilation/mode."""
    fk = {"device": weight.device, "dtype": weight.dtype}
    if spatial:
        new = type(ref)(cin, cout, kernel, stride=ref.stride, padding=ref.padding, dilation=ref.dilation,
                        padding_mode=ref.padding_mode, bias=bias is not None, **fk)
    else:
        new = type(ref)(cin, cout, 1, bias=bias is not None, **fk)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def chain_realizations(chain: nn.Sequential) -> dict[str, nn.Module]:
    """All realizations (see the module docstring) of an ``"oki"`` chain, as new modules.

    The products are formed in float64 and cast back to the layers' dtype.
    """
    if not is_oki_chain(chain):
        raise ValueError(f"chain_realizations: expected a 1x1 -> kxk -> 1x1 conv chain, got {chain!r}")
    first, mid, last = chain
    I, r2, r1, O = first.in_channels, first.out_channels, mid.out_channels, last.out_channels
    k = tuple(mid.kernel_size)
    nd = len(k)
    dt = mid.weight.dtype
    C = first.weight.detach().reshape(r2, I).double()
    G = mid.weight.detach().double()                      # (r1, r2, *k)
    A = last.weight.detach().reshape(O, r1).double()
    bias = None if last.bias is None else last.bias.detach()
    GC = torch.einsum("ab...,bi->ai...", G, C)           # (r1, I, *k)
    AG = torch.einsum("oa,ab...->ob...", A, G)           # (O, r2, *k)
    AGC = torch.einsum("oa,ai...->oi...", A, GC)         # (O, I, *k)
    one = (1,) * nd
    out = {"chain": copy.deepcopy(chain)}
    out["fold_first"] = nn.Sequential(
        _new_conv(mid, I, r1, k, GC.to(dt), None, spatial=True),
        _new_conv(last, r1, O, 1, A.to(dt).reshape(O, r1, *one), bias, spatial=False))
    out["fold_last"] = nn.Sequential(
        _new_conv(first, I, r2, 1, C.to(dt).reshape(r2, I, *one), None, spatial=False),
        _new_conv(mid, r2, O, k, AG.to(dt), bias, spatial=True))
    out["dense"] = _new_conv(mid, I, O, k, AGC.to(dt), bias, spatial=True)
    for m in out.values():
        m.train(chain.training)
    return out


def realization_macs(chain: nn.Sequential, in_positions: int | None = None,
                     out_positions: int | None = None) -> dict[str, int]:
    """MACs of each realization of ``chain`` (batch 1, ptflops' convention: + ``O`` per output
    position for a bias).  Without positions: per output position, the first 1x1 map counted
    ``prod(stride)`` times."""
    first, mid, last = chain
    I, r2, r1, O = first.in_channels, first.out_channels, mid.out_channels, last.out_channels
    K = math.prod(mid.kernel_size)
    if in_positions is None or out_positions is None:
        out_positions, in_positions = 1, math.prod(mid.stride)
    b = O * out_positions if last.bias is not None else 0
    pin, pout = in_positions, out_positions
    return {"chain": r2 * I * pin + (K * r1 * r2 + O * r1) * pout + b,
            "fold_first": (K * I * r1 + O * r1) * pout + b,
            "fold_last": r2 * I * pin + K * r2 * O * pout + b,
            "dense": K * I * O * pout + b}


def _sum_dense(sb: SumBranches) -> nn.Module | None:
    """One dense conv holding ``L + S`` for ``SumBranches(oki chain, sparse conv)``; None if not that form."""
    a, s = sb.a, sb.b
    if not (is_oki_chain(a) and isinstance(s, _SparseConvMixin)):
        return None
    mid = a[1]
    if (tuple(s.kernel_size) != tuple(mid.kernel_size) or tuple(s.stride) != tuple(mid.stride)
            or s.padding != mid.padding or tuple(s.dilation) != tuple(mid.dilation)
            or s.padding_mode != mid.padding_mode or s.groups != 1):
        return None
    dense = chain_realizations(a)["dense"]
    with torch.no_grad():
        w = dense.weight.double() + (s.weight.detach() * s.mask).double()
        dense.weight.copy_(w.to(dense.weight.dtype))
        if s.bias is not None:
            if dense.bias is None:
                new = type(dense)(dense.in_channels, dense.out_channels, dense.kernel_size, stride=dense.stride,
                                  padding=dense.padding, dilation=dense.dilation, padding_mode=dense.padding_mode,
                                  bias=True, device=w.device, dtype=dense.weight.dtype)
                new.weight.copy_(dense.weight)
                new.bias.zero_()
                dense = new
            dense.bias.add_(s.bias.detach())
    dense.train(sb.training)
    return dense


def _time_candidates(cands: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """Best-of-3-rounds median ms of each candidate on ``x`` (rounds interleaved, order reversed)."""
    from ..deploy import _clock
    from ..latency import _median_ms

    clock = _clock("auto")  # process CPU time with one torch thread, wall clock otherwise
    names = list(cands)
    best = {n: float("inf") for n in names}
    with torch.inference_mode():
        for n in names:
            for _ in range(warmup):
                cands[n](x)
        for r in range(3):
            for n in (names if r % 2 == 0 else names[::-1]):
                m = cands[n]
                best[n] = min(best[n], _median_ms(lambda: m(x), max(1, repeats // 3), 0, clock))
    return best


@torch.no_grad()
def realize_tt(model: nn.Module, rule: str = "macs", example_inputs=None, *, allow_dense: bool = True,
               sum_dense: bool = False, repeats: int = 15, warmup: int = 3, margin: float = 0.05) -> list[dict]:
    """Replace every ``"oki"`` TT chain of an exported model by its chosen realization, in place.

    Parameters
    ----------
    model : nn.Module
        An exported model (``ac.export(model, spec)``); modified in place.
    rule : {"macs", "latency"}
        Fewest MACs, or fastest measured on the layer's real input (see the module docstring).
    example_inputs : Tensor or tuple of Tensor
        A deployment-sized input (batch size and memory format matter): needed by
        ``rule="latency"``; with ``rule="macs"`` it gives the layers' real resolutions (without
        it: per output position, ``prod(stride)`` input positions each).
    allow_dense : bool
        Include the dense realization ``A G C`` among the candidates (a layer that takes it is
        counted at dense MACs).
    sum_dense : bool
        For ``L + S`` layers (``SumBranches(chain, sparse conv)``), include ``"dense_sum"``: one
        dense conv holding ``L + S`` (dense MACs), compared with the whole ``SumBranches`` (its
        chain realized by the same rule, its sparse branch on its current kernel).
    repeats, warmup : int
        Timed and untimed calls per candidate (``rule="latency"``).
    margin : float in [0, 1)
        ``rule="latency"``: a candidate with more MACs than the fewest-MACs one must be faster
        than ``(1 - margin)`` x its time.

    Returns
    -------
    list of dict
        Per chain: ``name, ranks (r1, r2), macs`` (per candidate), ``ms`` (per candidate, latency
        rule), ``chosen``.
    """
    if rule not in ("macs", "latency"):
        raise ValueError(f"realize_tt: rule must be 'macs' or 'latency', got {rule!r}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if rule == "latency" and not example_inputs:
        raise ValueError("realize_tt: rule='latency' needs example_inputs (a deployment-sized input)")
    if isinstance(margin, bool) or not 0 <= margin < 1:
        raise ValueError(f"realize_tt: margin must be a number in [0, 1), got {margin!r}")
    chains = [(n, m) for n, m in model.named_modules() if is_oki_chain(m)]
    sums = [(n, m) for n, m in model.named_modules()
            if isinstance(m, SumBranches) and is_oki_chain(m.a)] if sum_dense else []
    inputs: dict[str, tuple] = {}
    if example_inputs:
        handles = []
        for n, m in chains + sums:
            def rec(mod, args, out, n=n):
                if n not in inputs:
                    inputs[n] = (args[0].detach().clone(), int(out[0, 0].numel()), int(args[0][0, 0].numel()))
            handles.append(m.register_forward_hook(rec))
        from ..deploy import _record_inputs

        _record_inputs(model, example_inputs, handles)
    report = []
    dense_sums = {n: _sum_dense(sb) for n, sb in sums}  # from the chains as exported
    for n, chain in chains:
        x, pout, pin = inputs.get(n, (None, None, None))
        macs = realization_macs(chain, pin, pout)
        cands = chain_realizations(chain)
        if not allow_dense:
            cands.pop("dense")
        by_macs = min(cands, key=lambda k: (macs[k], REALIZATIONS.index(k)))
        row = {"name": n, "ranks": (chain[1].out_channels, chain[1].in_channels),
               "macs": {k: macs[k] for k in cands}, "ms": None, "chosen": by_macs}
        if rule == "latency" and x is not None:
            cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            timed = {k: (m.to(memory_format=torch.channels_last) if cl else m).eval() for k, m in cands.items()}
            ms = _time_candidates(timed, x, repeats, warmup)
            fastest = min(ms, key=ms.get)
            row["ms"] = ms
            if fastest != by_macs and ms[fastest] < (1 - margin) * ms[by_macs]:
                row["chosen"] = fastest
        new = cands[row["chosen"]]
        if row["chosen"] != "chain":
            if x is not None and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                    and not x.is_contiguous():
                new = new.to(memory_format=torch.channels_last)
            replace_module(model, n, new)
        log.info("TT chain '%s' ranks %s: %s (MACs %s%s)", n, row["ranks"], row["chosen"], row["macs"],
                 "" if row["ms"] is None else f", ms {({k: round(v, 4) for k, v in row['ms'].items()})}")
        report.append(row)
    for n, sb in sums:  # the whole L + S layer (its chain already realized) vs one dense conv
        dense = dense_sums[n]
        x = inputs.get(n, (None,))[0]
        row = {"name": n, "ranks": None, "macs": None, "ms": None, "chosen": "sum"}
        if dense is None:
            report.append(row)
            continue
        if rule == "latency" and x is not None:
            cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            if cl:
                dense = dense.to(memory_format=torch.channels_last)
            ms = _time_candidates({"sum": sb.eval(), "dense_sum": dense.eval()}, x, repeats, warmup)
            row["ms"] = ms
            if ms["dense_sum"] < (1 - margin) * ms["sum"]:
                row["chosen"] = "dense_sum"
                replace_module(model, n, dense)
        log.info("L + S layer '%s': %s%s", n, row["chosen"], "" if row["ms"] is None else f" ({row['ms']})")
        report.append(row)
    return report
