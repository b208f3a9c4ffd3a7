"""What RASPA's sparse branch S costs on CPU, per layer, against the dense convolution it sits beside.

For the three 3x3 conv shapes of ResNet-56 (16, 32, 64 channels at 32x32, 16x16, 8x8) and two
VGG-16 ones (256 channels at 8x8, 512 at 4x4), a random kernel pruned to density 0.05 (the
``S`` of ``raspa(density=0.05)``) is applied to a random input, batch 1 and 32, one torch thread,
median process CPU time (best of 3 interleaved rounds), by:

* ``dense``: ``SparseConv2d(kernel="dense")`` -- the masked kernel as a dense conv (NCHW);
* ``dense CL``: the same dense conv in channels-last (model and input converted);
* ``csr (unfold)``: ``SparseConv2d(kernel="csr")``, the library's sparse kernel: im2col by
  ``F.unfold`` (``9 I x P`` columns), then one ``torch.sparse_csr`` x dense product;
* ``csr CL unfold``: the input in channels-last, unfolded into ``(B H W) x 9 I`` rows (a strided
  window view of the padded NHWC tensor, copied once), then one CSR x dense product;
* ``csr per tap``: a prototype without im2col: for each of the 9 taps ``t``, the ``O x I`` CSR
  slice ``S_t`` times the input as an ``I x (B H W)`` matrix, shifted and added into the output
  (``nnz`` MACs per position plus 9 shifted adds of the output).

Every kernel's output is checked against ``F.conv2d`` with the masked kernel first.  *MACs
ratio* = nnz / (O I 9): what ptflops counts for S.  *S / best dense* = the best sparse kernel's time
over the faster dense conv's (NCHW or CL): below 1 the sparse branch is cheaper than the dense layer; ``L + S`` can
only be faster than dense where S alone is well below 1 (the chain L costs time too).

Writes ``docs/results/raspa_sparse_branch.md``.  Run: ``python benchmarks/raspa_sparse_branch.py``
(~1 min).
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
import torch.nn.functional as F

from _report import write_report
from admm_compress.layers import SparseConv2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [("ResNet-56 stage 1", 16, 32), ("ResNet-56 stage 2", 32, 16), ("ResNet-56 stage 3", 64, 8),
          ("VGG-16 block 3", 256, 8), ("VGG-16 block 4", 512, 4)]


def per_tap(taps, x: torch.Tensor, O: int) -> torch.Tensor:
    """3x3, stride 1, padding 1 convolution as 9 CSR products on the un-unfolded input."""
    B, C, H, W = x.shape
    xf = x.transpose(0, 1).reshape(C, B * H * W)
    y = x.new_zeros(B, O, H + 2, W + 2)
    for t, (i, j) in enumerate((i, j) for i in range(3) for j in range(3)):
        z = (taps[t] @ xf).reshape(O, B, H, W).transpose(0, 1)
        y[:, :, 2 - i:2 - i + H, 2 - j:2 - j + W] += z
    return y[:, :, 1:1 + H, 1:1 + W]


def cl_unfold(S, xc: torch.Tensor, O: int) -> torch.Tensor:
    """3x3, stride 1, padding 1 convolution on a channels-last input: NHWC windows as rows, one CSR product."""
    B, C, H, W = xc.shape
    xp = F.pad(xc, (1, 1, 1, 1)).permute(0, 2, 3, 1)                       # (B, H+2, W+2, C)
    cols = xp.unfold(1, 3, 1).unfold(2, 3, 1).reshape(B * H * W, C * 9)    # rows ordered (c, kh, kw)
    return (S @ cols.t()).t().reshape(B, H, W, O).permute(0, 3, 1, 2)


def cpu_ms(fns: dict, repeats: int) -> dict:
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()
    for r in range(3):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            ts = []
            for _ in range(repeats):
                c = time.process_time()
                fns[k]()
                ts.append(time.process_time() - c)
            best[k] = min(best[k], 1e3 * statistics.median(ts))
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "raspa_sparse_branch.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = []
    for label, C, H in SHAPES:
        g = torch.Generator().manual_seed(C)
        w = torch.randn(C, C, 3, 3, generator=g)
        mask = (torch.rand(C, C, 3, 3, generator=g) < args.density).float()
        w = w * mask
        sc = SparseConv2d(C, C, 3, padding=1, bias=False, mask=mask).eval()
        with torch.no_grad():
            sc.weight.copy_(w)
        taps = [w[:, :, i, j].to_sparse_csr() for i in range(3) for j in range(3)]
        S = w.reshape(C, -1).to_sparse_csr()
        wc = w.contiguous(memory_format=torch.channels_last)
        for b in args.batches:
            x = torch.randn(b, C, H, H, generator=g)
            xc = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ref = F.conv2d(x, w, padding=1)
                tol = {"rtol": 1e-4, "atol": 1e-4 * max(1.0, float(ref.abs().max()))}
                for k in ("dense", "csr"):
                    sc.kernel = k
                    torch.testing.assert_close(sc(x), ref, **tol)
                torch.testing.assert_close(per_tap(taps, x, C), ref, **tol)
                torch.testing.assert_close(cl_unfold(S, xc, C), ref, **tol)

                def run(k):
                    sc.kernel = k
                    return lambda: sc(x)
                ms = cpu_ms({"dense": run("dense"), "dense CL": lambda: F.conv2d(xc, wc, padding=1),
                             "csr (unfold)": run("csr"), "csr CL unfold": lambda: cl_unfold(S, xc, C),
                             "csr per tap": lambda: per_tap(taps, x, C)},
                            10 if b == 1 else 3)
            nnz = int(mask.sum())
            best_sparse = min(ms["csr (unfold)"], ms["csr CL unfold"], ms["csr per tap"])
            rows.append((label, C, H, b, nnz / mask.numel(), ms, best_sparse / min(ms["dense"], ms["dense CL"])))
            print(label, b, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    hdr = ["layer", "shape", "batch", "MACs ratio", "dense ms", "dense CL ms", "csr (unfold) ms", "csr CL unfold ms",
           "csr per tap ms", "**S / best dense**"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for label, C, H, b, dens, ms, ratio in rows:
        table.append("| " + " | ".join([label, f"{C}x{C}x3x3 @ {H}x{H}", str(b), f"{dens:.3f}",
                                        *(f"{ms[k]:.3f}" for k in ("dense", "dense CL", "csr (unfold)",
                                                                   "csr CL unfold", "csr per tap")),
                                        f"**{ratio:.2f}**"]) + " |")
    text = "\n".join([
        "# RASPA's sparse branch: CPU cost per layer (benchmarks/raspa_sparse_branch.py)", "",
        __doc__.split("\n\n", 1)[1].split("Writes ``")[0].strip(), "", *table, "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, load average "
        f"{load0:.1f} -> {os.getloadavg()[0]:.1f} (shared 2-core machine), {time.perf_counter() - t0:.0f} s, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", ""])
    write_report(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
