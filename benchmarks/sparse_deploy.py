"""Unstructured sparse exports: bytes on disk and CPU latency with the automatically chosen kernel.

For torchvision ResNet-18 (3x224x224, random initialization: neither bytes nor latency depend
on the values) and a 3-layer MLP (2048-2048-2048-10), every ``nn.Conv2d`` / ``nn.Linear`` is
projected onto ``Cardinality(density=d)`` and exported (``SparseConv2d`` / ``SparseLinear``)::

    compact = ac.export(model, [ac.Constrain((nn.Conv2d, nn.Linear), ac.Cardinality(density=d), view="identity")])
    report = ac.select_kernels(compact, x)   # per layer: dense-masked or CSR, whichever is measured faster

Storage: ``ac.saved_bytes`` = size of ``torch.save(model.state_dict())``; the "old" column is what
the former dense-weight + float-mask layers stored (dense + one float mask per sparse weight).
Outputs of the exported model with the chosen kernels are checked against the projected dense
model (``torch.testing.assert_close``, tolerances from float32 summation-order error).

Latency: ``model(x)`` under ``torch.inference_mode``, ``torch.set_num_threads(--threads)``; the
dense model, the exported model with every layer on the dense kernel ("masked") and with the
chosen kernels ("auto") are interleaved over ``--rounds`` rounds, median of all timed calls, in
process CPU time (1 thread: the compute time, blind to other processes) and in wall time.

Writes ``docs/results/sparse_deploy.md``.
Run:  python benchmarks/sparse_deploy.py [--quick] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MLP(nn.Sequential):
    def __init__(self, width=2048, depth=3, n_in=2048, n_out=10):
        layers, d = [], n_in
        for _ in range(depth - 1):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        super().__init__(*layers, nn.Linear(d, n_out))


def _resnet18():
    import torchvision

    return torchvision.models.resnet18()


MODELS = {"ResNet-18": (_resnet18, (3, 224, 224), (1,)), "MLP-2048": (MLP, (2048,), (1, 64))}  # (make, input, batches)


def projected(model, spec):
    dense = copy.deepcopy(model)
    for b in ac.specs.resolve(spec, dense):
        with torch.no_grad():
            b.param.copy_(b.from_view(b.constraint.project(b.to_view(b.param))))
    return dense


def time_models(models: dict, x: torch.Tensor, rounds: int, repeats: int, warmup: int) -> dict:
    """label -> (median wall ms, median process-CPU ms); models interleaved, order reversed every other round."""
    calls = {k: [] for k in models}
    labels = list(models)
    with torch.inference_mode():
        for r in range(rounds):
            for k in (labels if r % 2 == 0 else labels[::-1]):
                for _ in range(warmup):
                    models[k](x)
                for _ in range(repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    models[k](x)
                    calls[k].append((1e3 * (time.perf_counter() - t0), 1e3 * (time.process_time() - c0)))
    return {k: (statistics.median(c[0] for c in v), statistics.median(c[1] for c in v)) for k, v in calls.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="density 0.1 only, fewer calls")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--densities", type=float, nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "sparse_deploy.md"))
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    densities = args.densities or ([0.1] if args.quick else [0.3, 0.1, 0.05])
    for d in densities:
        if not 0 < d <= 1:
            ap.error(f"--densities: each density must be in (0, 1], got {d}")
    rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_all = time.perf_counter()
    load0 = os.getloadavg()[0]
    size_rows, lat_rows, choice_rows = [], [], []
    for mname in args.models:
        make, in_size, batches = MODELS[mname]
        torch.manual_seed(0)
        dense = make().eval()
        dense_bytes = ac.saved_bytes(dense)
        dense_params = ac.complexity(dense, in_size).params
        for d in densities:
            spec = [ac.Constrain((nn.Conv2d, nn.Linear), ac.Cardinality(density=d), view="identity")]
            ref_model = projected(dense, spec).eval()
            compact = ac.export(dense, spec).eval()
            c = ac.complexity(compact, in_size)
            sparse_layers = [m for m in compact.modules() if hasattr(m, "mask")]
            old_bytes = ac.storage_bytes(dense) + sum(m.mask.numel() * m.mask.element_size() for m in sparse_layers)
            rep = ac.deploy.storage_report(compact)
            vals = sum(r["value_bytes"] for r in rep)
            idx = sum(r["index_bytes"] for r in rep)
            fmts = {}
            for r in rep:
                fmts[r["format"]] = fmts.get(r["format"], 0) + 1
            size_rows.append([mname, f"{d:g}", f"{dense_params / 1e6:.3f}", f"{c.params / 1e6:.3f}",
                              f"{dense_bytes / 1e6:.2f}", f"{old_bytes / 1e6:.2f}",
                              f"{ac.saved_bytes(compact) / 1e6:.2f}", f"{ac.saved_bytes(compact) / dense_bytes:.3f}",
                              f"{vals / 1e6:.2f}", f"{idx / 1e6:.2f}", ", ".join(f"{k} {v}" for k, v in sorted(fmts.items()))])
            print(mname, d, size_rows[-1], flush=True)
            for b in batches:
                x = torch.randn(b, *in_size, generator=torch.Generator().manual_seed(1))
                masked = copy.deepcopy(compact)
                for m in masked.modules():  # compact may carry the choice made for another batch size
                    if hasattr(m, "kernel"):
                        m.kernel = "dense"
                t0 = time.perf_counter()
                ac.deploy.clear_kernel_cache()
                chosen = ac.select_kernels(compact, x, repeats=6 if args.quick else 9, timer="cpu")
                t_sel = time.perf_counter() - t0
                n_csr = sum(r["kernel"] == "csr" for r in chosen)
                with torch.inference_mode():
                    out, ref = compact(x), ref_model(x)
                scale = float(ref.abs().max())
                # float32, different summation order: errors ~ eps * sqrt(fan-in) * |activations| per
                # layer, compounded over the depth; 1e-4 relative to the output scale covers it
                torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * max(scale, 1.0))
                lat = time_models({"dense": dense, "masked": masked, "auto": compact}, x, rounds,
                                  repeats=3 if mname == "ResNet-18" else 20, warmup=1 if mname == "ResNet-18" else 3)
                w = {k: v[0] for k, v in lat.items()}
                cpu = {k: v[1] for k, v in lat.items()}
                lat_rows.append([mname, f"{d:g}", str(b), f"{c.macs / 1e6:.1f}", f"{n_csr}/{len(chosen)}",
                                 f"{cpu['dense']:.2f}", f"{cpu['masked']:.2f}", f"{cpu['auto']:.2f}",
                                 f"**{cpu['dense'] / cpu['auto']:.2f}x**", f"{cpu['masked'] / cpu['auto']:.2f}x",
                                 f"{w['dense']:.2f}", f"{w['auto']:.2f}", f"{w['dense'] / w['auto']:.2f}x",
                                 f"{t_sel:.1f}"])
                print(mname, d, b, lat_rows[-1], flush=True)
                if b == batches[0]:
                    for r in chosen:
                        choice_rows.append([mname, f"{d:g}", r["name"], "x".join(map(str, r["shape"])),
                                            "x".join(map(str, r["input_shape"] or ())),
                                            f"{r['dense_ms']:.3f}" if r["dense_ms"] is not None else "-",
                                            f"{r['csr_ms']:.3f}" if r["csr_ms"] is not None else "-", r["kernel"]])
    total = time.perf_counter() - t_all

    def table(hdr, rows):
        return "\n".join(["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
                         + ["| " + " | ".join(r) + " |" for r in rows])

    text = f"""# Sparse exports: bytes on disk and latency with the chosen kernel

