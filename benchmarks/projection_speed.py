"""All-layer projection time (the Z-step) for CIFAR ResNet-56 and VGG-16, measured in one run.

Every ``Conv2d`` weight is projected onto ``LowRank(ratio=q)`` in its "channel" view
``(out, in*kh*kw)``.  Methods, timed in interleaved rounds (median of ``--repeats``):

(a) ``loop exact``       one exact SVD per layer, in a Python loop (``LowRank.project``);
(b) ``Solver batched``   the library's Z-step as the Solver does it: ``Solver(spec).prepare(model)``
                         then ``solver.update()`` (ADMM Z- and U-step; conv weights of equal viewed
                         shape are stacked and projected in one batched SVD);
(b') ``stacked project`` the batched SVD alone: one ``LowRank.project`` per group of equal shapes;
(c) ``loop auto``        ``LowRank(ratio=q, svd="auto")``: randomized SVD (``torch.svd_lowrank``,
                         ``oversample=10``, ``niter=2``) on the layers where the rule applies
                         (``min(m, n) > 256`` and ``r <= min(m, n) / 4``), exact elsewhere;
(c') ``loop randomized`` ``svd="randomized"`` on every layer;
(b'') ``Solver auto``    (b) with the ``svd="auto"`` set.

Approximation error of randomized vs. exact: per layer ``||W - P_rand(W)||_F / ||W - P_exact(W)||_F``
on the freshly initialized weights (a nearly flat, Marchenko-Pastur-like spectrum: the hard case
for randomized SVD) and on the same weights with their spectrum replaced by a power law
``s_i = s_1 / i`` (closer to trained weights).

Writes ``docs/results/projection_speed.md``.

Run:  python benchmarks/projection_speed.py [--ratio 0.25] [--repeats 3] [--threads 1] [--float64]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

import admm_compress as ac
from admm_compress import models
from admm_compress.sets import LowRank
from _report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KA, KB, KB1, KC, KC2, KB2 = ("(a) loop exact", "(b) Solver batched", "(b') stacked project",
                             "(c) loop auto", "(c') loop randomized", "(b'') Solver auto")


NOTES = [
    "Reading the table: on CPU, LAPACK runs a batched SVD as a loop over the batch, so stacking "
    "equal-shaped weights ((b'), (b)) saves only Python and dispatch overhead, and (b) also pays "
    "the Solver's stacking copies, U-step and residual norms (GPUs were not measured here). The "
    "randomized SVD is what cuts the time of large layers (VGG-16's 512 x 4608 views); ResNet-56's "
    "layers are at most 64 x 576, where `auto` keeps the exact SVD. The price is a few percent of "
    "projection error on a flat spectrum with `niter=2` (raise `niter` or `oversample` to close "
    "it), much less on a decaying one. Timings on a shared machine are noisy; compare ratios "
    "within one run.",
    "",
]


def conv_views(model):
    """``(name, W.reshape(out, -1))`` for every Conv2d (the "channel" view)."""
    return [(n, m.weight.detach().reshape(m.weight.shape[0], -1))
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def make_solver(model, ratio, svd):
    spec = ac.Constrain(nn.Conv2d, LowRank(ratio=ratio, svd=svd), view="channel")
    return ac.Solver(spec, rho=1e-3, every=1).prepare(model)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def error_ratios(views, ratio, method):
    """Per-layer ``||W - P_method(W)|| / ||W - P_exact(W)||`` (float64 reference)."""
    out = []
    for _, v in views:
        v = v.double()
        s = LowRank(ratio=ratio, svd=method)
        if s.svd_method_for(v.shape) != "randomized":
            continue
        e_ex = float(torch.linalg.matrix_norm(v - LowRank(ratio=ratio).project(v)))
        e_rd = float(torch.linalg.matrix_norm(v - s.project(v)))
        out.append(e_rd / e_ex if e_ex > 0 else 1.0)
    return out


def power_law(views):
    """The same singular vectors with singular values ``s_1 / i``."""
    res = []
    for n, v in views:
        U, s, Vh = torch.linalg.svd(v.double(), full_matrices=False)
        t = s[0] / torch.arange(1, s.numel() + 1, dtype=torch.float64)
        res.append((n, ((U * t) @ Vh).to(v.dtype)))
    return res


def bench_model(name, make, args, device, dtype):
    torch.manual_seed(0)
    model = make().to(device=device, dtype=dtype)
    views = conv_views(model)
    by_shape = {}
    for _, v in views:
        by_shape.setdefault(tuple(v.shape), []).append(v)
    groups = list(by_shape.values())
    exact, auto, rand = (LowRank(ratio=args.ratio, svd=k) for k in ("exact", "auto", "randomized"))
    solver = make_solver(model, args.ratio, "exact")
    solver_auto = make_solver(model, args.ratio, "auto")
    methods = {
        KA: lambda: [exact.project(v) for _, v in views],
        KB: solver.update,
        KB1: lambda: [exact.project(torch.stack(g)) for g in groups],
        KC: lambda: [auto.project(v) for _, v in views],
        KC2: lambda: [rand.project(v) for _, v in views],
        KB2: solver_auto.update,
    }
    warm = [timed(f, device) for f in methods.values()]  # warm-up (LAPACK workspace, first calls)
    # cheap models get more rounds (about 1 s per method), so the median is not one noisy sample
    repeats = max(args.repeats, min(50, int(1.0 / max(max(warm), 1e-3))))
    times = {k: [] for k in methods}
    keys = list(methods)
    for r in range(repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            times[k].append(timed(methods[k], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_auto = sum(auto.svd_method_for(v.shape) == "randomized" for _, v in views)
    shapes = len({tuple(v.shape) for _, v in views})
    return dict(model=name, dtype=str(dtype).replace("torch.", ""), layers=len(views), shapes=shapes,
                n_auto=n_auto, med=med, views=views, repeats=repeats)


def fmt_ratio(xs):
    if not xs:
        return "n/a", "n/a"
    return f"{statistics.median(xs):.4f}", f"{max(xs):.4f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.25, help="LowRank(ratio=q), default 0.25")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: stable numbers on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--float64", action="store_true",
                    help="also time float64 weights (adds about 2 minutes on 1 CPU thread)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "projection_speed.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = {"ResNet-56": models.resnet56, "VGG-16": models.vgg16}
    dtypes = [torch.float32] + ([torch.float64] if args.float64 else [])
    t_all = time.perf_counter()
    rows = []
    for dtype in dtypes:
        for name, make in cases.items():
            res = bench_model(name, make, args, device, dtype)
            rows.append(res)
            print(res["model"], res["dtype"], {k: f"{v * 1e3:.1f} ms" for k, v in res["med"].items()},
                  flush=True)
    errs = []
    for res in rows:
        if res["dtype"] != "float32":
            continue
        views = [(n, v.cpu()) for n, v in res["views"]]
        pl = power_law(views)
        errs.append((res["model"], "init", "auto", error_ratios(views, args.ratio, "auto")))
        errs.append((res["model"], "init", "randomized", error_ratios(views, args.ratio, "randomized")))
        errs.append((res["model"], "s_i = s_1 / i", "auto", error_ratios(pl, args.ratio, "auto")))
        errs.append((res["model"], "s_i = s_1 / i", "randomized", error_ratios(pl, args.ratio, "randomized")))
    total = time.perf_counter() - t_all

    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)")
    cmd = "python benchmarks/projection_speed.py" + (f" --ratio {args.ratio}" if args.ratio != 0.25 else "") \
        + (f" --repeats {args.repeats}" if args.repeats != 3 else "") \
        + (f" --threads {args.threads}" if args.threads != 1 else "") \
        + (f" --device {args.device}" if args.device != "cpu" else "") \
        + (" --float64" if args.float64 else "")
    L = ["# Z-step speed: all-layer low-rank projection, exact vs. batched vs. randomized", "",
         f"Command: `{cmd}`", "",
         f"Machine: {dev}; torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); "
         f"Python {platform.python_version()}.  Interleaved rounds after one warm-up round "
         f"(at least {args.repeats}; more for cheap models, about 1 s per method: "
         + ", ".join(f"{r['model']} {r['dtype']} {r['repeats']}" for r in rows)
         + f"), median wall time; {total:.0f} s in total.", "",
         f"Every `Conv2d` weight (stem included) viewed as `(out, in*kh*kw)` and projected onto "
         f"`LowRank(ratio={args.ratio})`.  (a) one `LowRank.project` (exact SVD) per layer in a "
         "loop; (b) `Solver(spec, rho=1e-3).prepare(model)` then `solver.update()` (Z-step with "
         "equal-shaped weights stacked into one batched SVD, plus the U-step and residuals); "
         "(b') the batched SVD alone (one `LowRank.project` per group of equal shapes); "
         "(c) `svd=\"auto\"` per layer (randomized where `min(m, n) > 256` and `r <= min(m, n)/4`, "
         "exact elsewhere); (c') `svd=\"randomized\"` on every layer (`oversample=10`, `niter=2`); "
         "(b'') (b) with the `svd=\"auto\"` set.", "",
         "| model | dtype | conv layers (distinct shapes) | layers randomized by auto | (a) loop exact (ms) "
         "| (b) Solver batched (ms) | (b') stacked project (ms) | (c) loop auto (ms) | (c') loop randomized (ms) | (b'') Solver auto (ms) "
         "| (b)/(a) | (b')/(a) | (c)/(a) | (c')/(a) | (b'')/(a) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m = r["med"]
        a = m[KA]
        L.append(f"| {r['model']} | {r['dtype']} | {r['layers']} ({r['shapes']}) | {r['n_auto']} | "
                 + " | ".join(f"{m[k] * 1e3:.1f}" for k in (KA, KB, KB1, KC, KC2, KB2)) + " | "
                 + " | ".join(f"{m[k] / a:.2f}" for k in (KB, KB1, KC, KC2, KB2)) + " |")
    if len(dtypes) > 1:
        L += ["", "float64 / float32 time ratio of the same method:", "",
              "| model | (a) | (b) | (b') | (c) | (c') |", "| --- | --- | --- | --- | --- | --- |"]
        for name in cases:
            r32 = next(r for r in rows if r["model"] == name and r["dtype"] == "float32")["med"]
            r64 = next(r for r in rows if r["model"] == name and r["dtype"] == "float64")["med"]
            ks = [KA, KB, KB1, KC, KC2]
            L.append(f"| {name} | " + " | ".join(f"{r64[k] / r32[k]:.2f}" for k in ks) + " |")
    L += ["", "Approximation error of the randomized projection relative to the exact one, per layer "
          "`||W - P_rand(W)||_F / ||W - P_exact(W)||_F` (1 = optimal, Eckart-Young), computed in float64 "
          "on the layers the method randomizes:", "",
          "| model | weights | method | layers | median ratio | max ratio |",
          "| --- | --- | --- | --- | --- | --- |"]
    for model, spec, method, xs in errs:
        med, mx = fmt_ratio(xs)
        L.append(f"| {model} | {spec} | {method} | {len(xs)} | {med} | {mx} |")
    L += ["", "\"init\" = the freshly initialized weights (nearly flat spectrum, the hard case for a "
          "randomized range finder); \"s_i = s_1 / i\" = the same singular vectors with a power-law "
          "spectrum, closer to trained weights.  No trained weights are available offline.", ""] + NOTES
    write_report(args.out, "\n".join(L))
    print("\n".join(L))
    print(f"wrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
