"""Baseline: post-training SVD truncation (direct compression, LC toolkit's first step).

The model is trained densely, then every Conv2d ("channel" view) / Linear weight is replaced by its
best rank-``int(ratio * min(m, n))`` approximation (Eckart-Young), optionally fine-tuned with
the factors kept (``finetune_epochs`` of the problem)."""
from torch import nn

import admm_compress as ac
from admm_compress.registry import Baseline

NAME = "svd_truncation"
KIND = "baseline"
DESCRIPTION = "post-training SVD truncation to LowRank(ratio) (+ structured fine-tuning)"
PARAMS = {"ratio": [0.2, 0.4, 0.6]}
DEFAULTS = {"ratio": 0.4}


class SVDTruncation(Baseline):
    def __init__(self, spec):
        self.spec = spec
        self._solver = None

    def compress(self, model, loader):
        self._solver = ac.Solver(self.spec, mode="projection")
        self._solver.prepare(model)
        self._solver.finalize(model)

    def finetune(self, model, loader, epochs, loss_fn, val_loader, device, progress, lr):
        from admm_compress.registry import train_dense
        from admm_compress.structure import release, structure

        structure(self._solver.bindings)  # train the rank-r factors, not the dense weight
        try:
            return train_dense(model, loader, epochs, None, loss_fn, val_loader, device, progress, lr / 10,
                               phase="finetune")
        finally:
            release(self._solver.bindings)


def build(problem, ratio):
    keep = tuple(problem.keep_dense) if problem is not None else ()
    spec = []
    if problem is None or any(isinstance(m, nn.Conv2d) for m in problem.model.modules()):
        spec.append(ac.Constrain(nn.Conv2d, ac.LowRank(ratio=ratio), view="channel", exclude=keep or None,
                                 name="svd:conv"))
    spec.append(ac.Constrain(nn.Linear, ac.LowRank(ratio=ratio), exclude=keep or None, name="svd:linear"))
    if problem is not None:
        spec = [s for s in spec if s.select(problem.model)]
    return SVDTruncation(spec)
