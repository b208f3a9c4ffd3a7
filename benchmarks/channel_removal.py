"""What cross-layer channel removal adds to structured (input-channel) sparsity export.

For ResNet-20, ResNet-56 and VGG-16 (CIFAR, 3x32x32; random initialization with randomized
BatchNorm statistics, since counts and latency do not depend on trained values) every
``nn.Conv2d`` reading more than 3 channels keeps half of its input channels
(``Cardinality(density=0.5, group_dim=1)``, the ``admm_channels`` solver's constraint), applied by
``solver.finalize`` (the Z-step projection).  The model is then exported twice:

* ``remove_channels=False``: each layer reads only its kept channels (``IndexSelect``), the
  layers before it still compute every channel;
* ``remove_channels=True`` (the default): :func:`admm_compress.channels.remove_channels` also
  deletes the producers' unread filters and BatchNorm entries wherever the chain allows it.

Both exports are checked against the finalized dense model (max abs output difference, eval).
MACs/params: ``ac.complexity(..., backend="pytorch")``.  Latency: :func:`admm_compress.latency`,
batch 32, one thread, the three models of one architecture measured in interleaved rounds;
median over rounds of the per-round medians.

Writes ``docs/results/channel_removal.md``.

Run:  python benchmarks/channel_removal.py [--quick] [--device cuda] [--out docs/results/channel_removal.md]
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics

import torch
from torch import nn

import admm_compress as ac
from admm_compress import models
from admm_compress.layers import IndexScatter, IndexSelect
from _report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = (3, 32, 32)
ARCHS = {"ResNet-20": models.resnet20, "ResNet-56": models.resnet56, "VGG-16": models.vgg16}
log = logging.getLogger("channel_removal")


def _target(name, module):
    return isinstance(module, nn.Conv2d) and module.in_channels > 3


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def measure(make, density: float, rounds: int, repeats: int, device: str = "cpu"):
    torch.manual_seed(0)
    model = make().eval()
    _randomize_bn(model)
    spec = [ac.Constrain(_target, ac.Cardinality(density=density, group_dim=1), view="identity")]
    solver = ac.Solver(spec).prepare(model)
    solver.finalize(model)
    variants = {"dense": model, "select only": ac.export(model, spec, remove_channels=False).eval(),
                "channels removed": ac.export(model, spec).eval()}
    x = torch.randn(4, *INPUT)
    with torch.no_grad():
        ref = model(x)
        diffs = {k: float((m(x) - ref).abs().max()) for k, m in variants.items()}
    counts = {k: ac.complexity(m, INPUT, backend="pytorch") for k, m in variants.items()}
    variants = {k: m.to(device) for k, m in variants.items()}
    markers = {k: sum(isinstance(mm, (IndexSelect, IndexScatter)) for mm in m.modules()) for k, m in variants.items()}
    per_round = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for k in order:
            per_round[k].append(ac.latency(variants[k], INPUT, batch=32, repeats=repeats, warmup=3,
                                           device=device).median)
    lat = {k: statistics.median(v) for k, v in per_round.items()}
    return counts, lat, diffs, markers


def _where(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="ResNet-20 only, 2 rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu", help="where latency is measured (cpu, cuda)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "channel_removal.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("admm_compress").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    archs = {"ResNet-20": ARCHS["ResNet-20"]} if args.quick else ARCHS
    rounds = 2 if args.quick else args.rounds
    rows = []
    for name, make in archs.items():
        counts, lat, diffs, markers = measure(make, args.density, rounds, args.repeats, args.device)
        d = counts["dense"]
        for k in counts:
            c = counts[k]
            rows.append(f"| {name} | {k} | {c.macs / 1e6:.2f} | {c.macs / d.macs:.3f} | {c.params / 1e6:.4f} | "
                        f"{c.params / d.params:.3f} | {markers[k]} | {lat[k]:.2f} | "
                        f"{lat[k] / lat['dense']:.2f} | {diffs[k]:.1e} |")
            log.info(rows[-1])
    text = "\n".join([
        "# Cross-layer channel removal (structured input-channel sparsity)",
        "",
        f"Command: `python benchmarks/channel_removal.py{' --quick' if args.quick else ''}"
        f"{'' if args.device == 'cpu' else ' --device ' + args.device}` "
        f"(density {args.density}; {datetime.date.today()}; latency on {_where(args.device)}, torch "
        f"{torch.__version__}, 1 CPU thread).",
        "",
        "Every Conv2d reading more than 3 channels keeps half of its input channels (projection = the "
        "`admm_channels` Z-step); 'select only' = `export(..., remove_channels=False)`, 'channels removed' = "
        "the default export.  Markers = IndexSelect/IndexScatter modules left (a layer reading a residual "
        "stream or the image keeps one).  Latency: batch 32, median of per-round medians over "
        f"{rounds} interleaved rounds of {args.repeats} calls.  Max |diff| = largest output difference "
        "from the projected dense model (eval).",
        "",
        "| model | export | MACs (M) | MACs ratio | params (M) | params ratio | markers | latency (ms) | "
        "latency ratio | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows, ""])
    write_report(args.out, text)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
