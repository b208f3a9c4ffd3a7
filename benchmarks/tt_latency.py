"""CPU latency of exported tensor-train (TT) layers versus dense, on ResNet-56 / VGG-16 shapes.

For each architecture (CIFAR, 3x32x32; random initialization -- latency does not depend on the
values) the variants are, all built by ``prepare -> finalize -> export`` and checked against the
finalized model's outputs before timing:

* ``oki -X%``: every ``nn.Conv2d`` constrained to ``TTRank((r1, r2))`` on the ``"oki"`` layout
  ``(O, kh*kw, I)`` (``TTView.oki()``), per-layer ranks from
  ``methods.raspa.tt_ranks_for_budget(model, X, "macs")``; exported as three stock convs
  (``1x1 I->r2``, ``3x3 r2->r1``, ``1x1 r1->O``).  This is ``admm_tt``'s / RASPA's L branch.
* ``oki -X%, realized (MACs | latency)``: the same exported model after
  ``admm_compress.layers.tt_realize.realize_tt(model, rule, x)``: each chain replaced by the
  cheapest of four exact realizations of the same linear map -- the chain, ``fold_first``
  (``kxk I->r1``, ``1x1 r1->O``), ``fold_last`` (``1x1 I->r2``, ``kxk r2->O``) or one dense
  ``kxk`` conv -- by fewest MACs, or by measured CPU time on the layer's real input in the timed
  batch size and memory format (the *per-layer choice* column counts them).  A layer realized
  dense counts dense MACs: the *MACs ratio* column is ptflops' count of the model actually timed.
* ``oki -75%, uniform ranks``: ranks ``(r, r)`` per layer, the largest whose chain costs at most
  25 % of that layer's dense MACs (``uniform_ranks``) instead of the global singular-value
  threshold, which on random weights leaves ResNet-56's 16-channel stage at ranks ~12 and cuts the
  wider stages to ranks 1-4.
* ``eq9 r=8``: the literal Eq. 9 layout (balanced ``d = 2`` factors, ``TTRank(8)``), exported as
  ``TTConv2d`` (core-by-core contraction) -- the library's former TT layer, for reference.
* ``raspa -75% + S 5%``: RASPA's ``L + S`` export (the ``oki -75%`` ranks plus a sparse branch
  of density 0.05, ``SumBranches(stock chain, SparseConv2d)``), with every ``SparseConv2d`` on
  its default ``kernel="dense"``: a masked *dense* convolution of the full ``O x I x 3 x 3``
  kernel (ptflops counts it at its non-zeros; what runs costs the dense layer's MACs).
* ``..., select_kernels``: after ``ac.select_kernels(model, x)`` on the timed input: each sparse
  branch timed with the dense kernel and with the ``torch.sparse_csr`` kernel (im2col by
  ``F.unfold``, then a CSR x dense product of ``nnz x P`` MACs), the faster kept (*csr n/m*).
* ``..., select_kernels + realized (latency, L+S densified where faster)``: then ``realize_tt(...,
  "latency", x, sum_dense=True)``: chains realized as above, and each ``L + S`` layer compared
  with one dense conv holding ``L + S`` (``dense_sum``), kept where faster -- such a layer counts
  *dense* MACs (it is no longer compressed at run time; the MACs ratio shows it).

Latency: median process CPU time (one torch thread: the compute, blind to other processes on the
shared machine; wall-clock speed-ups in a column too) over interleaved rounds
(``latency_speedup.measure``), batch 1 and 32, in both memory formats: NCHW and channels-last
(model and input converted).  ``eq9`` is timed at batch 1, NCHW only.  Every variant's outputs are
checked against its finalized model (``latency_speedup.check_outputs``) before timing.

Writes ``docs/results/tt_latency.md`` (``--fuse``: ``tt_latency_fused.md``, every BatchNorm folded into
the conv before it in the dense model and in each variant; ``--ort``: ``tt_latency_ort.md``, ONNX
Runtime; ``--jit``: ``tt_latency_jit.md``, every model -- dense and variant alike -- run as
``torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))``, timed next to its eager
self).  Run: ``python benchmarks/tt_latency.py [--quick] [--archs ...] [--only LABEL ...]
[--fuse | --ort | --jit]`` (~20 min on a loaded 2-core machine; --fuse / --ort with fewer variants ~6 min).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import sys
import time
import warnings

import torch
from torch import nn

import admm_compress as ac
from _report import write_report
from admm_compress import models
from admm_compress.methods.raspa import raspa, tt_ranks_for_budget
from admm_compress.layers.tt_realize import realize_tt
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
    elif kind == "oki-uniform":
        ranks = uniform_ranks(model, 1.0 - red)
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


def uniform_ranks(model: nn.Module, keep: float) -> dict:
    """Per-layer oki ranks ``(r, min(r, I))``: the largest ``r`` whose chain costs at most ``keep`` x the
    layer's dense MACs (per output position, the first 1x1 map at the input resolution; at least 1) --
    every conv reduced by the same fraction, instead of ``tt_ranks_for_budget``'s global threshold
    (which, on random weights, leaves the 16-channel stage of ResNet-56 at ranks ~12 and cuts the
    others to 1-4)."""
    from admm_compress.layers.tt import tt_oki_cost

    out = {}
    for n, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        O, I, kh, kw = m.weight.shape
        s = m.stride[0] * m.stride[1]
        best = 1
        for r in range(1, O + 1):
            if tt_oki_cost(tuple(m.weight.shape), (r, min(r, I)), in_positions=s)[1] <= keep * O * I * kh * kw:
                best = r
        out[n] = (best, min(best, I))
    return out


class ChannelsLast(nn.Module):
    """``model(x.contiguous(memory_format=torch.channels_last))`` with the model converted."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


