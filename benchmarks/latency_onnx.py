"""Exported-model latency in PyTorch eager and in ONNX Runtime (CPU execution provider).

The low-rank models of ``benchmarks/latency_speedup.py`` (direct compression of every conv of
ResNet-56 / VGG-16 on the channel view at ratio ``q``, default 0.25 -> ~0.28x MACs) and their dense
originals are exported with ``torch.onnx.export`` (the TorchScript-based exporter,
``dynamo=False``, a dynamic batch axis: 5-10x faster to export here than ``dynamo=True``, the
same graph of Conv / BatchNorm / Relu / Add nodes) and run in an ``onnxruntime.InferenceSession``
(``CPUExecutionProvider``, ``intra_op_num_threads = --threads``, default graph optimizations).

Checks before timing: ORT outputs equal the eager outputs (``assert_close``; float32, other
kernels and fused BatchNorm: rtol 1e-3, atol 1e-4 x output scale), and the exported low-rank
model equals the finalized dense one (``check_outputs`` of ``latency_speedup.py``).

Timing: process CPU time and wall time of each call (1 thread: CPU time is the compute time,
blind to the other processes of a shared machine), dense and compressed models in both runtimes
interleaved over ``--rounds`` rounds, medians.  Speed-up = dense / compressed in the same runtime.

Writes ``docs/results/latency_onnx.md``.
Run:  python benchmarks/latency_onnx.py [--ratio 0.25] [--batches 1 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

import admm_compress as ac
from _report import write_report
from latency_speedup import ARCHS, INPUT, check_outputs, compress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def to_ort(model: torch.nn.Module, path: str, threads: int):
    import onnxruntime as ort

    x = torch.randn(1, *INPUT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"x": a})[0]


def check_ort(model, run, batch: int) -> float:
    x = torch.randn(batch, *INPUT, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(x)
    out = torch.from_numpy(run(x.numpy()))
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * max(scale, 1.0))
    return float((out - ref).abs().max()) / max(scale, 1e-12)


def timed(fn, arg, warmup: int, repeats: int) -> list[tuple[float, float]]:
    for _ in range(warmup):
        fn(arg)
    out = []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn(arg)
        out.append((1e3 * (time.perf_counter() - w0), 1e3 * (time.process_time() - c0)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "latency_onnx.md"))
    args = ap.parse_args(argv)
    if not 0 < args.ratio <= 1:
        ap.error(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.threads < 1 or args.rounds < 1 or any(b < 1 for b in args.batches):
        ap.error("--threads, --rounds and every --batches value must be >= 1")
    try:
        import onnxruntime
    except ImportError:
        ap.error("needs onnx and onnxruntime: pip install 'admm-compress[onnx]'")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load0 = os.getloadavg()[0]
    t_all = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            torch.manual_seed(0)
            dense = ARCHS[arch]().eval()
            fin, compact = compress(ARCHS[arch], args.ratio)
            err_export = check_outputs(fin, compact)
            mr = ac.complexity(compact, INPUT, backend="aten").macs / ac.complexity(dense, INPUT, backend="aten").macs
            runs, errs = {}, []
            for label, m in (("dense", dense), ("compressed", compact)):
                t0 = time.perf_counter()
                ort_run = to_ort(m, os.path.join(tmp, f"{arch}-{label}.onnx"), args.threads)
                print(f"{arch} {label}: ONNX export + session {time.perf_counter() - t0:.1f} s", flush=True)
                errs += [check_ort(m, ort_run, b) for b in (1, 4)]

                def eager(a, m=m):
                    with torch.inference_mode():
                        return m(a)
                runs[("eager", label)] = (eager, False)
                runs[("ort", label)] = (ort_run, True)
            for b in args.batches:
                x = torch.randn(b, *INPUT, generator=torch.Generator().manual_seed(2))
                xn = x.numpy()
                repeats, warmup = (20, 5) if b == 1 else (max(5, 40 // b), 2)
                calls = {k: [] for k in runs}
                keys = list(runs)
                for r in range(args.rounds):
                    for k in (keys if r % 2 == 0 else keys[::-1]):
                        fn, numpy_in = runs[k]
                        calls[k] += timed(fn, xn if numpy_in else x, warmup, repeats)
                med = {k: (statistics.median(c[0] for c in v), statistics.median(c[1] for c in v))
                       for k, v in calls.items()}
                rows.append((arch, mr, b, med, max(errs), err_export))
                print(arch, b, {f"{k[0]}/{k[1]}": f"{v[1]:.2f} ms cpu" for k, v in med.items()}, flush=True)
    total = time.perf_counter() - t_all
    hdr = ["model", "MACs ratio", "ideal", "batch", "eager dense", "eager compr.", "**eager speed-up**",
           "ORT dense", "ORT compr.", "**ORT speed-up**", "realized / ideal (eager, ORT)", "ORT vs eager (compr.)",
           "wall speed-up (eager, ORT)"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for arch, mr, b, med, _, _ in rows:
        c = {k: v[1] for k, v in med.items()}
        w = {k: v[0] for k, v in med.items()}
        se, so = c["eager", "dense"] / c["eager", "compressed"], c["ort", "dense"] / c["ort", "compressed"]
        table.append("| " + " | ".join([
            arch, f"{mr:.3f}", f"{1 / mr:.2f}x", str(b), f"{c['eager', 'dense']:.2f}", f"{c['eager', 'compressed']:.2f}",
            f"**{se:.2f}x**", f"{c['ort', 'dense']:.2f}", f"{c['ort', 'compressed']:.2f}", f"**{so:.2f}x**",
            f"{se * mr:.2f}, {so * mr:.2f}", f"{c['eager', 'compressed'] / c['ort', 'compressed']:.2f}x",
            f"{w['eager', 'dense'] / w['eager', 'compressed']:.2f}x, {w['ort', 'dense'] / w['ort', 'compressed']:.2f}x",
        ]) + " |")
    text = "\n".join([
        "# Low-rank exports in PyTorch eager and ONNX Runtime", "",
        f"Written by `benchmarks/latency_onnx.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; {total:.0f} s; 1-minute load average {load0:.1f} at the start "
        "(shared machine).", "",
        f"Direct low-rank compression of every conv at q = {args.ratio:g} (as `latency_speedup.py`), random "
        "weights.  ORT outputs equal eager outputs (max relative difference "
        f"{max(r[4] for r in rows):.1e}); the exported model equals the finalized dense one (max relative "
        f"difference {max(r[5] for r in rows):.1e}).", "",
        "Latency: median process CPU time per call, ms (1 thread; wall-time speed-ups in the last column).  "
        "realized / ideal = speed-up x MACs ratio (1 = the whole MACs reduction realized).", "",
        *table, ""])
    write_report(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
