"""CPU latency of exported tensor-train (TT) layers versus dense, on ResNet-56 / VGG-16 shapes.

For each architecture (CIFAR, 3x32x32; random initialization -- latency does not depend on the
values) the variants are, all built by ``prepare -> finalize -> export`` and checked against the
finalized model's outputs before timing:

* ``oki -X%``: every ``nn.Conv2d`` constrained to ``TTRank((r1, r2))`` on the ``"oki"`` layout
  ``(O, kh*kw, I)`` (``TTView.oki()``), per-layer ranks from
  ``methods.raspa.tt_ranks_for_budget(model, X, "macs")``; exported as three stock convs
  (``1x1 I->r2``, ``3x3 r2->r1``, ``1x1 r1->O``).  This is ``admm_tt``'s / RASPA's L branch.
* ``eq9 r=8``: the literal Eq. 9 layout (balanced ``d = 2`` factors, ``TTRank(8)``), exported as
  ``TTConv2d`` (core-by-core contraction) -- the library's former TT layer, for reference.
* ``raspa -75% + S 5%``: RASPA's ``L + S`` export (the ``oki -75%`` ranks plus a sparse branch
  of density 0.05, ``SumBranches(stock chain, SparseConv2d)``), with every ``SparseConv2d`` on
  its default ``kernel="dense"``: the weight is stored densely with a 0/1 mask and the branch
  runs a *dense* convolution of the full ``O x I x 3 x 3`` kernel, so it costs the dense layer's
  MACs at run time (``aten`` MACs ratio > 1) although ptflops counts it at its non-zeros.  Not a
  speed-up, by construction; shown as the reference.
* ``raspa ... select_kernels``: the same exported model after ``ac.select_kernels(model, x)``
  (``admm_compress.deploy``) on the timed input (per batch size and memory format): each sparse
  branch is timed with the dense kernel and with the ``torch.sparse_csr`` kernel (im2col by
  ``F.unfold``, ``K I`` x ``P`` columns, then a CSR x dense product of ``nnz x P`` MACs) and keeps
  the faster one; the *csr layers* column says how many of the sparse branches took CSR.  This
  is the library's compact sparse path, the fair test of "RASPA's exported model is faster than
  dense where its MACs are at most half".

Latency: median over interleaved rounds (``latency_speedup.measure``), batch 1 and 32,
``torch.set_num_threads(1)`` by default, in both memory formats: NCHW (PyTorch's default) and
channels-last (``model.to(memory_format=torch.channels_last)``, the input converted inside the
timed call) -- on this CPU the thin 1x1 convolutions of the TT chain run several times faster
channels-last.  ``eq9`` is timed at batch 1, NCHW only (it is ~20x slower than dense at batch 32).
MACs by ``ac.complexity(..., backend="aten")`` (counts the convolutions actually run, so the sparse
branch counts as dense there; the ptflops count of
the same model, with the sparse branch at its non-zeros, is given too).

Writes ``docs/results/tt_latency.md``.  Run: ``python benchmarks/tt_latency.py [--quick]`` (10 min on a loaded 2-core machine).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time
import warnings

import torch
from torch import nn

import admm_compress as ac
from _report import write_report
from admm_compress import models
from admm_compress.methods.raspa import raspa, tt_ranks_for_budget
from admm_compress.views import TTView
from latency_speedup import INPUT, check_outputs, measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = {"ResNet-56": models.resnet56, "VGG-16": models.vgg16}


def build(make, kind: str, red: float | None = None, seed: int = 0):
    """(finalized model, exported model) of one variant."""
    torch.manual_seed(seed)
    model = make().eval()
    if kind == "oki":
        ranks = tt_ranks_for_budget(model, red, "macs", input_size=INPUT)
        solver = ac.Solver([ac.Constrain(n, ac.TTRank(r), view=TTView.oki()) for n, r in ranks.items()])
    elif kind == "eq9":
        spec = [ac.Constrain(n, ac.TTRank(8), view=TTView.auto(tuple(m.weight.shape), 2))
                for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        solver = ac.Solver(spec)
    elif kind == "raspa":
        ranks = tt_ranks_for_budget(model, red, "macs", input_size=INPUT, density=0.05)
        solver = raspa(tt_ranks=ranks, density=0.05, decompose_iters=1)
    else:
        raise ValueError(kind)
    solver.prepare(model)
    solver.finalize(model)
    return model, ac.export(model, solver).eval()


class ChannelsLast(nn.Module):
    """``model(x.contiguous(memory_format=torch.channels_last))`` with the model converted."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-56 only, 2 rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "tt_latency.md"))
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    archs = {"ResNet-56": ARCHS["ResNet-56"]} if args.quick else ARCHS
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    sel = "raspa -75% + S 5%, select_kernels"
    variants_spec = [("oki -50%", "oki", 0.5), ("oki -75%", "oki", 0.75), ("eq9 r=8", "eq9", None),
                     ("raspa -75% + S 5%", "raspa", 0.75), (sel, "raspa", 0.75)]
    rows = []
    for arch, make in archs.items():
        torch.manual_seed(0)
        dense = make().eval()
        c0 = ac.complexity(dense, INPUT, backend="aten")
        p0 = ac.complexity(dense, INPUT)
        variants, info, n_csr = {"dense": dense}, {}, {}
        for label, kind, red in variants_spec:
            fin, ex = build(make, kind, red)
            err = check_outputs(fin, ex)
            c = ac.complexity(ex, INPUT, backend="aten")
            cp = ac.complexity(ex, INPUT)
            variants[label] = ex
            info[label] = (c.macs / c0.macs, cp.macs / p0.macs, cp.params / p0.params, err)
            print(f"{arch} {label}: aten MACs x{c.macs / c0.macs:.3f}, ptflops MACs x{cp.macs / p0.macs:.3f}, "
                  f"params x{cp.params / p0.params:.3f}, max rel diff {err:.1e}", flush=True)
        lat = {}
        for fmt in ("nchw", "cl"):
            for b in args.batches:
                vs = {k: (m if fmt == "nchw" else ChannelsLast(copy.deepcopy(m))) for k, m in variants.items()
                      if not (k.startswith("eq9") and (b > 1 or fmt == "cl"))}
                if sel in vs:  # pick each sparse branch's kernel on this very input (batch, format)
                    ac.deploy.clear_kernel_cache()
                    rep = ac.select_kernels(vs[sel], torch.randn(b, *INPUT))
                    n_csr[fmt, b] = f"{sum(r['kernel'] == 'csr' for r in rep)}/{len(rep)}"
                repeats = 3 if b > 1 else 10
                lat[fmt, b] = measure(vs, b, rounds, 1 if b > 1 else 3, repeats)
                print(f"{arch} {fmt} b={b}: " + ", ".join(f"{k} {v[0]:.2f} ms" for k, v in lat[fmt, b].items()),
                      flush=True)
        for label, *_ in variants_spec:
            rows.append((arch, label, *info[label],
                         {(f, b): (lat[f, b]["dense"][0], lat[f, b][label][0]) if label in lat[f, b] else None
                          for f in ("nchw", "cl") for b in args.batches},
                         {key: n_csr.get(key, "-") if label == sel else "-" for key in lat}))
    total = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    hdr = ["model", "variant", "MACs ratio (aten)", "MACs ratio (ptflops)", "params ratio"]
    keys = [(f, b) for f in ("nchw", "cl") for b in args.batches]
    for f, b in keys:
        hdr += [f"dense ms {f} b={b}", f"variant ms {f} b={b}", f"speedup {f} b={b}", f"realized/ideal {f} b={b}",
                f"csr layers {f} b={b}"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for arch, label, ma, mp, pr, err, per, csr in rows:
        cells = [arch, label, f"{ma:.3f}", f"{mp:.3f}", f"{pr:.3f}"]
        for key in keys:
            if per[key] is None:
                cells += ["-"] * 5
                continue
            wd, wv = per[key]
            cells += [f"{wd:.2f}", f"{wv:.2f}", f"**{wd / wv:.2f}x**", f"{wd / wv * mp:.2f}", csr.get(key, "-")]
        table.append("| " + " | ".join(cells) + " |")
    print("\n".join(table))
    text = "\n".join([
        "# Exported TT layers: CPU latency vs dense (benchmarks/tt_latency.py)", "",
        __doc__.split("\n\n", 1)[1].strip(), "",
        *table, "",
        "*realized/ideal* = speedup x MACs ratio (ptflops, the sparse branch at its non-zeros): 1.0 means the "
        "MAC reduction is fully realized as speed-up.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load average {load0:.1f} -> {load:.1f} (shared machine), "
        f"{total:.0f} s in all.", ""])
    write_report(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
