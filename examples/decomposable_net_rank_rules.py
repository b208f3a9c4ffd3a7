"""Decomposable-Net's three rank rules compared: train with each, export at several sizes.

``rank_rule="official"`` (top round(Z N) pooled singular values, then ranks raised to
``min_rank = 5``), ``"paper"`` (Sec. 2.3: no floor, rank 0 possible), ``"reserve"`` (ours: floors
set aside first).  Digits FCN (depth 6, width 96), ``rank_ratio=(0.01, 0.5)``, ``lam=0.5``, SGD
lr 0.05 with a cosine schedule; every rule trains and exports with the same seed and data order.
About 1 minute on one CPU core with the defaults.

Run:  python examples/decomposable_net_rank_rules.py --epochs 10 --seeds 0 1
"""
import argparse
import copy
import logging

import torch

import admm_compress as ac
from admm_compress.methods.decomposable_net import decomposable_net

RULES = ("official", "paper", "reserve")
RATIOS = (0.07, 0.1, 0.15, 0.2, 0.3, 0.5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    acc = {}
    for seed in a.seeds:
        train, test = ac.data.digits(batch_size=64, seed=seed)
        torch.manual_seed(seed)
        init = ac.models.fcn(depth=6, width=96, init="torch")
        for rule in RULES:
            model = copy.deepcopy(init)
            solver = decomposable_net(rank_ratio=(0.01, 0.5), lam=0.5, rank_rule=rule, seed=seed)
            torch.manual_seed(seed)
            solver.fit(model, train, epochs=a.epochs, lr=0.05, progress=False,
                       scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs))
            for z in RATIOS:
                compact = solver.export(model, rank_ratio=z)
                acc.setdefault((z, rule), []).append(ac.evaluate(compact, test)["accuracy"])
    print(f"test accuracy (%), mean over seeds {a.seeds}, {a.epochs} epochs")
    print("| Z | " + " | ".join(RULES) + " |\n| --- |" + " --- |" * len(RULES))
    for z in RATIOS:
        print(f"| {z:.2f} | " + " | ".join(f"{sum(acc[z, r]) / len(acc[z, r]):.2f}" for r in RULES) + " |")


if __name__ == "__main__":
    main()
