"""TT ranks from a latency budget against ranks from a MAC budget: ResNet-56 in ONNX Runtime.

``tt_ranks_for_budget(model, r, "macs")`` (one global threshold on the TT unfoldings' singular
values) gives ranks whose MACs fall but whose ONNX Runtime time barely does: its chains run at
ranks such as 11-15 that ORT's AVX-512 kernels handle 1.5-2x slower than 16
(``docs/results/tt_rank_alignment.md``).  ``tt_ranks_for_latency(model, r, backend="ort")`` (or ``"eager"``)
(:mod:`admm_compress.methods.tt_latency_ranks`) times every targeted layer's exported TT chain at
a grid of rank pairs (1, 2, 4, 8, multiples of 16) in ONNX Runtime -- for the rows marked "3 forms"
also the chain's exact two-conv forms ``fold_first`` / ``fold_last``, applied to the exported model
by ``realize_forms`` -- and chooses, by dynamic
programming, the ranks that discard the least energy within ``1 - r`` of the targeted layers'
dense time.  Both are applied to the same trained model and compared on:

* the MACs ratio (ptflops) and the whole exported model's time ratio to dense, ONNX Runtime and
  eager PyTorch, batch 1 and 32 (median process CPU time over interleaved rounds,
  ``latency_speedup.measure``; ORT: ``admm_compress.deploy.onnx_session``, 1 thread, outputs
  checked against eager), and the share of the MAC reduction realized as a time reduction;
* the discarded energy ``sum_l (sum_{i > r_1} s^(1)_i^2 + sum_{j > r_2} s^(2)_j^2)`` (relative to
  each layer's ``||W||^2``, the TT-SVD bound the two allocations spend), and the test accuracy
  right after the TT projection (BatchNorm statistics recomputed, no fine-tuning) and after
  ``--finetune-epochs`` of ``Solver.fit(model, train, epochs=0, finetune_epochs=...)`` from it
  (direct compression, then the TT factors and everything else fine-tuned at lr 0.005): how much
  of the network each choice keeps.

The model: ResNet-56 (CIFAR layout, 3x32x32) trained densely on digits32 (``--epochs``, SGD lr
0.05, seed 0); every Conv2d but the 3-channel stem is constrained on ``TTView.oki()``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import admm_compress as ac  # noqa: E402
from admm_compress import data, models  # noqa: E402
from admm_compress.methods.raspa import tt_ranks_for_budget, tt_unfolding_spectra  # noqa: E402
from admm_compress.methods.tt_latency_ranks import realize_forms, tt_ranks_for_latency  # noqa: E402
from admm_compress.registry import train_dense  # noqa: E402
from admm_compress.training import evaluate, recalibrate_bn  # noqa: E402
from admm_compress.views import TTView  # noqa: E402
from latency_speedup import INPUT, check_outputs  # noqa: E402
from tt_latency_floor import (eager_and_ort_times, finish_report, ratio_cells, start_timing,  # noqa: E402
                              timing_args)



def discarded(model: nn.Module, ranks: dict) -> float:
    """Summed relative squared energy the TT-SVD at ``ranks`` discards (the bound both allocations use)."""
    mods = dict(model.named_modules())
    total = 0.0
    for n, (r1, r2) in ranks.items():
        _, s1, s2 = tt_unfolding_spectra(mods[n].weight, TTView.oki())
        total += float((s1[r1:] ** 2).sum() + (s2[r2:] ** 2).sum())
    return total


def build(dense: nn.Module, ranks: dict):
    """(finalized, exported) copies of ``dense`` with each layer of ``ranks`` at its TT ranks (oki view)."""
    model = copy.deepcopy(dense)
    solver = ac.Solver([ac.Constrain(n, ac.TTRank(r), view=TTView.oki()) for n, r in ranks.items()]).prepare(model)
    solver.finalize(model)
    return model, ac.export(model, solver).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4, help="dense training epochs on digits32")
    ap.add_argument("--macs", type=float, nargs="+", default=[0.5, 0.75], help="MAC reductions (tt_ranks_for_budget)")
    ap.add_argument("--latency", type=float, nargs="*", default=[0.3, 0.4, 0.5, 0.6],
                    help="reductions of the targeted layers' ORT time (tt_ranks_for_latency)")
    ap.add_argument("--forms-latency", type=float, nargs="*", default=[0.4, 0.5, 0.6],
                    help="ORT latency reductions planned over the chain and its two-conv forms (forms=...)")
    ap.add_argument("--eager-latency", type=float, nargs="*", default=[0.2, 0.3],
                    help="reductions of the targeted layers' eager time (tt_ranks_for_latency, backend='eager')")
    ap.add_argument("--finetune-epochs", type=int, default=2,
                    help="epochs of fit(epochs=0, finetune_epochs=...) from each projection (0: skip)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the dense model's initialization (the digits32 split and batch order stay seed 0)")
    timing_args(ap, "tt_latency_ranks.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("admm_compress.methods.tt_latency_ranks").setLevel(logging.INFO)
    _, load0, t0 = start_timing(args)
    torch.manual_seed(args.seed)
    dense = models.resnet56(num_classes=10)
    train, test = data.digits32(batch_size=64, seed=0)
    train_dense(dense, train, args.epochs, lr=0.05, progress=False)
    dense.eval()
    dense_acc = evaluate(dense, test)["accuracy"]
    d_macs = ac.complexity(dense, INPUT).macs
    configs = []
    for red in args.macs:
        configs.append((f"MACs budget -{100 * red:.0f} %",
                        tt_ranks_for_budget(dense, red, "macs", exclude="conv1", input_size=INPUT), {}))
    plan_s = {}
    three = ("chain", "fold_first", "fold_last")
    for backend, reds, forms in (("ort", args.latency, ("chain",)), ("ort", args.forms_latency, three),
                                 ("eager", args.eager_latency, ("chain",))):
        for red in reds:
            t1 = time.perf_counter()
            label = (f"{'ORT' if backend == 'ort' else 'eager'} latency budget -{100 * red:.0f} %"
                     + (", 3 forms" if len(forms) > 1 else ""))
            ranks, chosen = tt_ranks_for_latency(dense, red, input_size=INPUT, exclude="conv1", backend=backend,
                                                 forms=forms, return_forms=True)
            configs.append((label, ranks, chosen))
            plan_s[label] = time.perf_counter() - t1
    eager, info = {"dense": dense}, {}
    for label, ranks, chosen in configs:
        fin, ex = build(dense, ranks)
        realize_forms(ex, chosen)
        check_outputs(fin, ex)
        acc_model = copy.deepcopy(fin)
        recalibrate_bn(acc_model, train, batches=None)
        acc = evaluate(acc_model, test)["accuracy"]
        tuned = float("nan")
        if args.finetune_epochs:  # direct compression, then the factors and the rest fine-tuned (lr / 10)
            ft = copy.deepcopy(dense).train()
            torch.manual_seed(1)
            solver = ac.Solver([ac.Constrain(n, ac.TTRank(r), view=TTView.oki()) for n, r in ranks.items()])
            h = solver.fit(ft, train, epochs=0, finetune_epochs=args.finetune_epochs, lr=0.05, val_loader=test,
                           progress=False)
            tuned = h.final["after_finetune"]["accuracy"]
        eager[label] = ex
        form_counts = {f: list(chosen.values()).count(f) for f in sorted(set(chosen.values()))}
        info[label] = (ac.complexity(ex, INPUT).macs / d_macs, discarded(dense, ranks), acc, tuned,
                       sorted(set(ranks.values())), form_counts)
        print(f"{label}: MACs {info[label][0]:.3f}, discarded {info[label][1]:.3f}, acc {acc:.2f}, "
              f"fine-tuned {tuned:.2f}", flush=True)
    rows = [(b, mode, label, t["dense"], t[label])
            for b, mode, t in eager_and_ort_times(eager, args.batches, args.rounds) for label in info]
    hdr = ["batch", "mode", "ranks", "MACs ratio", "dense CPU ms", "TT CPU ms", "time ratio", "realized / ideal",
           "share", "discarded energy", "acc after projection (%)",
           f"after {args.finetune_epochs} fine-tuning epochs (%)"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for b, mode, label, td, tv in rows:
        mr, e, acc, tuned, _, _ = info[label]
        table.append("| " + " | ".join([str(b), mode, label, *ratio_cells(mr, td, tv), f"{e:.3f}", f"{acc:.2f}",
                                        f"{tuned:.2f}" if args.finetune_epochs else "-"]) + " |")
    ranks_lines = [f"* {label}: rank pairs used {info[label][4]}"
                   + (f"; forms {info[label][5]}" if info[label][5] else "")
                   + (f" (planned in {plan_s[label]:.0f} s)" if label in plan_s else "")
                   for label in info]
    finish_report(args, "# TT ranks for a latency budget vs a MAC budget (benchmarks/tt_latency_ranks.py)",
                  __doc__.split("\n\n", 1)[1].strip(),
                  [f"Dense ResNet-56 (seed {args.seed}) after {args.epochs} epochs: test accuracy {dense_acc:.2f} %, "
                   f"{d_macs / 1e6:.1f} M MACs.", "", *table, "", *ranks_lines], load0, t0, table)


if __name__ == "__main__":
    main()
