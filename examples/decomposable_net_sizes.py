"""Decomposable-Net on the embedded digits: one trained model evaluated at many sizes.

Two networks are trained with the *same* loop (the Decomposable-Net solver; ``lam=0`` is normal
learning, Eq. 1), from the same initialization and data order:

* ``decomp-net``: ``methods.decomposable_net(rank_ratio=(alpha_l, alpha_u), lam=0.5)``;
* ``base``: the same with ``lam=0`` (normal learning).

Each is then exported at several rank ratios ``Z`` (fraction of ``sum_l R_l`` bases kept, ranks
chosen by the global singular-value criterion of Sec. 2.3 on the decomp-net model) without
retraining, BN statistics recomputed for every size on training batches.  ``base`` is truncated
to exactly the same ranks (same MACs) and, for reference, to its own global selection at the
same ``Z``.  A second table compares the rank criteria of Fig. 2(c) (global singular values,
uniform, energy) at export on the decomp-net model, and one row exports by a MACs budget.

    python examples/decomposable_net_sizes.py --out docs/results

writes ``decomposable_net_sizes.md`` into ``--out`` (models: ``fcn`` -- the LoRITa FCN on flat
8x8 digits -- and ``cnn`` -- a 5-conv BN network on 3x32x32 digits32; ``--seeds 0,1,2`` by
default, ~3 CPU minutes per seed; every table cell is the mean over seeds with the per-seed
values in brackets).  BN statistics are recomputed on the whole training split for every size
(the paper's footnote 1; ``--bn-batches N`` bounds the cost).
"""
from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import admm_compress as ac
from admm_compress.methods.decomposable_net import decomposable_net

log = logging.getLogger("decomposable_net_sizes")

RATIOS = (1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05)


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """3x32x32 -> five 3x3 conv-BN-ReLU (16, 32/2, 32, 64/2, 64) -> GAP -> Linear."""
    def block(i, o, s):
        return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 1), *block(32, 64, 2),
                         *block(64, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def setup(name: str, seed: int):
    if name == "fcn":
        train, test = ac.data.digits(batch_size=64, seed=seed)
        return ac.models.fcn(depth=6, width=96, init="torch"), train, test, (64,)  # as recorded in docs/results
    train, test = ac.data.digits32(batch_size=64, seed=seed)
    return small_cnn(), train, test, (3, 32, 32)


def train(model, loader, lam, a, epochs):
    solver = decomposable_net(rank_ratio=(a.alpha_l, a.alpha_u), lam=lam, scheme=a.scheme, seed=a.seed)
    torch.manual_seed(a.seed)  # same data order for both runs
    t0 = time.perf_counter()
    solver.fit(model, loader, epochs=epochs, lr=a.lr, progress=False,
               scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs))
    return solver, time.perf_counter() - t0