def realized(model: nn.Module, rule: str, x: torch.Tensor | None, sum_dense: bool = False):
    """A copy of an exported model with every oki chain (and, with ``sum_dense``, every ``L + S``
    layer) on its chosen realization (:func:`admm_compress.layers.tt_realize.realize_tt`)."""
    m = copy.deepcopy(model)
    rep = realize_tt(m, rule, x, sum_dense=sum_dense)
    return m, rep


def choice_summary(rep: list) -> str:
    counts: dict = {}
    for r in rep:
        counts[r["chosen"]] = counts.get(r["chosen"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


# (label, build kind, reduction, post-export step): "chain" = as exported; "macs" / "latency" =
# realize_tt with that rule (latency: chosen per batch size and memory format on the timed input)
VARIANTS = [("oki -50%", "oki", 0.5, "chain"), ("oki -50%, realized (latency)", "oki", 0.5, "latency"),
            ("oki -75%", "oki", 0.75, "chain"), ("oki -75%, realized (MACs)", "oki", 0.75, "macs"),
            ("oki -75%, realized (latency)", "oki", 0.75, "latency"),
            ("oki -75%, uniform ranks", "oki-uniform", 0.75, "chain"),
            ("oki -75%, uniform ranks, realized (latency)", "oki-uniform", 0.75, "latency"),
            ("eq9 r=8", "eq9", None, "chain"),
            ("raspa -75% + S 5%", "raspa", 0.75, "chain"),
            ("raspa -75% + S 5%, select_kernels", "raspa", 0.75, "select"),
            ("raspa -75% + S 5%, select_kernels + realized (latency, L+S densified where faster)",
             "raspa", 0.75, "select+latency")]


def _variant(ex: nn.Module, fin: nn.Module, fmt: str, post: str, xf: torch.Tensor):
    """(model, per-layer-choice note): the exported ``ex`` in memory format ``fmt`` after the post-export
    step ``post`` (chosen on the timed input ``xf``); a changed model is re-checked against ``fin``."""
    m = ex if fmt == "nchw" else copy.deepcopy(ex).to(memory_format=torch.channels_last)
    note = "-"
    if post in ("macs", "latency"):
        m, rep = realized(m, post, xf)
        note = choice_summary(rep)
    elif post.startswith("select"):
        m = copy.deepcopy(m)
        ac.deploy.clear_kernel_cache()
        rep = ac.select_kernels(m, xf)
        note = f"csr {sum(r['kernel'] == 'csr' for r in rep)}/{len(rep)}"
        if post == "select+latency":
            m, rep2 = realized(m, "latency", xf, sum_dense=True)
            note += "; " + choice_summary(rep2)
    if post != "chain":  # the realized model still computes the finalized one
        check_outputs(fin, m)
    return m, note



def _arch_setup(arch, variants_spec):
    """``(dense, dense complexity, built)`` of one architecture: the dense model (seed 0,
    eval) and ``{(kind, reduction): (finalized, exported, max rel diff)}``, each distinct variant
    built once and its export checked against the finalized model."""
    make = ARCHS[arch]
    torch.manual_seed(0)
    dense = make().eval()
    built = {}
    for _label, kind, red, _post in variants_spec:
        if (kind, red) not in built:
            fin, ex = build(make, kind, red)
            err = check_outputs(fin, ex)
            built[kind, red] = (fin, ex, err)
            print(f"{arch} {kind} {red}: max rel diff {err:.1e}", flush=True)
    return dense, ac.complexity(dense, INPUT), built


def _inputs(b, fmt):
    """The timed input of batch ``b`` (seed 3) and its copy in the memory format ``fmt``."""
    x = torch.randn(b, *INPUT, generator=torch.Generator().manual_seed(3))
    return x, (x.contiguous(memory_format=torch.channels_last) if fmt == "cl" else x)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-56 only, 2 rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--formats", nargs="+", default=["nchw", "cl"], choices=["nchw", "cl"])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--only", nargs="+", default=None, help="variant labels to run (default: all)")
    ap.add_argument("--ort", action="store_true", help="only the ONNX Runtime table (tt_latency_ort.md)")
    ap.add_argument("--fuse", action="store_true",
                    help="fold every BatchNorm into the conv before it (torch.fx fuse), in the dense model and in "
                         "every variant after its realization; writes tt_latency_fused.md")
    ap.add_argument("--jit", action="store_true",
                    help="TorchScript: every model (dense and each variant, after its realization) as "
                         "optimize_for_inference(freeze(script(model))), timed next to its eager self; "
                         "writes tt_latency_jit.md")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "tt_latency.md"))
    args = ap.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if sum((args.fuse, args.ort, args.jit)) > 1:
        ap.error("--fuse, --ort and --jit are exclusive")
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    archs = ["ResNet-56"] if args.quick else args.archs
    if args.ort:
        return ort_main(args, archs)
    if args.jit:
        return jit_main(args, archs, rounds)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    variants_spec = list(VARIANTS)
    if args.only:
        variants_spec = [v for v in variants_spec if v[0] in args.only]
    rows = []
    for arch in archs:
        dense, p0, built = _arch_setup(arch, variants_spec)
        for fmt in args.formats:
            for b in args.batches:
                x, xf = _inputs(b, fmt)
                d = _fused(dense, fmt) if args.fuse else dense
                vs, info = {"dense": d if fmt == "nchw" else ChannelsLast(copy.deepcopy(d))}, {}
                for label, kind, red, post in variants_spec:
                    if kind == "eq9" and (b > 1 or fmt == "cl"):
                        continue
                    fin, ex, err = built[kind, red]
                    m, note = _variant(ex, fin, fmt, post, xf)
                    if args.fuse:
                        m = _fused(m, fmt)
                        check_outputs(fin, m)
                    cp = ac.complexity(m, INPUT)
                    info[label] = (cp.macs / p0.macs, cp.params / p0.params, note)
                    vs[label] = m if fmt == "nchw" else _CL(m)
                repeats = 3 if b > 1 else 10
                lat = measure(vs, b, rounds, 1 if b > 1 else 3, repeats)
                print(f"{arch} {fmt} b={b}: " + ", ".join(f"{k} {v[1]:.2f} ms" for k, v in lat.items()), flush=True)
                for label, (mr, pr, note) in info.items():
                    rows.append((arch, label, fmt, b, mr, pr, lat["dense"], lat[label], note))
    total = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    hdr = ["model", "variant", "format", "batch", "MACs ratio", "params ratio", "dense CPU ms", "variant CPU ms",
           "**speedup (CPU)**", "realized / ideal", "speedup (wall)", "per-layer choice"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for arch, label, fmt, b, mr, pr, (wd, cd), (wv, cv), note in rows:
        table.append("| " + " | ".join([arch, label, fmt, str(b), f"{mr:.3f}", f"{pr:.3f}", f"{cd:.2f}", f"{cv:.2f}",
                                        f"**{cd / cv:.2f}x**", f"{cd / cv * mr:.2f}", f"{wd / wv:.2f}x", note]) + " |")
    print("\n".join(table))
    summ = []
    for arch in archs:
        for label, *_ in variants_spec:
            vals = [cd / cv * mr for a, lab, _, _, mr, _, (_, cd), (_, cv), _ in rows if a == arch and lab == label]
            if vals:
                summ.append(f"| {arch} | {label} | {min(vals):.2f} | {max(vals):.2f} |")
    text = "\n".join([
        "# Exported TT layers: CPU latency vs dense (benchmarks/tt_latency.py" + (" --fuse)" if args.fuse else ")"), "",
        *(["**--fuse**: every BatchNorm folded into the convolution before it "
           "(`torch.fx.experimental.optimization.fuse`, exact in eval mode), in the dense model and in each "
           "variant (after `realize_tt`); outputs re-checked.  The variants are described below.", ""]
          if args.fuse else []),
        __doc__.split("\n\n", 1)[1].strip(), "",
        "Realized / ideal over the measured formats and batch sizes (1.0: the MAC reduction fully realized as "
        "speed-up; the issue's target for the TT branch: >= 0.75):", "",
        "| model | variant | min | max |", "| --- | --- | --- | --- |", *summ, "",
        *table, "",
        "*MACs ratio*: ptflops count (`ac.complexity`) of the very model timed, over the dense model's: a chain "
        "realized as a dense conv counts dense MACs, a densified `L + S` layer too; a sparse branch counts its "
        "non-zeros whichever kernel runs it.  *speedup (CPU)* = dense / variant median process CPU time (one "
        "torch thread: the compute time, blind to the other processes on this shared machine); *realized / ideal* "
        "= speedup (CPU) x MACs ratio.  *per-layer choice*: realizations chosen by `realize_tt` (counts), CSR "
        "kernels chosen by `select_kernels`.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load average {load0:.1f} -> {load:.1f} (shared 2-core machine), "
        f"{total:.0f} s in all, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", ""])
    out = args.out.replace("tt_latency.md", "tt_latency_fused.md") if args.fuse else args.out
    write_report(out, text)
    print(f"wrote {out}")


ORT_VARIANTS = [("oki -50%", "oki", 0.5, "chain"), ("oki -75%", "oki", 0.75, "chain"),
                ("oki -75%, realized (MACs)", "oki", 0.75, "macs"),
                ("oki -75%, uniform ranks", "oki-uniform", 0.75, "chain"),
                ("oki -75%, uniform ranks, realized (MACs)", "oki-uniform", 0.75, "macs")]


def ort_main(args, archs) -> None:
    """``--ort``: the TT variants in ONNX Runtime (CPU, 1 intra-op thread; BatchNorm and ReLU fused into
    the convolutions by ORT's graph optimizations, for the dense model too), median process CPU time,
    rounds interleaved; writes ``docs/results/tt_latency_ort.md``."""
    import statistics
    import tempfile

    from admm_compress.deploy import onnx_session

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    rounds = args.rounds or 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            make = ARCHS[arch]
            torch.manual_seed(0)
            dense = make().eval()
            p0 = ac.complexity(dense, INPUT)
            models_ = {"dense": (dense, 1.0)}
            built = {}
            for label, kind, red, post in ORT_VARIANTS:
                if (kind, red) not in built:
                    built[kind, red] = build(make, kind, red)
                fin, ex = built[kind, red]
                m = ex
                if post == "macs":
                    m, _ = realized(ex, "macs", None)
                check_outputs(fin, m)
                models_[label] = (m, ac.complexity(m, INPUT).macs / p0.macs)
            runs = {}
            for label, (m, _) in models_.items():
                path = os.path.join(tmp, "m.onnx")
                run = onnx_session(m, torch.randn(1, *INPUT), path, args.threads)
                x = torch.randn(4, *INPUT, generator=torch.Generator().manual_seed(5))
                with torch.inference_mode():
                    ref = m(x)
                torch.testing.assert_close(torch.from_numpy(run(x.numpy())), ref, rtol=1e-3,
                                           atol=1e-4 * max(1.0, float(ref.abs().max())))
                runs[label] = run
            for b in args.batches:
                xb = torch.randn(b, *INPUT, generator=torch.Generator().manual_seed(6)).numpy()
                times = {k: [] for k in runs}
                for r in range(rounds):
                    for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                        for _ in range(2):
                            runs[k](xb)
                        for _ in range(10 if b == 1 else 3):
                            c = time.process_time()
                            runs[k](xb)
                            times[k].append(1e3 * (time.process_time() - c))
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"ORT {arch} b={b}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()), flush=True)
                for label, (m, mr) in models_.items():
                    if label != "dense":
                        rows.append((arch, label, b, mr, med["dense"], med[label]))
    hdr = ["model", "variant", "batch", "MACs ratio", "dense ORT CPU ms", "variant ORT CPU ms", "**speedup**",
           "realized / ideal"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for arch, label, b, mr, d, v in rows:
        table.append("| " + " | ".join([arch, label, str(b), f"{mr:.3f}", f"{d:.2f}", f"{v:.2f}", f"**{d / v:.2f}x**",
                                        f"{d / v * mr:.2f}"]) + " |")
    print("\n".join(table))
    text = "\n".join([
        "# Exported TT layers in ONNX Runtime: CPU latency vs dense (benchmarks/tt_latency.py --ort)", "",
        "The variants of `docs/results/tt_latency.md` (same builds; `realized (MACs)`: `realize_tt(model, "
        "\"macs\")`), exported with `admm_compress.deploy.onnx_session` (TorchScript-based ONNX export, ORT "
        "`CPUExecutionProvider`, 1 intra-op thread, ORT_ENABLE_ALL: BatchNorm and activations fused into the "
        "convolutions for the dense model as for the compressed one).  ORT outputs checked against eager, eager "
        "against the finalized model.  Median process CPU time per call over interleaved rounds; *MACs ratio*: "
        "ptflops count of the exported model; *realized / ideal* = speedup x MACs ratio.", "",
        *table, "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (shared 2-core machine), "
        f"{time.perf_counter() - t0:.0f} s, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", ""])
    write_report(args.out.replace("tt_latency.md", "tt_latency_ort.md"), text)


# --jit: the oki variants (chain and realized), eq9 and RASPA's L + S with its default masked-dense kernel
JIT_VARIANTS = [v for v in VARIANTS if v[0] in (
    "oki -50%", "oki -50%, realized (latency)", "oki -75%", "oki -75%, realized (MACs)",
    "oki -75%, realized (latency)", "eq9 r=8", "raspa -75% + S 5%")]


def _jit(model: nn.Module, x: torch.Tensor):
    """(``optimize_for_inference(freeze(script(model)))``, how): ``torch.jit.trace`` on ``x`` where scripting
    fails (``how`` then names the scripting error)."""
    model = model.eval()
    try:
        s = torch.jit.script(model)
        how = "script"
    except Exception as e:  # noqa: BLE001 -- any scripting failure falls back to tracing
        how = f"trace (script failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})"
        print(f"  torch.jit.script failed, tracing: {e}", flush=True)
        with torch.no_grad():
            s = torch.jit.trace(model, x, check_trace=False)
    return torch.jit.optimize_for_inference(torch.jit.freeze(s.eval())), how


def _graph_ops(j) -> str:
    """Counts of the conv / layout / BatchNorm nodes in a frozen, optimized TorchScript graph."""
    kinds: dict = {}
    for n in j.graph.nodes():
        kinds[n.kind()] = kinds.get(n.kind(), 0) + 1
    keys = [("prim::mkldnn_convolution", "mkldnn conv"), ("aten::conv2d", "conv2d"), ("aten::_convolution", "conv"),
            ("aten::to_mkldnn", "to_mkldnn"), ("aten::to_dense", "to_dense"), ("aten::batch_norm", "batch_norm"),
            ("aten::relu", "relu"), ("aten::relu_", "relu_")]
    return ", ".join(f"{name} {kinds[k]}" for k, name in keys if kinds.get(k))


def jit_main(args, archs, rounds) -> None:
    """``--jit``: every model -- the dense one and each variant (after its realization, in its memory
    format) -- as ``torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))`` (BatchNorm
    folded into the conv by ``freeze``; convs moved to oneDNN/MKLDNN tensors and kernels by
    ``optimize_for_inference``), outputs checked against the eager model and the finalized one, then timed
    in the same interleaved rounds as its eager self (``measure``, process CPU time); writes
    ``docs/results/tt_latency_jit.md``."""
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    variants_spec = [v for v in VARIANTS if v[0] in args.only] if args.only else list(JIT_VARIANTS)
    rows, dense_rows, graphs, failures = [], [], {}, []
    for arch in archs:
        dense, p0, built = _arch_setup(arch, variants_spec)
        for fmt in args.formats:
            for b in args.batches:
                x, xf = _inputs(b, fmt)
                d = dense if fmt == "nchw" else ChannelsLast(copy.deepcopy(dense))
                dj, how = _jit(d, xf)
                err = check_outputs(dense, dj)
                graphs.setdefault((arch, "dense", fmt), (_graph_ops(dj), how, err))
                vs, info = {"dense": d, "dense [jit]": dj}, {}
                for label, kind, red, post in variants_spec:
                    if kind == "eq9" and (b > 1 or fmt == "cl"):
                        continue
                    fin, ex, _ = built[kind, red]
                    m, note = _variant(ex, fin, fmt, post, xf)
                    m = m if fmt == "nchw" else _CL(m)
                    try:
                        mj, how = _jit(m, xf)
                        check_outputs(m, mj)  # jit == eager
                        err = check_outputs(fin, mj)  # and == the finalized model
                    except Exception as e:  # noqa: BLE001 -- reported, the variant is left out
                        msg = f"{arch} {label} {fmt} b={b}: {type(e).__name__}: {e}"
                        print("  FAILED " + msg, flush=True)
                        failures.append(msg)
                        continue
                    graphs.setdefault((arch, label, fmt), (_graph_ops(mj), how, err))
                    cp = ac.complexity(m, INPUT)
                    info[label] = (cp.macs / p0.macs, note, how)
                    vs[label], vs[label + " [jit]"] = m, mj
                with torch.inference_mode():  # the profiling executor specializes on the first calls
                    for k, mod in vs.items():
                        if k.endswith("[jit]"):
                            for _ in range(3):
                                mod(xf)
                repeats = 3 if b > 1 else 10
                lat = measure(vs, b, rounds, 1 if b > 1 else 3, repeats)
                print(f"{arch} {fmt} b={b}: " + ", ".join(f"{k} {v[1]:.2f} ms" for k, v in lat.items()), flush=True)
                dense_rows.append((arch, fmt, b, lat["dense"], lat["dense [jit]"]))
                for label, (mr, note, how) in info.items():
                    rows.append((arch, label, fmt, b, mr, lat["dense"], lat[label], lat["dense [jit]"],
                                 lat[label + " [jit]"], note, how))
    total = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def share(d, v, mr):  # fraction of the MAC reduction realized as latency reduction
        return (1 - v / d) / (1 - mr) if mr < 1 else float("nan")

    hdr = ["model", "variant", "format", "batch", "MACs ratio", "dense eager CPU ms", "variant eager CPU ms",
           "speedup (eager)", "realized / ideal (eager)", "dense jit CPU ms", "variant jit CPU ms",
           "**speedup (jit)**", "**realized / ideal (jit)**", "share (eager)", "**share (jit)**",
           "speedup (jit, wall)", "per-layer choice"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for arch, label, fmt, b, mr, (_, cd), (_, cv), (wdj, cdj), (wvj, cvj), note, how in rows:
        table.append("| " + " | ".join([
            arch, label + ("" if how == "script" else f" [{how}]"), fmt, str(b), f"{mr:.3f}", f"{cd:.2f}",
            f"{cv:.2f}", f"{cd / cv:.2f}x", f"{cd / cv * mr:.2f}", f"{cdj:.2f}", f"{cvj:.2f}", f"**{cdj / cvj:.2f}x**",
            f"**{cdj / cvj * mr:.2f}**", f"{share(cd, cv, mr):.2f}", f"**{share(cdj, cvj, mr):.2f}**",
            f"{wdj / wvj:.2f}x", note]) + " |")
    print("\n".join(table))
    dtab = ["| model | format | batch | dense eager CPU ms | dense jit CPU ms | jit speed-up over eager |",
            "| --- | --- | --- | --- | --- | --- |"]
    for arch, fmt, b, (_, ce), (_, cj) in dense_rows:
        dtab.append(f"| {arch} | {fmt} | {b} | {ce:.2f} | {cj:.2f} | {ce / cj:.2f}x |")
    gtab = ["| model | variant | format | conversion | max rel. diff vs finalized | optimized graph |",
            "| --- | --- | --- | --- | --- | --- |"]
    for (arch, label, fmt), (ops, how, err) in graphs.items():
        gtab.append(f"| {arch} | {label} | {fmt} | {how} | {err:.1e} | {ops} |")
    summ = []
    for arch in archs:
        for label, *_ in variants_spec:
            r = [row for row in rows if row[0] == arch and row[1] == label]
            if not r:
                continue
            e = [cd / cv * mr for _, _, _, _, mr, (_, cd), (_, cv), *_ in r]
            j = [cdj / cvj * mr for _, _, _, _, mr, _, _, (_, cdj), (_, cvj), *_ in r]
            sj = [share(cdj, cvj, mr) for _, _, _, _, mr, _, _, (_, cdj), (_, cvj), *_ in r]
            summ.append(f"| {arch} | {label} | {min(e):.2f} to {max(e):.2f} | **{min(j):.2f} to {max(j):.2f}** | "
                        f"{min(sj):.2f} to {max(sj):.2f} |")
    cmd = shlex.join(["python", "benchmarks/tt_latency.py", *args._argv])
    text = "\n".join([
        "# Exported TT layers under TorchScript: CPU latency vs dense (benchmarks/tt_latency.py --jit)", "",
        f"Written by `{cmd}`.  Every model -- the dense one and each variant of `docs/results/tt_latency.md` "
        "(same builds; realized variants chosen by `realize_tt` in *eager* mode on the timed input, per batch "
        "size and memory format) -- converted with `torch.jit.optimize_for_inference(torch.jit.freeze("
        "torch.jit.script(model.eval())))` (`torch.jit.trace` on the timed input where scripting fails: the "
        "variant label says so): `freeze` folds each BatchNorm into its conv, `optimize_for_inference` moves "
        "the convs to oneDNN (`prim::mkldnn_convolution` on MKLDNN tensors; the graph table below counts what "
        "is left of BatchNorm and ReLU), "
        "converting layouts itself (`to_mkldnn` / `to_dense` around the ops it cannot keep in MKLDNN: the "
        "residual add/pad shortcut, pooling, the classifier) -- so *channels-last* only changes the layout "
        "of the input the graph receives.  Each TorchScript model's outputs checked against its eager model "
        "and against the finalized model (`latency_speedup.check_outputs`: `assert_close`, rtol 1e-3, atol "
        "1e-4 x max |output|); three untimed calls at the timed batch size (the profiling executor "
        "specializes on them), then timed in the same interleaved rounds as the eager models "
        f"(`latency_speedup.measure`, {rounds} rounds, median process CPU time, {args.threads} torch "
        "thread(s)).", "",
        "*realized / ideal* = speedup x MACs ratio (the convention of the other tables: measured speed-up over "
        "the MACs-implied one); *share* = (1 - latency ratio) / (1 - MACs ratio): the fraction of the MAC "
        "reduction realized as latency reduction (the issue's target for either: >= 0.75).", "",
        "| model | variant | realized / ideal, eager (min-max) | **realized / ideal, jit** | share, jit |",
        "| --- | --- | --- | --- | --- |", *summ, "",
        *table, "",
        "Dense model, TorchScript vs eager (same rounds):", "", *dtab, "",
        "Conversion and optimized graphs (node counts in the frozen, optimized forward graph; first batch "
        "size of each format):", "", *gtab, "",
        *(["Failures (variant left out):", "", *[f"* `{f}`" for f in failures], ""] if failures else []),
        "*MACs ratio*: ptflops count (`ac.complexity`) of the eager model timed, over the dense model's (a chain "
        "realized as a dense conv counts dense MACs; a sparse branch counts its non-zeros, though its default "
        "kernel runs the masked dense conv).  *speedup* = dense / variant median process CPU time, eager next "
        "to eager and jit next to jit; *per-layer choice*: realizations chosen by `realize_tt` (counts).", "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load average {load0:.1f} -> {load:.1f} (shared 2-core machine), "
        f"{total:.0f} s in all, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", ""])
    out = args.out.replace("tt_latency.md", "tt_latency_jit.md")
    write_report(out, text)
    print(f"wrote {out}")


def _fused(model: nn.Module, fmt: str) -> nn.Module:
    """``model`` with each BatchNorm folded into the conv before it (eval mode; in the memory format)."""
    from torch.fx.experimental.optimization import fuse

    inner = model.model if isinstance(model, _CL) else model
    out = fuse(copy.deepcopy(inner).eval())
    return out.to(memory_format=torch.channels_last) if fmt == "cl" else out


class _CL(nn.Module):
    """``model(x.contiguous(memory_format=torch.channels_last))`` (the model already channels-last)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


if __name__ == "__main__":
    main()
