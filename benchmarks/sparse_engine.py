"""RASPA's ``L + S`` and the TT chains in a sparsity-aware CPU engine (DeepSparse) next to ONNX Runtime.

PyTorch and ONNX Runtime run the sparse branch ``S`` of RASPA's export as a dense convolution
(zeros included), or, with ``select_kernels``, as im2col + CSR -- either way it costs about as much
as the dense layer (``docs/results/raspa_sparse_branch.md``), so ``L + S`` is never faster than
dense on ResNet-56.  An engine with unstructured-sparse convolution kernels reads the same ONNX
file (``S`` is a plain ``Conv`` whose weight is 95 % zeros) and skips the zeros.  This script
measures how much of the MAC reduction such an engine turns into time.

Models (CIFAR input 3x32x32, random initialization: time does not depend on the values, only on
the shapes and the sparsity pattern), each built by ``prepare -> finalize -> export`` exactly as
``benchmarks/tt_latency.py`` builds them (its ``build``) and checked against the finalized model:

* ``dense``: the model itself;
* ``oki -X%``: every conv ``TTRank((r1, r2))`` on the oki layout, ranks from
  ``tt_ranks_for_budget(model, X, "macs")``, exported as three stock convs (L only, ``admm_tt``);
* ``raspa -X% + S 5%``: RASPA's ``L + S`` (``raspa(tt_ranks=..., density=0.05)``, ranks from the
  same budget *including* S's non-zeros), exported as ``SumBranches(chain, SparseConv2d)``;
* ``..., uniform``: the same with ranks from ``tt_latency.uniform_ranks`` instead of the global
  singular-value threshold: every conv's chain at the largest ``(r, r)`` within ``1 - X`` (RASPA:
  ``1 - X - 0.05``) of its dense MACs.  On random weights the global threshold leaves ResNet-56's
  16-channel stage at ranks ~15 (chains costing *more* than the dense conv, at channel counts no
  kernel likes) and cuts the 64-channel stage to ranks 1; uniform ranks are weight-independent;
* ``RASPA Table Model I / II`` (``--tables``, ResNet-20, ResNet-56, DenseNet-40): RASPA's own
  models, Tables 8-10's per-layer ranks and sparsities (``raspa_tables.paper_setting``) on the
  default oki layout, built as ``examples/raspa_table1.py`` builds them (a layer whose TT form
  is larger than its dense kernel keeps a dense L branch there, as the export does);
* ``pruned, density d`` (``--pruned``, its own report): no L at all, every conv at
  ``Cardinality(density=d)`` (magnitude pruning per layer, ``admm_sparse``'s / ``prune``'s export),
  i.e. what a sparse engine does for a plainly pruned model.
* ``raspa -50% + S d, uniform`` (``--split``, its own report): one MAC budget, -50 %, split
  between the two branches: S at density d = 0.01 / 0.02 / 0.05 / 0.1 and the uniform chains in
  the rest (``uniform_ranks(model, 0.5 - d)``), next to the chains alone (S 0) -- how the split
  decides whether ``L + S`` at half the MACs runs faster than dense.

``--fold-bn``: every model, the dense one included, goes through ``ac.fold_batchnorm`` first.  Both
engines fold a BatchNorm into a plain ``Conv`` before it themselves, but not one behind the ``Add`` of
an ``L + S`` layer, which then stays a separate pass over the activations; folded, it becomes the
chain's last conv's scale and bias plus a scale of ``S`` (exact: outputs checked as above).

Each is written to ONNX with ``admm_compress.deploy.onnx_session(..., opset=17)`` (DeepSparse 1.8
loads opset <= 19), then timed by ``benchmarks/_engine_timer.py`` in another interpreter that has
``deepsparse`` (``--engine-python``; DeepSparse needs ``onnx < 1.15`` and Python < 3.12, so it
cannot live in this project's environment): DeepSparse ``compile_model(path, batch_size,
num_cores=1)`` and ONNX Runtime (CPU provider, 1 intra-op thread, ``ORT_ENABLE_ALL``) in the same
process, outputs checked against eager PyTorch first (``rtol 1e-3, atol 1e-4 x max(1, max |y|)``:
float32 in other kernels with BatchNorm fused), then interleaved rounds, median process CPU time
per call (one thread: the compute time, less sensitive to the other processes of a shared machine).

*best dense* = the faster engine on the dense model; *speed-up* = best dense / variant;
*share* = ``(1 - variant / best dense) / (1 - MACs ratio)``: the fraction of the MAC reduction
realized as time reduction (the issue's ">= 75 %" target; 1 = time falls as much as MACs).
*DeepSparse wall ms*: wall time of the same calls (close to the CPU time: the engine ran on one core).

DeepSparse (Neural Magic) is proprietary software under its Community License (non-production
use); it is not a dependency of admm_compress and nothing in the library imports it.

Setup:  python -m venv /tmp/dsenv && /tmp/dsenv/bin/pip install deepsparse==1.8.0
Run:    python benchmarks/sparse_engine.py --engine-python /tmp/dsenv/bin/python [--rounds 3] [--batches 1 32]
Writes ``docs/results/sparse_engine.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

import admm_compress as ac
from _report import write_report
from latency_speedup import INPUT, check_outputs
from admm_compress.methods.raspa import raspa
from admm_compress.methods.raspa_tables import paper_setting
from tt_latency import ARCHS, build, uniform_ranks
from tt_latency_floor import footer, share_realized, timing_args

DENSITY = 0.05
# (label, build kind, MAC reduction)
VARIANTS = [("oki -50%", "oki", 0.5), ("oki -75%", "oki", 0.75),
            ("raspa -50% + S 5%", "raspa", 0.5), ("raspa -75% + S 5%", "raspa", 0.75),
            ("oki -50%, uniform", "oki-uniform", 0.5), ("oki -75%, uniform", "oki-uniform", 0.75),
            ("raspa -50% + S 5%, uniform", "raspa-uniform", 0.5), ("raspa -75% + S 5%, uniform", "raspa-uniform", 0.75)]


# --tables: RASPA's own models, Tables 8-10's per-layer ranks and sparsities (raspa_tables.paper_setting)
TABLE_ARCHS = {"ResNet-20": ("resnet20", ac.models.resnet20), "ResNet-56": ("resnet56", ac.models.resnet56),
               "DenseNet-40": ("densenet40", ac.models.densenet40)}
TABLE_VARIANTS = [("RASPA Table Model I", "table", "I"), ("RASPA Table Model II", "table", "II")]
# --pruned: plain magnitude pruning (the admm_sparse export), every conv at this density
PRUNED_VARIANTS = [("pruned, density 0.1", "pruned", 0.1), ("pruned, density 0.05", "pruned", 0.05)]
# --split: one MAC budget (-50 %), its split between L and S: RASPA with S at each density and the
# uniform chains in the rest of the budget (S density 0 = the chains alone, admm_tt's export)
SPLIT_DENSITIES = (0.01, 0.02, 0.05, 0.1)
SPLIT_VARIANTS = ([("oki -50%, uniform (S 0)", "oki-uniform", 0.5)]
                  + [(f"raspa -50% + S {d:g}, uniform", "raspa-uniform", (0.5, d)) for d in SPLIT_DENSITIES])


def build_variant(make, kind: str, red):
    """(finalized, exported): ``tt_latency.build``'s variants; ``raspa-uniform``: RASPA with every
    conv's chain at ``uniform_ranks(model, 1 - red - DENSITY)`` (S's non-zeros inside the budget;
    ``red`` may be ``(reduction, density)`` for another S density);
    ``table``: RASPA with Tables 8-10's ranks and sparsities of the table model ``red`` (``"I"`` /
    ``"II"``) on the default oki layout, as ``examples/raspa_table1.py`` builds it; ``pruned``: every
    conv at ``Cardinality(density=red)`` (per layer, magnitude projection), exported as ``SparseConv2d``."""
    if kind not in ("raspa-uniform", "table", "pruned"):
        return build(make, kind, red)
    torch.manual_seed(0)
    model = make().eval()
    if kind == "pruned":
        solver = ac.Solver([ac.Constrain(nn.Conv2d, ac.Cardinality(density=red))], mode="projection")
    elif kind == "table":
        name = next(k for k, (_, f) in TABLE_ARCHS.items() if f is make)
        tt, dens = paper_setting(TABLE_ARCHS[name][0], red)
        solver = raspa(tt_ranks=tt, density=dens, targets=lambda n, m: n in tt, decompose_iters=1)
    else:
        red, dens = red if isinstance(red, tuple) else (red, DENSITY)
        solver = raspa(tt_ranks=uniform_ranks(model, 1.0 - red - dens), density=dens, decompose_iters=1)
    solver.prepare(model)
    solver.finalize(model)
    return model, ac.export(model, solver).eval()


def export_all(plan, batches, tmp: str, fold_bn: bool = False) -> tuple[dict, dict]:
    """Build, check and write every model of ``plan`` (``[(arch, make, variants)]``); returns (manifest
    for the timer, {key: (arch, label, MACs ratio)}).  ``fold_bn``: every model, dense included,
    through ``ac.fold_batchnorm`` before it is checked and written."""
    xs = {b: torch.randn(b, *INPUT, generator=torch.Generator().manual_seed(6)) for b in batches}
    inputs = {}
    for b, x in xs.items():
        inputs[str(b)] = os.path.join(tmp, f"x{b}.npy")
        np.save(inputs[str(b)], x.numpy())
    models, refs, info = [], {}, {}
    for arch, make, variants in plan:
        torch.manual_seed(0)
        dense = make().eval()
        if fold_bn:
            dense = ac.fold_batchnorm(dense)
        p0 = ac.complexity(dense, INPUT).macs
        todo = [("dense", dense)]
        for label, kind, red in variants:
            fin, ex = build_variant(make, kind, red)
            if fold_bn:
                ex = ac.fold_batchnorm(ex)
            err = check_outputs(fin, ex)
            print(f"{arch} {label}: export equals the finalized model (max rel diff {err:.1e})", flush=True)
            todo.append((label, ex))
        for label, m in todo:
            key = f"{arch} | {label}"
            path = os.path.join(tmp, f"m{len(models)}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ac.deploy.onnx_session(m, torch.randn(1, *INPUT), path, opset=17)
            refs[key] = {}
            for b, x in xs.items():
                with torch.inference_mode():
                    y = m(x)
                refs[key][str(b)] = os.path.join(tmp, f"y{len(models)}_{b}.npy")
                np.save(refs[key][str(b)], y.numpy())
            models.append({"key": key, "path": path})
            info[key] = (arch, label, ac.complexity(m, INPUT).macs / p0)
    return {"models": models, "inputs": inputs, "refs": refs, "batches": list(batches)}, info


def table(res: dict, info: dict, batches) -> list[str]:
    hdr = ["model", "variant", "batch", "MACs ratio", "ORT CPU ms", "DeepSparse CPU ms", "best dense ms",
           "**speed-up (DeepSparse)**", "share (DeepSparse)", "speed-up (ORT)", "DeepSparse wall ms"]
    out = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for b in batches:
        for key, (arch, label, mr) in info.items():
            cell = res[key][str(b)]
            dense = res[f"{arch} | dense"][str(b)]
            best = min(dense["ort"]["cpu_ms"], dense["deepsparse"]["cpu_ms"])
            t_ort, t_ds = cell["ort"]["cpu_ms"], cell["deepsparse"]["cpu_ms"]
            share = "-" if label == "dense" else f"{share_realized(mr, t_ds / best):.2f}"
            out.append("| " + " | ".join([
                arch, label, str(b), f"{mr:.3f}", f"{t_ort:.2f}", f"{t_ds:.2f}", f"{best:.2f}",
                f"**{best / t_ds:.2f}x**", share, f"{best / t_ort:.2f}x",
                f"{cell['deepsparse']['wall_ms']:.2f}"]) + " |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine-python", default=os.environ.get("DEEPSPARSE_PYTHON"),
                    help="an interpreter with deepsparse and onnxruntime (default: $DEEPSPARSE_PYTHON)")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--tables", nargs="*", default=list(TABLE_ARCHS), choices=list(TABLE_ARCHS),
                    help="RASPA's table models (Tables 8-10's ranks and sparsities) to time too")
    ap.add_argument("--fold-bn", action="store_true",
                    help="fold every BatchNorm into the layer before it (ac.fold_batchnorm: also behind L + S "
                         "sums, which the engines do not fold) in every model, dense included; writes "
                         "sparse_engine_folded.md (sparse_engine_pruned_folded.md with --pruned)")
    ap.add_argument("--pruned", action="store_true",
                    help="only dense and plainly pruned models of --archs (every conv at density 0.1 / 0.05; "
                         "no table models); writes sparse_engine_pruned.md")
    ap.add_argument("--split", action="store_true",
                    help="only dense and one -50%% MAC budget split between L and S (S density 0 / "
                         + " / ".join(f"{d:g}" for d in SPLIT_DENSITIES)
                         + ", uniform chains in the rest) for --archs; writes sparse_engine_split.md")
    timing_args(ap, "sparse_engine.md")
    ap.set_defaults(rounds=3)
    args = ap.parse_args(argv)
    if args.out == ap.get_default("out"):  # the default report's name follows --pruned / --split / --fold-bn
        args.out = (args.out[:-3] + ("_pruned" if args.pruned else "") + ("_split" if args.split else "")
                    + ("_folded" if args.fold_bn else "") + ".md")
    if args.pruned and args.split:
        ap.error("--pruned and --split are two reports; give one")
    if not args.engine_python or not os.path.exists(args.engine_python):
        ap.error(f"--engine-python must name an interpreter with deepsparse installed, got {args.engine_python!r} "
                 "(python -m venv /tmp/dsenv && /tmp/dsenv/bin/pip install deepsparse==1.8.0)")
    for name in ("rounds", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(1)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        variants = PRUNED_VARIANTS if args.pruned else SPLIT_VARIANTS if args.split else VARIANTS
        plan = {a: (ARCHS[a], list(variants)) for a in args.archs}
        # a table model joins its architecture's dense model
        for a in ([] if args.pruned or args.split else args.tables):
            plan.setdefault(a, (TABLE_ARCHS[a][1], []))[1].extend(TABLE_VARIANTS)
        man, info = export_all([(a, make, v) for a, (make, v) in plan.items()], args.batches, tmp, args.fold_bn)
        man.update(rounds=args.rounds, threads=args.threads, rtol=1e-3, atol=1e-4)
        mpath, rpath = os.path.join(tmp, "manifest.json"), os.path.join(tmp, "res.json")
        with open(mpath, "w") as fh:
            json.dump(man, fh)
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_engine_timer.py")
        subprocess.run([args.engine_python, worker, mpath, rpath], check=True)
        res = json.load(open(rpath))
    versions = res.pop("_versions")
    rows = table(res, info, args.batches)
    print("\n".join(rows))
    cmd = "python benchmarks/sparse_engine.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = "\n".join([
        "# RASPA's L + S and TT chains in a sparsity-aware engine (benchmarks/sparse_engine.py"
        + (", --fold-bn)" if args.fold_bn else ")"), "",
        (__doc__ or "").split("\n\n", 1)[1].split("\nDeepSparse (Neural Magic)")[0].strip(), "",
        *rows, "",
        f"Engines: DeepSparse {versions['deepsparse']} (Community License, non-production use; not a dependency), "
        f"ONNX Runtime {versions['onnxruntime']}, Python {versions['python']}; {args.rounds} rounds.  "
        f"{footer(args.threads, load0, t0)}  Command: `{cmd}`.", ""])
    write_report(args.out, text)


if __name__ == "__main__":
    main()