def run_model(name: str, a) -> dict:
    torch.manual_seed(a.seed)
    init, train_loader, test_loader, input_size = setup(name, a.seed)
    epochs = a.epochs_fcn if name == "fcn" else a.epochs_cnn
    res = {"name": name, "input_size": input_size, "epochs": epochs}
    dn_model, base_model = copy.deepcopy(init), copy.deepcopy(init)
    dn, res["t_dn"] = train(dn_model, train_loader, a.lam, a, epochs)
    base, res["t_base"] = train(base_model, train_loader, 0.0, a, epochs)
    dense_c = ac.complexity(dn_model, input_size, backend="pytorch")
    res["dense_macs"] = dense_c.macs
    layers = dn._layers_for(dn_model)
    total = sum(L.full_rank for L in layers)
    floors = sum(L.floor for L in layers)
    res["sum_R"], res["floors"] = total, floors

    def acc(m):
        return ac.evaluate(m, test_loader)["accuracy"]

    def exp(solver, model, **kw):
        return solver.export(model, input_size=input_size, bn_loader=train_loader, bn_batches=a.bn_batches, **kw)

    rows = []
    for z in RATIOS:
        if round(z * total) < floors:
            continue
        ranks = dn.select_ranks(dn_model, rank_ratio=z)
        c_dn = exp(dn, dn_model, ranks=ranks)
        c_base = exp(base, base_model, ranks=ranks)
        c_base_own = exp(base, base_model, rank_ratio=z)
        macs = ac.complexity(c_dn, input_size, backend="pytorch").macs
        rows.append({"z": z, "kept": sum(ranks.values()), "macs": macs, "dn": acc(c_dn), "base": acc(c_base),
                     "base_own": acc(c_base_own)})
        log.info("%s Z=%.2f: MACs %.3f M, decomp-net %.2f %%, base same ranks %.2f %%", name, z, macs / 1e6,
                 rows[-1]["dn"], rows[-1]["base"])
    res["rows"] = rows
    crit = []
    for z in [r["z"] for r in rows if r["z"] < 1.0]:
        accs = {}
        for c in ("global", "uniform", "energy"):
            sel = decomposable_net(rank_ratio=(a.alpha_l, a.alpha_u), criterion=c, scheme=a.scheme)
            accs[c] = acc(exp(sel, dn_model, rank_ratio=z))
        crit.append((z, accs))
    res["criteria"] = crit
    budget = 0.5 * dense_c.macs
    c_b = exp(dn, dn_model, macs=budget)
    res["budget"] = (budget, ac.complexity(c_b, input_size, backend="pytorch").macs, acc(c_b),
                     acc(exp(base, base_model, ranks=c_b.decomposable_net_ranks)))
    return res


def _cell(xs, fmt="{:.2f}", sign=False):
    """Mean over seeds, per-seed values in brackets when there are several."""
    f = (lambda v: ("{:+.2f}" if sign else fmt).format(v))
    m = sum(xs) / len(xs)
    return f(m) if len(xs) == 1 else f"{f(m)} ({', '.join(f(v) for v in xs)})"


def aggregate(per_seed: list[dict]) -> dict:
    """One result dict whose accuracy entries are lists over seeds (rows matched by Z)."""
    r0 = per_seed[0]
    res = {k: r0[k] for k in ("name", "input_size", "epochs", "sum_R", "floors", "dense_macs")}
    res["t_dn"] = sum(r["t_dn"] for r in per_seed) / len(per_seed)
    res["t_base"] = sum(r["t_base"] for r in per_seed) / len(per_seed)
    zs = [row["z"] for row in r0["rows"] if all(any(x["z"] == row["z"] for x in r["rows"]) for r in per_seed)]
    rows = []
    for z in zs:
        got = [next(x for x in r["rows"] if x["z"] == z) for r in per_seed]
        rows.append({"z": z, "kept": got[0]["kept"], "macs": [g["macs"] for g in got],
                     **{k: [g[k] for g in got] for k in ("dn", "base", "base_own")}})
    res["rows"] = rows
    res["criteria"] = []
    for z, _ in r0["criteria"]:
        accs = [next(a for zz, a in r["criteria"] if zz == z) for r in per_seed]
        res["criteria"].append((z, {c: [a[c] for a in accs] for c in ("global", "uniform", "energy")}))
    res["budget"] = (r0["budget"][0], [r["budget"][1] for r in per_seed], [r["budget"][2] for r in per_seed],
                     [r["budget"][3] for r in per_seed])
    return res


