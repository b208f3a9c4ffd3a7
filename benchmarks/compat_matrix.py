"""Compatibility matrix: which compressor works on which model we did not write, and how much smaller.

Every row is a model from torchvision's zoo (random initialization, 3x32x32 input, 10 classes);
every column a compressor with its default settings (the generic solvers with one plain spec).
Each case runs ``prepare -> fit(1 epoch of one batch) -> finalize -> export`` and reports

* ``works``: the exported model's outputs equal the finalized model's (relative max error) and its
  MACs / params (ptflops, pytorch backend) relative to the dense model;
* ``refused``: ``prepare`` raised before any training; the message names the layer and the fix.

``tests/test_compat_matrix.py`` runs the same cases (:func:`run_case`) as assertions.

Run:  python benchmarks/compat_matrix.py [--out docs/results/compat_matrix.md] [--models m1,m2]
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

import admm_compress as ac
from admm_compress import methods

INPUT = (3, 32, 32)


def _projected(model: nn.Module, spec) -> nn.Module:
    """A copy of ``model`` whose constrained weights are replaced by their projections."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for b in ac.resolve(spec, dense):
            b.param.copy_(b.from_view(b.constraint.project(b.to_view(b.param))))
    return dense


def _tv():
    import torchvision

    return torchvision.models


def _efficientnet_b0_narrow():
    """torchvision's EfficientNet-B0 blocks (MBConv, squeeze-excitation, stochastic depth) at a
    quarter of the width and depth, so the test suite can afford it."""
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=10)


MODELS = {  # the architectures as users get them (benchmark)
    "resnet18": lambda: _tv().resnet18(num_classes=10),
    "mobilenet_v2": lambda: _tv().mobilenet_v2(num_classes=10),
    "efficientnet_b0": lambda: _tv().efficientnet_b0(num_classes=10),
}
SMALL_MODELS = {  # the same code paths at a size the default test suite can afford
    "resnet18": MODELS["resnet18"],
    "mobilenet_v2": lambda: _tv().mobilenet_v2(num_classes=10, width_mult=0.25),
    "efficientnet_b0": _efficientnet_b0_narrow,
}

_CONV_LIN = (nn.Conv2d, nn.Linear)

COMPRESSORS = {
    "lowrank": lambda: ac.Solver([ac.Constrain(_CONV_LIN, ac.LowRank(ratio=0.25), skip_unexportable=True)]),
    "sparse": lambda: ac.Solver([ac.Constrain(_CONV_LIN, ac.Cardinality(density=0.2))]),
    "channels": lambda: ac.Solver([ac.Constrain(nn.Conv2d, ac.Cardinality(density=0.5, group_dim=1),
                                                skip_unexportable=True)]),
    "lrpet": lambda: methods.lrpet(),
    "trp": lambda: methods.trp(),
    "lorita": lambda: methods.lorita(rank_ratio=0.25),
    "raspa": lambda: methods.raspa(),
    "decomposable_net": lambda: methods.decomposable_net(),
}


def run_case(model_name: str, compressor: str, seed: int = 0, small: bool = False) -> dict:
    """One cell of the matrix (see the module docstring).

    The whole case runs in float64 (model and data): the finalized and the exported model
    compute the same linear maps in a different order from factors rounded to float64, so they
    agree to ~1e-13 relative, while a wrong rank, a missing layer or a re-selection differs by
    far more than 1e-9.
    """
    torch.manual_seed(seed)
    model = (SMALL_MODELS if small else MODELS)[model_name]()
    dense = copy.deepcopy(model).eval()
    model.double()
    solver = COMPRESSORS[compressor]()
    g = torch.Generator().manual_seed(seed)
    # batch 8: with batch 2, BatchNorm at EfficientNet's 1x1 final resolution normalizes over 2
    # values and the dense model's first gradients reach 1e8 (LoRITa's random factors: 2e10)
    data = [(torch.randn(8, *INPUT, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))]
    t0 = time.perf_counter()
    try:
        solver.prepare(model)
    except (ac.SpecError, ValueError) as e:
        return {"status": "refused", "reason": str(e)}
    n_constrained = len(solver.bindings)
    skipped = len(getattr(solver.bindings, "skipped", []) or [])
    solver.fit(model, data, epochs=1, lr=1e-4, progress=False)
    if compressor != "decomposable_net" and not all(torch.isfinite(p).all() for p in model.parameters()):
        return {"status": "diverged", "reason": "non-finite weights after one training step"}
    model.eval()
    x = torch.randn(2, *INPUT, generator=g, dtype=torch.float64)
    compact = ac.export(model, solver).eval()
    reference = model
    if compressor == "decomposable_net":
        # any size after training: the reference is the trained model projected to the ranks of
        # the configured export size (ac.export has no data to recalibrate BN, neither has this)
        reference = _projected(model, solver.export_spec())
    with torch.no_grad():
        ref = reference(x)
        out = compact(x)
    if not torch.isfinite(ref).all():
        return {"status": "diverged", "reason": "the finalized model's outputs are not finite"}
    rel = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    c0 = ac.complexity(dense, INPUT, backend="pytorch")
    c1 = ac.complexity(compact.float(), INPUT, backend="pytorch")
    return {"status": "works", "rel_err": rel, "macs_ratio": c1.macs / c0.macs,
            "params_ratio": c1.params / c0.params, "n_constrained": n_constrained, "skipped": skipped,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results/compat_matrix.md")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--compressors", default=",".join(COMPRESSORS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    models = args.models.split(",")
    comps = args.compressors.split(",")
    rows, notes = [], []
    for m in models:
        cells = []
        for c in comps:
            try:
                r = run_case(m, c)
            except Exception as e:  # a crash is a result of the matrix, reported as such
                r = {"status": "crash", "reason": f"{type(e).__name__}: {e}"}
            if r["status"] == "works":
                cells.append(f"MACs x{r['macs_ratio']:.2f}, params x{r['params_ratio']:.2f} "
                             f"(err {r['rel_err']:.0e}{', ' + str(r['skipped']) + ' skipped' if r['skipped'] else ''})")
            else:
                notes.append(f"{r['status']} ({m} / {c}): {r['reason']}")
                cells.append(f"{r['status']} ({len(notes)})")
            logging.getLogger(__name__).error("%s / %s: %s", m, c, cells[-1])
        rows.append((m, cells))
    lines = ["# Compatibility matrix", "",
             "Generated by `python benchmarks/compat_matrix.py` (torchvision models, random init, "
             "3x32x32, one training step, then finalize and export). Cells: exported MACs / params "
             "relative to dense (ptflops, pytorch backend), relative max output error of the export "
             "against the finalized model, and layers the method's defaults skipped (depthwise "
             "convs). `refused` = raised at prepare, before training.", "",
             "| model | " + " | ".join(comps) + " |", "|---" * (len(comps) + 1) + "|"]
    for m, cells in rows:
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"({i}) {t}" for i, t in enumerate(notes, 1)]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import write_report

    write_report(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
