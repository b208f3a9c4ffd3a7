"""``ac.export(..., latency_aware=True)``: never slower than dense, layer by layer.

Low-rank ResNet-56 / VGG-16 (direct compression of every conv at q, as ``latency_speedup.py``)
and sparse torchvision ResNet-18 (``Cardinality(density=d)`` on every conv / linear) are exported
twice: plainly, and with ``latency_aware=True`` on a batch-``--batch`` input (each replaced layer
timed against the dense layer holding the same constrained weight; the faster kept).  Outputs of
both equal the finalized dense model's (``assert_close``).  The dense model and both exports are
then timed interleaved (``--rounds`` rounds, median process CPU time per call with 1 thread, and
wall time).

Writes ``docs/results/latency_aware.md``.
Run:  python benchmarks/latency_aware.py [--batch 1] [--rounds 3]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
import warnings

import torch
from torch import nn

import admm_compress as ac
from _report import write_report
from latency_speedup import ARCHS, INPUT, compress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sparse_resnet18(density: float):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    spec = [ac.Constrain((nn.Conv2d, nn.Linear), ac.Cardinality(density=density), view="identity")]
    solver = ac.Solver(spec).prepare(model)
    solver.finalize(model)
    return model, spec


def measure(models: dict, x, rounds: int, repeats: int, warmup: int) -> dict:
    calls = {k: [] for k in models}
    keys = list(models)
    with torch.inference_mode():
        for r in range(rounds):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                for _ in range(warmup):
                    models[k](x)
                for _ in range(repeats):
                    w0, c0 = time.perf_counter(), time.process_time()
                    models[k](x)
                    calls[k].append((1e3 * (time.perf_counter() - w0), 1e3 * (time.process_time() - c0)))
    return {k: (statistics.median(c[0] for c in v), statistics.median(c[1] for c in v)) for k, v in calls.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "latency_aware.md"))
    args = ap.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.threads < 1:
        ap.error("--batch, --rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load0 = os.getloadavg()[0]
    t_all = time.perf_counter()
    cases = []
    for arch in ("ResNet-56", "VGG-16"):
        torch.manual_seed(0)
        dense = ARCHS[arch]().eval()
        fin, _ = compress(ARCHS[arch], args.ratio)
        spec = [ac.Constrain(nn.Conv2d, ac.LowRank(ratio=args.ratio), view="channel")]
        cases.append((f"{arch} low rank q={args.ratio:g}", dense, fin, spec, INPUT))
    d_fin, d_spec = sparse_resnet18(args.density)
    import torchvision

    torch.manual_seed(0)
    cases.append((f"ResNet-18 sparse d={args.density:g}", torchvision.models.resnet18().eval(), d_fin, d_spec,
                   (3, 224, 224)))
    rows, layer_rows = [], []
    for label, dense, fin, spec, in_size in cases:
        x = torch.randn(args.batch, *in_size, generator=torch.Generator().manual_seed(2))
        plain = ac.export(fin, spec).eval()
        t0 = time.perf_counter()
        # = ac.export(fin, spec, latency_aware=True, example_inputs=x), keeping the per-layer report
        aware = ac.export(fin, spec).eval()
        rep = ac.deploy.keep_faster(aware, fin, spec, x)
        t_pass = time.perf_counter() - t0
        with torch.inference_mode():
            ref = fin(x)
            scale = max(float(ref.abs().max()), 1.0)
            for m in (plain, aware):
                torch.testing.assert_close(m(x), ref, rtol=1e-3, atol=1e-4 * scale)
        backend = "pytorch" if "sparse" in label else "aten"  # aten counts a masked conv as dense
        macs = {k: ac.complexity(m, in_size, backend=backend).macs for k, m in
                (("dense", dense), ("plain", plain), ("aware", aware))}
        heavy = in_size[-1] > 100
        lat = measure({"dense": dense, "plain": plain, "aware": aware}, x, args.rounds,
                      repeats=3 if heavy else 15, warmup=1 if heavy else 3)
        n_dense = sum(r["kept"] == "dense" for r in rep)
        cpu = {k: v[1] for k, v in lat.items()}
        wall = {k: v[0] for k, v in lat.items()}
        rows.append([label, str(args.batch), f"{macs['plain'] / macs['dense']:.3f}", f"{macs['aware'] / macs['dense']:.3f}",
                     f"{n_dense}/{len(rep)}", f"{cpu['dense']:.2f}", f"{cpu['plain']:.2f}", f"{cpu['aware']:.2f}",
                     f"**{cpu['dense'] / cpu['plain']:.2f}x**", f"**{cpu['dense'] / cpu['aware']:.2f}x**",
                     f"{wall['dense'] / wall['plain']:.2f}x, {wall['dense'] / wall['aware']:.2f}x", f"{t_pass:.1f}"])
        print(rows[-1], flush=True)
        for r in rep:
            if r["compact_ms"] is not None:
                layer_rows.append([label, r["name"], r["compact"], f"{r['compact_ms']:.3f}", f"{r['dense_ms']:.3f}",
                                   r["kept"]])
    total = time.perf_counter() - t_all

    def table(hdr, rs):
        return "\n".join(["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)] + ["| " + " | ".join(r) + " |" for r in rs])

    text = f"""# Latency-aware export: dense where the compact form is slower

Written by `benchmarks/latency_aware.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,
{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}; {total:.0f} s;
1-minute load average {load0:.1f} at the start (shared machine).

"plain" = `ac.export(model, spec)`; "aware" = `ac.export(model, spec, latency_aware=True, example_inputs=x)`
(each replaced low-rank layer timed against the dense layer with the same constrained weight on its
input, the dense one kept where faster by > 5 %; sparse layers get their faster kernel).  MACs: ptflops
`aten` backend (the ResNet papers' convention), `pytorch` for the sparse model (non-zeros counted).  Both equal the finalized model's outputs.  Latency: median
process CPU time per call (ms), batch {args.batch}; speed-up = dense / export; wall-time speed-ups in
the second-to-last column.

{table(["model", "batch", "MACs plain", "MACs aware", "layers back to dense", "dense ms", "plain ms", "aware ms",
        "plain speed-up", "aware speed-up", "wall (plain, aware)", "pass (s)"], rows)}

## Per layer (CPU ms of the layer alone, compact vs dense)

{table(["model", "layer", "exported as", "compact ms", "dense ms", "kept"], layer_rows)}
"""
    write_report(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