def write_md(results, a, out: Path, wall: float):
    L = ["# Decomposable-Net: accuracy at many sizes from one trained model", "",
         f"Command: `python {' '.join(sys.argv)}`  ",
         f"torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} CPU "
         f"thread(s); total wall time {wall:.0f} s.", "",
         f"Training: the solver's default optimizer (SGD, Nesterov momentum 0.9, weight decay 5e-4 on weight "
         f"tensors only, as paper and official code), lr {a.lr} cosine, batch 64, seeds {a.seeds} (each cell: "
         f"mean over seeds, per-seed values in brackets; the seed sets initialization, data split and order); "
         f"decomp-net: `decomposable_net(rank_ratio=({a.alpha_l}, {a.alpha_u}), lam={a.lam}, "
         f"scheme='{a.scheme}')` (alpha_u above the paper's CIFAR-10 value 0.25: these networks are "
         f"far smaller than VGG-15 and sizes above alpha_u are never trained); base: the same solver with `lam=0` (normal learning), same "
         f"initialization and data order.  Sizes: rank ratio Z = fraction of the sum of full ranks "
         f"kept, ranks chosen by the global singular-value criterion on the decomp-net model; 'base "
         f"(same ranks)' is the normally trained network truncated to exactly those ranks; 'base "
         f"(own sel.)' uses the global criterion on its own singular values.  Every exported model "
         f"gets its BN statistics recomputed on {'the whole training split' if a.bn_batches is None else f'{a.bn_batches} training batches'} (footnote 1).  MACs: ptflops, "
         f"backend 'pytorch', of the exported (factorized) model.  Accuracy: % on the held-out "
         f"digits split (360 images).", ""]
    for r in results:
        L += [f"## {r['name']} (input {r['input_size']}, {r['epochs']} epochs; train time decomp-net "
              f"{r['t_dn']:.0f} s, base {r['t_base']:.0f} s)", "",
              f"Dense model: {r['dense_macs'] / 1e6:.3f} M MACs; sum R_l = {r['sum_R']} bases, floors keep "
              f"{r['floors']} (min_rank=5).", "",
              "| Z | bases kept | MACs (M) | MACs ratio | decomp-net | base (same ranks) | base (own sel.) | "
              "decomp-net - base |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in r["rows"]:
            macs = sum(row["macs"]) / len(row["macs"])
            L.append(f"| {row['z']:.2f} | {row['kept']} | {macs / 1e6:.3f} | "
                     f"{macs / r['dense_macs']:.3f} | {_cell(row['dn'])} | {_cell(row['base'])} | "
                     f"{_cell(row['base_own'])} | {_cell([d - b for d, b in zip(row['dn'], row['base'])], sign=True)} |")
        b, got, acc_dn, acc_base = r["budget"]
        L += ["", f"MACs budget export (`macs={b / 1e6:.3f}e6`, half the dense model): "
              f"{sum(got) / len(got) / 1e6:.3f} M MACs counted, decomp-net {_cell(acc_dn)} %, base (same ranks) "
              f"{_cell(acc_base)} %.",
              "", "Rank criterion at export on the decomp-net model (Fig. 2(c) analogue; the model was "
              "trained with the global criterion):", "",
              "| Z | global (sv) | uniform | energy |", "| --- | --- | --- | --- |"]
        for z, accs in r["criteria"]:
            L.append(f"| {z:.2f} | {_cell(accs['global'])} | {_cell(accs['uniform'])} | {_cell(accs['energy'])} |")
        L.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "decomposable_net_sizes.md").write_text("\n".join(L))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fcn,cnn")
    p.add_argument("--epochs-fcn", type=int, default=30)
    p.add_argument("--epochs-cnn", type=int, default=8)
    p.add_argument("--alpha-l", type=float, default=0.01)
    p.add_argument("--alpha-u", type=float, default=0.5)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--scheme", default="channel", choices=("channel", "spatial"))
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--bn-batches", type=int, default=None,
                   help="batches for the BN statistics of each size (default: the whole training split)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/results")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("admm_compress").setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    results = []
    for m in [m.strip() for m in a.models.split(",") if m.strip()]:
        per_seed = []
        for seed in seeds:
            a.seed = seed
            per_seed.append(run_model(m, a))
        results.append(aggregate(per_seed))
    write_md(results, a, Path(a.out), time.perf_counter() - t0)
    log.info("wrote %s", Path(a.out) / "decomposable_net_sizes.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
