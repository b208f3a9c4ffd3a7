"""LoRITa training cost: fit time of N = 2 and N = 3 relative to N = 1, measured in one run.

Every configuration trains the same model on the same batches with ``methods.lorita(N)``
(``truncation=None``; N = 1 is the plain model through the same code path).  The N values are
interleaved over ``--repeats`` rounds and the median epoch time is reported, so machine noise
hits all N alike.  Models: LoRITa's FCN-8 (width 96) on 64-d inputs, and a ResNet-20 on
3x32x32 inputs (synthetic tensors; the cost does not depend on the values).

Writes ``docs/results/lorita_speed.md``.

Run:  python benchmarks/lorita_speed.py [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from admm_compress import models
from admm_compress.methods.lorita import lorita
from _report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(shape, n_batches, batch_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, *shape, generator=g).to(device),
             torch.randint(0, 10, (batch_size,), generator=g).to(device)) for _ in range(n_batches)]


def epoch_time(make_model, n_factors, data, device, epochs):
    """Median wall time of ``epochs`` training epochs (after one warm-up epoch)."""
    torch.manual_seed(0)
    model = make_model().to(device)
    s = lorita(n_factors, 5e-4, truncation=None)
    s.fit(model, data, epochs=epochs + 1, lr=0.01, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(s.fit_times[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "lorita_speed.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = {
        "FCN-8 (width 96), batch 128, 20 batches/epoch, input 64":
            (lambda: models.fcn(depth=8, width=96), batches((64,), 20, 128, device)),
        "ResNet-20, batch 32, 2 batches/epoch, input 3x32x32":
            (lambda: models.resnet20(num_classes=10), batches((3, 32, 32), 2, 32, device)),
    }
    Ns = (1, 2, 3)
    rows = []
    t_all = time.perf_counter()
    for label, (make, data) in cases.items():
        times = {N: [] for N in Ns}
        for r in range(args.repeats):
            for N in (Ns if r % 2 == 0 else tuple(reversed(Ns))):
                times[N].append(epoch_time(make, N, data, device, args.epochs))
        med = {N: statistics.median(v) for N, v in times.items()}
        rows.append((label, med))
        print(label, {N: f"{t * 1e3:.1f} ms" for N, t in med.items()}, flush=True)
    total = time.perf_counter() - t_all
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s)")
    L = ["# LoRITa training cost: N = 2, 3 vs. N = 1", "",
         f"Written by `benchmarks/lorita_speed.py` on {dev}, torch {torch.__version__}; "
         f"{args.repeats} interleaved rounds x {args.epochs} timed epochs (after one warm-up epoch) per N, "
         f"median epoch time; {total:.0f} s in total.  Each weight of every `Conv2d`/`Linear` is "
         "trained as a product of N factors (`inner=\"min\"`) with `torch.nn.utils.parametrize`; "
         "N = 1 is the plain model through the same `Solver.fit` loop (SGD, momentum 0.9).", "",
         "| model | N=1 epoch (ms) | N=2 epoch (ms) | N=3 epoch (ms) | N=2 / N=1 | N=3 / N=1 |",
         "| --- | --- | --- | --- | --- | --- |"]
    for label, med in rows:
        L.append(f"| {label} | {med[1] * 1e3:.1f} | {med[2] * 1e3:.1f} | {med[3] * 1e3:.1f} | "
                 f"{med[2] / med[1]:.2f} | {med[3] / med[1]:.2f} |")
    L += ["", "Ratios are fit-time ratios per training epoch (the weight products are recomputed on every "
          "forward pass; the forward/backward through the factors adds the matrix products of the "
          "factors, whose cost is independent of the batch size, so the ratio shrinks for larger batches "
          "and spatial sizes).", ""]
    write_report(args.out, "\n".join(L))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
