"""GPU latency of exported tensor-train (TT) chains and RASPA's ``L + S`` versus dense, on
ResNet-56 / VGG-16 shapes (CIFAR, 3x32x32; random initialization).

The variants are ``tt_latency.py``'s (built on the CPU by ``prepare -> finalize -> export`` and
checked against the finalized model there): ``oki -X%`` (TT ranks from
``tt_ranks_for_budget(model, X, "macs")``, a global singular-value threshold), ``oki -X%,
uniform ranks`` (every conv cut by the same fraction) and ``raspa -X% + S 5%`` (``L + S``: the
stock-conv chain plus ``SparseConv2d``, which runs as a masked dense conv in PyTorch).  Every
model -- dense included -- has its BatchNorms folded (``ac.fold_batchnorm``) and is moved to the
GPU; its output there (TF32 off) is checked against the finalized model's on the GPU (relative
to the largest output: ``1e-4`` covers float32 rounding over ~60 layers, a wrong export is off
by O(1)).

Timing: eager PyTorch (``--graphs``: replays of a CUDA graph captured per model and batch, which
removes the per-kernel launch cost), CUDA events around ``--iters`` forward passes after a
warm-up, the median over ``--rounds`` interleaved rounds (every model once per round, order reversed every
other round); float32 (cuDNN's default TF32 on) and float16 (``model.half()``), batch 1, 32 and
256.  The speed-up is dense time / variant time within the same round set; ``MACs`` is
ptflops' count of the exported model.

Writes ``docs/results/tt_latency_gpu.md`` (or ``--out``; the graphs run of 2026-12-04 is
``tt_latency_gpu_graphs.md``: ``--graphs --batches 1 256 2048 --rounds 3 --iters 30``).  Needs a
CUDA device (``--device cpu`` only smoke-runs the script).
Run: ``python benchmarks/tt_latency_gpu.py [--archs ResNet-56 VGG-16] [--batches 1 32 256] [--graphs]``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch

import admm_compress as ac
from _report import write_report
from latency_speedup import INPUT
from tt_latency import ARCHS, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = [  # label, kind, MAC reduction
    ("oki -50%, uniform ranks", "oki-uniform", 0.5),
    ("oki -75%, uniform ranks", "oki-uniform", 0.75),
    ("oki -75%", "oki", 0.75),
    ("raspa -50% + S 5%", "raspa", 0.5),
    ("raspa -75% + S 5%", "raspa", 0.75),
]


def check_on_gpu(fin: torch.nn.Module, model: torch.nn.Module, dev) -> float:
    x = torch.randn(8, *INPUT, generator=torch.Generator().manual_seed(5)).to(dev)
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            want, got = fin.to(dev)(x), model(x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
        fin.cpu()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= 1e-4:
        raise AssertionError(f"GPU output differs from the finalized model: max rel diff {err:.2e}")
    return err


def time_once(model, x, iters: int) -> float:
    """ms per forward: CUDA events on a GPU (``--device cpu``, a smoke run: wall clock)."""
    with torch.no_grad():
        for _ in range(5):
            model(x)
        if x.device.type != "cuda":
            t = time.perf_counter()
            for _ in range(iters):
                model(x)
            return (time.perf_counter() - t) * 1e3 / iters
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            model(x)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_of(model, x):
    """A CUDA graph of ``model(x)`` (captured after warm-up on a side stream), or ``None`` where the
    model cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g):
            model(x)
        return g
    except Exception as e:  # noqa: BLE001 -- reported as n/a in the table
        print(f"CUDA graph capture failed: {type(e).__name__}: {e}", flush=True)
        return None


def time_graph(g, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--graphs", action="store_true",
                    help="time CUDA-graph replays (no per-kernel launch cost) instead of eager forwards")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only for a smoke run of the script")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "tt_latency_gpu.md"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tt_latency_gpu.py needs a CUDA device (--device cpu: a smoke run)")
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    lines = ["# GPU latency of exported TT chains and RASPA's L + S vs dense", "",
             f"Written by `benchmarks/tt_latency_gpu.py` on {datetime.date.today()} ({platform.machine()}, "
             f"{torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'CPU smoke run'}, torch "
             f"{torch.__version__}); {'CUDA-graph replays' if args.graphs else 'eager PyTorch'}, BatchNorm folded in "
             f"every model, cuDNN benchmark mode, {args.iters} forward passes per timing, median of "
             f"{args.rounds} interleaved rounds.  Speed-up = dense time / variant time (> 1: faster than "
             "dense).  Outputs checked against the finalized models on the GPU first (TF32 off, max relative "
             "difference below).", ""]
    for arch in args.archs:
        make = ARCHS[arch]
        torch.manual_seed(0)
        dense = make().eval()
        dense_macs = ac.complexity(dense, INPUT).macs
        models = {"dense": (dense, dense, dense_macs)}
        for label, kind, red in VARIANTS:
            fin, ex = build(make, kind, red)
            models[label] = (fin, ex, ac.complexity(ex, INPUT).macs)
            print(f"{arch} {label}: built", flush=True)
        ready, errs = {}, {}
        for label, (fin, ex, _) in models.items():
            m = ac.fold_batchnorm(ex.eval()).to(dev)
            errs[label] = check_on_gpu(fin, m, dev)
            ready[label] = m
        labels = list(ready)
        typed = {("float32", lb): m for lb, m in ready.items()}
        if "float16" in args.dtypes:
            typed.update({("float16", lb): copy.deepcopy(m).half() for lb, m in ready.items()})
        times = {(lb, dt, b): [] for lb in labels for dt in args.dtypes for b in args.batches}
        for r in range(args.rounds):
            order = labels if r % 2 == 0 else labels[::-1]
            for dt in args.dtypes:
                for b in args.batches:
                    x = torch.randn(b, *INPUT, device=dev, dtype=getattr(torch, dt))
                    for lb in order:
                        if args.graphs:
                            g = graph_of(typed[dt, lb], x)
                            times[lb, dt, b].append(float("nan") if g is None else time_graph(g, args.iters))
                            del g
                        else:
                            times[lb, dt, b].append(time_once(typed[dt, lb], x, args.iters))
        med = {k: statistics.median(v) for k, v in times.items()}
        cols = [(dt, b) for dt in args.dtypes for b in args.batches]
        lines += [f"## {arch}", "",
                  "| model | MACs ratio | max rel diff | " + " | ".join(f"{dt} b={b}: ms (speed-up)" for dt, b in cols)
                  + " |", "| --- | --- | --- | " + " | ".join("---" for _ in cols) + " |"]
        for lb in labels:
            cells = [f"{med[lb, dt, b]:.3f} ({med['dense', dt, b] / med[lb, dt, b]:.2f}x)" for dt, b in cols]
            lines.append(f"| {lb} | {models[lb][2] / dense_macs:.3f} | {errs[lb]:.1e} | " + " | ".join(cells) + " |")
        lines.append("")
        print("\n".join(lines[-len(labels) - 3:]), flush=True)
    lines.append(f"Total {time.perf_counter() - t0:.0f} s.")
    write_report(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
