"""Baseline: magnitude pruning with :mod:`torch.nn.utils.prune` (Han et al. 2015).

Dense training, then global (or per-layer) L1-unstructured pruning of every Conv2d / Linear weight
to ``density``, fine-tuning with the masks kept, then ``prune.remove``; export gives sparse layers
(:class:`Cardinality` with the exact per-layer count of non-zeros) whose MACs count non-zeros."""
import torch
from torch import nn
from torch.nn.utils import prune

import admm_compress as ac
from admm_compress.registry import Baseline

NAME = "magnitude_pruning"
KIND = "baseline"
DESCRIPTION = "magnitude pruning (torch.nn.utils.prune, L1 unstructured) to density + masked fine-tuning"
PARAMS = {"density": [0.1, 0.25, 0.5], "scope": ["global", "layer"]}
DEFAULTS = {"density": 0.25, "scope": "global"}


class MagnitudePruning(Baseline):
    def __init__(self, density, scope, keep):
        if not 0 < density <= 1:
            raise ValueError(f"magnitude_pruning: density={density} must be in (0, 1]")
        if scope not in ("global", "layer"):
            raise ValueError(f"magnitude_pruning: scope={scope!r}; choose 'global' or 'layer'")
        self.density, self.scope, self.keep = density, scope, keep
        self.layers = []

    def compress(self, model, loader):
        import fnmatch

        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                       and not any(fnmatch.fnmatchcase(n, k) for k in self.keep)]
        amount = 1.0 - self.density
        if self.scope == "global":
            prune.global_unstructured([(m, "weight") for _, m in self.layers], pruning_method=prune.L1Unstructured,
                                      amount=amount)
        else:
            for _, m in self.layers:
                prune.l1_unstructured(m, "weight", amount=amount)

    def finetune(self, model, loader, epochs, loss_fn, val_loader, device, progress, lr):
        from admm_compress.registry import train_dense

        return train_dense(model, loader, epochs, None, loss_fn, val_loader, device, progress, lr / 10,
                           phase="finetune")  # the masks (forward pre-hooks) stay

    def fit(self, model, loader, epochs=1, **kw):
        hist = super().fit(model, loader, epochs, **kw)
        self.spec = []
        for name, m in self.layers:  # make the pruning permanent; spec = exact non-zero count per layer
            prune.remove(m, "weight")
            k = int(torch.count_nonzero(m.weight))
            if k == 0:
                continue
            self.spec.append(ac.Constrain(name, ac.Cardinality(k=k), name=f"magnitude:{name}"))
        return hist


def build(problem, density, scope):
    return MagnitudePruning(density, scope, tuple(problem.keep_dense) if problem is not None else ())