Generated by `benchmarks/sparse_deploy.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,
torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s),
load average {load0:.1f} at start (a shared machine: latencies are noisy), {total:.0f} s in all.

Every `nn.Conv2d` / `nn.Linear` projected on `Cardinality(density=d)` and exported; random weights.

## Storage (`torch.save(state_dict)`, MB = 1e6 bytes)

"old" = the former format (dense weight + a float mask per sparse layer); "compact" = values +
the smallest support encoding per layer (bitmask: 1 bit / weight; CSR/COO: 1-2 bytes / non-zero).

{table(["model", "density", "params dense (M)", "params counted (M)", "dense MB", "old MB", "compact MB",
        "compact / dense", "values MB", "index MB", "encodings"], size_rows)}

## Latency (ms, median; `torch.inference_mode`)

"masked" = exported model, every sparse layer on the dense kernel; "auto" = kernels chosen by
`ac.select_kernels` on that input (number of CSR layers shown; it times process CPU time with 1
thread).  Headline: process CPU time of each call (1 thread, so it is the compute time, blind to
the other processes sharing this machine); the wall-clock medians follow, inflated by that load.
speed-up = dense / auto.

{table(["model", "density", "batch", "MACs (M)", "CSR layers", "dense CPU ms", "masked CPU ms",
        "auto CPU ms", "speed-up (CPU)", "masked / auto", "dense wall ms", "auto wall ms",
        "speed-up (wall)", "select (s)"], lat_rows)}

## Per-layer choice (batch 1)

{table(["model", "density", "layer", "weight", "input", "dense ms", "csr ms", "kernel"], choice_rows)}
"""
    write_report(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
