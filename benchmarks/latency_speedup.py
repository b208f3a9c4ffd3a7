"""Exported-model CPU latency speedup versus MACs reduction (direct low-rank compression).

For ResNet-56 and VGG-16 (CIFAR, 3x32x32 inputs; random initialization, since latency does
not depend on the values) every ``nn.Conv2d`` is compressed directly to rank
``int(q * min(out, in*kh*kw))`` on the channel view::

    solver = ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(ratio=q))]).prepare(model)
    solver.finalize(model)                 # W = Pi(W): truncated SVD of every conv
    compact = ac.export(model, solver.spec)  # kh x kw conv in->r, then 1x1 conv r->out

(a layer whose factorized form would not be smaller stays dense).  Before any timing, the
exported model's outputs are checked against the finalized dense model's
(``torch.testing.assert_close``, eval mode).  MACs and parameters are counted with
``ac.complexity(..., backend="aten")`` (the papers' ResNet convention: ResNet-56 = 125.49 M).

Latency: forward passes of the eval-mode model under ``torch.inference_mode`` on a fixed random
input, batch 1 and batch 32, ``torch.set_num_threads(--threads)``.  The dense model and the
exported models of one architecture are interleaved over ``--rounds`` rounds (order reversed
every other round), each round = ``--warmup`` untimed calls + ``--repeats`` timed calls per
model; the reported time is the median over all timed calls.  Wall time (``perf_counter``)
is the headline; the process CPU time of the same calls is reported too, because it is
insensitive to other processes on a shared machine.

Writes ``docs/results/latency_speedup.md``.
The same models in ONNX Runtime next to eager: ``benchmarks/latency_onnx.py`` (``docs/results/latency_onnx.md``).

Run:  python benchmarks/latency_speedup.py [--quick] [--threads 1] [--device cuda] [--out docs/results/latency_speedup.md]
(``--device cuda``: timed on the GPU with ``torch.cuda.synchronize`` around each call; the report then
leaves out the CPU-specific reading.)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import admm_compress as ac
from _report import write_report
from admm_compress import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = (3, 32, 32)
ARCHS = {"ResNet-56": models.resnet56, "VGG-16": models.vgg16}
# Decomposable-Net (Yaguchi et al.), for context: 2.26x realized speedup at 0.27x MACs.
DN_SPEEDUP, DN_MACS = 2.26, 0.27


def compress(make, q: float, seed: int = 0):
    """(finalized dense model, exported compact model) for the direct low-rank compression at ratio q."""
    torch.manual_seed(seed)
    model = make().eval()
    solver = ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(ratio=q), view="channel")]).prepare(model)
    feasible = solver.finalize(model)
    if not all(feasible.values()):
        raise RuntimeError(f"q={q}: finalize left infeasible weights: {[k for k, v in feasible.items() if not v]}")
    compact = ac.export(model, solver.spec).eval()
    return model, compact


def check_outputs(finalized: nn.Module, compact: nn.Module, batch: int = 8) -> float:
    """assert_close(exported(x), finalized(x)); returns the max |difference| relative to max |output|."""
    x = torch.randn(batch, *INPUT, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, out = finalized(x), compact(x)
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * max(scale, 1.0))
    return float((out - ref).abs().max()) / max(scale, 1e-12)


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def time_calls(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[tuple[float, float]]:
    """(wall ms, CPU ms) of ``repeats`` calls of ``model(x)`` after ``warmup`` untimed calls
    (on CUDA the device is synchronized before and after each timed call)."""
    out = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(x)
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            model(x)
            _sync(x)
            out.append(((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3))
    return out


def measure(models_by_label: dict, batch: int, rounds: int, warmup: int, repeats: int, device="cpu") -> dict:
    """Median (wall ms, CPU ms) per model; models interleaved, order reversed every other round."""
    x = torch.randn(batch, *INPUT, generator=torch.Generator().manual_seed(2)).to(device)
    labels = list(models_by_label)
    calls = {k: [] for k in labels}
    for r in range(rounds):
        for k in (labels if r % 2 == 0 else labels[::-1]):
            calls[k] += time_calls(models_by_label[k], x, warmup, repeats)
    return {k: (statistics.median(c[0] for c in v), statistics.median(c[1] for c in v)) for k, v in calls.items()}


def realized_range(rows: list) -> dict:
    """arch -> (min, max) of realized / ideal speedup (wall) over ratios and batch sizes."""
    out: dict = {}
    for arch, _, mr, _, _, per_b in rows:
        vals = [v[0] / v[1] * mr for v in per_b.values()]
        lo, hi = out.get(arch, (float("inf"), 0.0))
        out[arch] = (min(lo, *vals), max(hi, *vals))
    return out


def rows_of(rows: list, arch: str) -> list:
    return [r for r in rows if r[0] == arch]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one architecture (ResNet-56), fewer calls")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "latency_speedup.md"))
    args = ap.parse_args(argv)
    try:
        dev = ac.training.resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        ap.error(f"--device: {e}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    for q in args.ratios:
        if not 0.0 < q <= 1.0:
            ap.error(f"--ratios: each ratio must be in (0, 1], got {q}")
    for b in args.batches:
        if b < 1:
            ap.error(f"--batches: each batch size must be >= 1, got {b}")
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1:
        ap.error(f"--rounds must be >= 1, got {rounds}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    archs = {"ResNet-56": ARCHS["ResNet-56"]} if args.quick else ARCHS
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t_all = time.perf_counter()

    rows = []  # (arch, q, macs ratio, params ratio, rel err, {batch: (wall dense, wall q, cpu dense, cpu q)})
    base = {}
    for arch, make in archs.items():
        torch.manual_seed(0)
        dense = make().eval()
        c0 = ac.complexity(dense, INPUT, backend="aten")
        base[arch] = c0
        variants = {"dense": dense}
        info = {}
        for q in args.ratios:
            fin, compact = compress(make, q)
            err = check_outputs(fin, compact)
            c = ac.complexity(compact, INPUT, backend="aten")
            variants[f"q={q:g}"] = compact
            info[q] = (c.macs / c0.macs, c.params / c0.params, err)
            print(f"{arch} q={q:g}: MACs {c.macs / 1e6:.2f} M ({c.macs / c0.macs:.3f}x), params "
                  f"{c.params / 1e6:.3f} M ({c.params / c0.params:.3f}x), max rel. output diff {err:.1e}",
                  flush=True)
        lat = {}
        for b in args.batches:
            # fewer calls for the big batch: keep each model's timed work per round comparable
            repeats = max(5, 40 // b) if b > 1 else (10 if args.quick else 20)
            warmup = 2 if b > 1 else 5
            lat[b] = measure({k: m.to(dev) for k, m in variants.items()}, b, rounds, warmup, repeats, dev)
            print(f"{arch} batch {b}: " + ", ".join(f"{k} {v[0]:.2f} ms" for k, v in lat[b].items()), flush=True)
        for q in args.ratios:
            k = f"q={q:g}"
            rows.append((arch, q, *info[q], {b: (lat[b]["dense"][0], lat[b][k][0], lat[b]["dense"][1], lat[b][k][1])
                                             for b in args.batches}))
    total = time.perf_counter() - t_all
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    hdr = ["model", "q", "MACs ratio", "params ratio", "ideal speedup"]
    for b in args.batches:
        hdr += [f"dense ms (b={b})", f"exported ms (b={b})", f"**speedup b={b}**", f"realized / ideal b={b}",
                f"CPU-time speedup b={b}"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for arch, q, mr, pr, err, per_b in rows:
        cells = [arch, f"{q:g}", f"{mr:.3f}", f"{pr:.3f}", f"{1 / mr:.2f}x"]
        for b in args.batches:
            wd, wq, cd, cq = per_b[b]
            cells += [f"{wd:.2f}", f"{wq:.2f}", f"**{wd / wq:.2f}x**", f"{(wd / wq) * mr:.2f}", f"{cd / cq:.2f}x"]
        table.append("| " + " | ".join(cells) + " |")
    print("\n".join(table))

    # MAC throughput: how efficiently each variant's convolutions run (GMAC/s = MACs x batch / latency)
    thr_hdr = ["model", "variant", "MACs (M)"] + [f"GMAC/s b={b}" for b in args.batches]
    thr = ["| " + " | ".join(thr_hdr) + " |", "|" + " --- |" * len(thr_hdr)]
    for arch in archs:
        c0 = base[arch]
        dense_ms = {b: rows_of(rows, arch)[0][5][b][0] for b in args.batches}
        thr.append("| " + " | ".join([arch, "dense", f"{c0.macs / 1e6:.1f}"]
                                     + [f"{c0.macs * b / (dense_ms[b] * 1e-3) / 1e9:.1f}"
                                        for b in args.batches]) + " |")
        for _, q, mr, _, _, per_b in rows_of(rows, arch):
            thr.append("| " + " | ".join([arch, f"q={q:g}", f"{c0.macs * mr / 1e6:.1f}"]
                                         + [f"{c0.macs * mr * b / (per_b[b][1] * 1e-3) / 1e9:.1f}"
                                            for b in args.batches]) + " |")
    print("\n".join(thr))

    cmd = " ".join(["python benchmarks/latency_speedup.py", *(sys.argv[1:] if argv is None else argv)]).strip()
    gpu = dev.type == "cuda"
    cpu = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
           f"{args.threads} torch thread(s)")
    if gpu:
        cpu = f"GPU {torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}), " + cpu
    reading = [] if gpu else [
         "Reading: the factorized layers are a kh x kw conv with r output channels and a 1x1 conv with "
         "r input channels.  When r is small in absolute terms (ResNet-56 has 16-64 channels, so q = "
         "0.125 gives r = 2-8 on the channel view) the CPU convolution kernels run at a small fraction "
         "of the dense layers' MAC throughput, and the extra layer adds per-layer overhead (more "
         "kernel calls; BatchNorm, ReLU and the residual add are unchanged), so the realized speedup "
         "is far below the MACs reduction; with VGG-16's 64-512 channels the ranks stay large and a "
         "larger part of the MACs reduction is realized.  Realized / ideal per model, over all q and "
         "batch sizes: " + "; ".join(f"{a} {lo:.2f}-{hi:.2f}" for a, (lo, hi) in realized_range(rows).items())
         + ".  (A `torch.profiler` run during development, "
         "ResNet-56, q = 0.125, batch 32, one thread: `mkldnn_convolution` took 239 ms for 330 calls "
         "vs 251 ms for the dense model's 165 calls, at 7x fewer MACs.)", ""]
    L = [f"# Exported-model {'GPU' if gpu else 'CPU'} latency speedup versus MACs reduction", "",
         f"Written by `{cmd}` on {datetime.date.today().isoformat()}, {cpu}, torch {torch.__version__}; "
         f"{total:.0f} s in total; 1-minute load average {load0:.1f} at the start, {load:.1f} at the end "
         "(shared machine: when the load exceeds the number of cores, trust the CPU-time column more).", "",
         "Direct low-rank compression of every `nn.Conv2d` (channel view, rank `int(q * min(out, "
         "in*kh*kw))`; stem included, FC layers dense): `Solver([Constrain(nn.Conv2d, LowRank(ratio=q))])"
         ".prepare(model)`, `solver.finalize(model)`, `ac.export(model, solver.spec)` -> a kh x kw conv "
         "in->r followed by a 1x1 conv r->out (layers whose factorized form is not smaller stay dense).  "
         "Random initialization (latency does not depend on values).  Exported outputs equal the "
         "finalized model's (`assert_close`, rtol 1e-3; max relative difference "
         f"{max(r[4] for r in rows):.1e}).", "",
         "MACs and parameters: `ac.complexity(model, (3, 32, 32), backend=\"aten\")`; dense "
         + ", ".join(f"{a} {c.macs / 1e6:.2f} M MACs / {c.params / 1e6:.3f} M params" for a, c in base.items())
         + ".", "",
         f"Latency: eval mode, `torch.inference_mode()`, one fixed random input per batch size; dense and "
         f"exported models of one architecture interleaved over {rounds} rounds (order reversed every "
         "other round), each round with untimed warm-up calls (5 at batch 1, 2 otherwise) and timed calls "
         "(20 at batch 1; max(5, 40 / batch) otherwise); median over all timed calls.  *ideal speedup* = "
         "dense MACs / exported MACs; *speedup* = dense / exported median wall time; *realized / ideal* = "
         "speedup x MACs ratio; *CPU-time speedup* = the same ratio from process CPU time.", "",
         *table, "",
         "MAC throughput of the same measurements (MACs x batch / median wall time): where it drops "
         "for the exported model, the speedup falls short of the MACs reduction.", "",
         *thr, "",
         *reading,
         f"For context, Decomposable-Net reports a realized {DN_SPEEDUP}x at {DN_MACS}x MACs (ideal "
         f"{1 / DN_MACS:.2f}x, realized / ideal {DN_SPEEDUP * DN_MACS:.2f}).", ""]
    write_report(args.out, "\n".join(L))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
