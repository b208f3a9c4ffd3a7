"""CPU latency of stock-conv TT layers against their TT ranks: does a rank that is a multiple of 16 run faster?

``docs/results/tt_latency_ort.md`` found ResNet-56's budgeted ``"oki"`` TT models (ranks from
``tt_ranks_for_budget``) barely faster than dense in ONNX Runtime at batch 1 (realized / ideal
0.28-0.31 at -75 % MACs), while ``tt_latency_floor.md`` measured uniform ranks 8 at 0.39 of the
dense time.  This script sweeps the ranks to find out why.  Every ``nn.Conv2d`` of ResNet-56 is
constrained to ``TTRank((r, min(r, I)))`` on ``TTView.oki()`` and ``prepare -> finalize ->
export``-ed, then timed as exported (``chain``: ``1x1 I->r2``, ``kxk r2->r1``, ``1x1 r1->O``) and
as ``fold_last`` (``1x1 I->r2``, ``kxk r2->O``; :func:`admm_compress.layers.tt_realize.chain_realizations`):

* ``uniform r``: the same ``r`` in every layer, for ``r`` in ``--ranks`` (default 6-9, 12, 14-17, 20,
  24, 32);
* ``stages a/b/c``: rank ``a`` in the layers with 16 output channels, ``b`` with 32, ``c`` with 64
  (``--stages``; default the widths' ranks of a -75 % budget, ``6/12/26`` -- what the per-layer
  "uniform ranks" rule of ``tt_latency.py`` gives --, against nearby ranks that are multiples of 16).

Timing as ``tt_latency_floor.py``: eager (``torch.inference_mode``) and ONNX Runtime
(``admm_compress.deploy.onnx_session``: CPU provider, 1 intra-op thread, ORT_ENABLE_ALL, BatchNorm
and ReLU fused into the convs), NCHW, batch 1 and 32, one torch thread, median process CPU time
over interleaved rounds (``latency_speedup.measure``); every variant's outputs checked against its
finalized model, and ORT's against eager, first.  Random weights (latency does not depend on the
values).  ``realized / ideal`` = MACs ratio / time ratio; ``share`` = (1 - time ratio) / (1 - MACs
ratio), the fraction of the MAC reduction realized as a time reduction.

Writes ``docs/results/tt_rank_alignment.md``.  Run: ``python benchmarks/tt_rank_alignment.py``
(~10 min on a loaded 2-core machine; ``onnxruntime`` from the ``onnx`` extra).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import admm_compress as ac  # noqa: E402
from admm_compress import models  # noqa: E402
from admm_compress.views import TTView  # noqa: E402
from latency_speedup import INPUT, check_outputs  # noqa: E402
from tt_latency_floor import (eager_and_ort_times, finish_report, ratio_cells, refold, start_timing,  # noqa: E402
                              timing_args)



def tt_model(dense: nn.Module, rank_of_width: dict):
    """(finalized, exported) copies of ``dense`` with every Conv2d of ``O`` output channels at
    ``TTRank((r, min(r, I)))``, ``r = rank_of_width[O]``, on the oki view."""
    model = copy.deepcopy(dense)
    spec = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            r = rank_of_width[m.out_channels]
            spec.append(ac.Constrain(n, ac.TTRank((r, min(r, m.in_channels))), view=TTView.oki()))
    solver = ac.Solver(spec).prepare(model)
    solver.finalize(model)
    return model, ac.export(model, solver).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[6, 7, 8, 9, 12, 14, 15, 16, 17, 20, 24, 32])
    ap.add_argument("--stages", nargs="+", default=["6/12/26", "6/16/16", "6/16/32", "4/16/16", "2/16/16",
                                                     "4/16/32", "8/16/32"],
                    help="ranks a/b/c for the layers with 16/32/64 output channels")
    timing_args(ap, "tt_rank_alignment.md")
    args = ap.parse_args(argv)
    _, load0, t0 = start_timing(args)
    torch.manual_seed(0)
    dense = models.resnet56().eval()
    d_macs = ac.complexity(dense, INPUT).macs
    widths = sorted({m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d)})
    assert widths == [16, 32, 64], widths
    configs = [(f"uniform {r}", {w: r for w in widths}) for r in args.ranks]
    for s in args.stages:
        rs = [int(v) for v in s.split("/")]
        configs.append((f"stages {s}", dict(zip(widths, rs))))
    eager, macs = {"dense": dense}, {}
    for label, ranks in configs:
        fin, chain = tt_model(dense, ranks)
        for form, m in (("chain", chain), ("fold_last", refold(chain, "fold_last"))):
            check_outputs(fin, m)
            eager[f"{label}, {form}"] = m
            macs[f"{label}, {form}"] = ac.complexity(m, INPUT).macs / d_macs
    rows = [(b, mode, label, macs[label], t["dense"], t[label])
            for b, mode, t in eager_and_ort_times(eager, args.batches, args.rounds, ("eager", "ort")) for label in macs]
    hdr = ["batch", "mode", "variant", "MACs ratio", "dense CPU ms", "variant CPU ms", "time ratio",
           "realized / ideal", "share"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for b, mode, label, mr, td, tv in rows:
        table.append("| " + " | ".join([str(b), mode, label, *ratio_cells(mr, td, tv)]) + " |")
    finish_report(args, "# TT ranks and CPU latency: alignment to 16 channels (benchmarks/tt_rank_alignment.py)",
                  __doc__.split("\n\n", 1)[1].split("Writes ``")[0].strip(),
                  ["ResNet-56, CIFAR input 3x32x32.", "", *table], load0, t0, table)


if __name__ == "__main__":
    main()
