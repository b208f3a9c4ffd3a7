"""How fast stock-conv TT layers can be on this machine: uniform small ranks swept (issue 15).

``docs/results/tt_latency.md`` measures how much of a TT model's MAC reduction becomes speed-up.
This script asks the question behind its ResNet-56 batch-1 rows: how fast is a stock-conv
realization of ``"oki"`` TT layers at all, at the smallest ranks?  Every ``nn.Conv2d`` of the
model is constrained to ``TTRank((r, r))`` on ``TTView.oki()`` for ``r`` in ``--ranks`` (default
1, 2, 4, 8), then ``prepare -> finalize -> export`` as the library does it, and the exported
chains are timed as

* ``chain (r, r)``: the exported ``1x1 I->r``, ``kxk r->r``, ``1x1 r->O`` (three convs per layer);
* ``fold_first (r)`` / ``fold_last (r)``: each chain replaced by its two-conv realization
  (``kxk I->r, 1x1 r->O`` / ``1x1 I->r, kxk r->O``;
  :func:`admm_compress.layers.tt_realize.chain_realizations`), the forms ``realize_tt`` picks.

BatchNorm, ReLU, the shortcuts, pooling and the classifier are the dense model's.  For a MACs
budget ``m`` (0.5 and 0.25: the -50 % / -75 % rows of ``tt_latency.md``) the first table takes the
fastest measured variant with MACs ratio <= ``m``, time ratio ``f = t / t_dense``, and prints what
it leaves for issue 15's target (>= 0.75): realized / ideal = ``m / f`` and the share of the MAC
reduction realized = ``(1 - f) / (1 - m)``.  This is a measurement, not a proof: a model with other
(per-layer) ranks or realizations could be faster than every variant here -- the time is not
monotone in the ranks (oneDNN's convolutions with 1-2 channels take slow paths) -- but a budget at
which even these nearly MAC-free models miss the target says the per-call cost, not the
arithmetic, decides it.  The second table also gives each variant's own reading at its own MACs
ratio ``m_v``: realized / ideal ``m_v / f`` and share ``(1 - f) / (1 - m_v)``.

Timing: eager (``torch.inference_mode``), TorchScript (``optimize_for_inference(freeze(script))``,
BatchNorm folded into the convs, as ``tt_latency.py --jit``) and ONNX Runtime (when installed; as
``tt_latency.py --ort``), NCHW, batch 1 and 32, one torch
thread; median process CPU time over interleaved rounds (``latency_speedup.measure``, whose
order is reversed every other round).  Every variant's outputs are checked against the finalized
model first (TorchScript and ORT against eager).  Random weights (latency does not depend on the values).

``--compile``: a fourth mode, ``torch.compile`` (Inductor, the CPU C++ backend, ``dynamic=False``,
``torch._inductor.config.freezing = True``: weights constant-folded and BatchNorm folded, as
PyTorch recommends for CPU inference), each model compiled for each batch size, its outputs checked
against eager; written to ``tt_latency_floor_compile.md`` unless ``--out`` says otherwise.

Writes ``docs/results/tt_latency_floor.md``.  Run: ``python benchmarks/tt_latency_floor.py
[--archs ResNet-56 VGG-16] [--rounds 5] [--ranks 1 2 4 8]`` (~10 min on the 2-core machine).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import admm_compress as ac  # noqa: E402
from _report import write_report  # noqa: E402
from admm_compress.layers.tt_realize import chain_realizations, is_oki_chain  # noqa: E402
from admm_compress.specs import replace_module  # noqa: E402
from admm_compress.views import TTView  # noqa: E402
from latency_speedup import INPUT, check_outputs, measure  # noqa: E402
from tt_latency import ARCHS, _jit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tt_model(dense: nn.Module, ranks: tuple[int, int]):
    """(finalized, exported) copies of ``dense`` with every Conv2d at ``TTRank(ranks)`` on the oki view."""
    model = copy.deepcopy(dense)
    spec = [ac.Constrain(n, ac.TTRank(ranks), view=TTView.oki())
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    solver = ac.Solver(spec).prepare(model)
    solver.finalize(model)
    return model, ac.export(model, solver).eval()


def refold(exported: nn.Module, form: str) -> nn.Module:
    """A copy of ``exported`` with every oki chain replaced by its ``form`` realization."""
    out = copy.deepcopy(exported)
    chains = [n for n, m in out.named_modules() if is_oki_chain(m)]
    for n in chains:
        replace_module(out, n, chain_realizations(out.get_submodule(n))[form])
    return out.eval()


def _compile_setup() -> None:
    """Inductor for CPU inference, set once per run: ``freezing`` (parameters folded into the graph
    as constants, BatchNorm into the convs); every model here shares a few ``forward`` code objects,
    and past Dynamo's default cache size (8) the later ones would silently run eagerly."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    dynamo_config.cache_size_limit = dynamo_config.accumulated_cache_size_limit = 4096


def _compiled(model: nn.Module):
    """``torch.compile(model)`` with static shapes (after :func:`_compile_setup`); compiled on first call."""
    return torch.compile(model.eval(), dynamic=False)


def _ort(model: nn.Module, x: torch.Tensor):
    """``model`` in ONNX Runtime (``admm_compress.deploy.onnx_session``: CPU provider, one intra-op thread,
    ORT_ENABLE_ALL, BatchNorm and ReLU fused into the convs), called on torch tensors."""
    from admm_compress.deploy import onnx_session

    run = onnx_session(model, x[:1], None, torch.get_num_threads())
    return lambda t: torch.from_numpy(run(t.numpy()))


def eager_and_ort_times(eager: dict, batches, rounds: int, order=("ort", "eager")):
    """Yield ``(batch, mode, {label: median CPU ms})`` for ``mode`` in ``order``: every
    eager model of ``eager`` (one labelled "dense") also opened in ONNX Runtime (:func:`_ort`), its
    outputs checked against eager first, then all timed interleaved (``latency_speedup.measure``)."""
    for b in batches:
        x = torch.randn(b, *INPUT, generator=torch.Generator().manual_seed(3))
        ort = {k: _ort(m, x) for k, m in eager.items()}
        for k in ort:
            with torch.inference_mode():
                ref, got = eager[k](x), ort[k](x)
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * max(1.0, float(ref.abs().max())))
        rep, warm = (20, 5) if b == 1 else (max(3, 40 // b), 2)
        for mode in order:
            t = {k: v[1] for k, v in measure(ort if mode == "ort" else eager, b, rounds, warm, rep).items()}
            print(f"b={b} {mode}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items()), flush=True)
            yield b, mode, t


def share_realized(mr: float, f: float) -> float:
    """The fraction of the MAC reduction realized as time reduction, ``(1 - f) / (1 - mr)`` for a
    time ratio ``f`` at a MACs ratio ``mr < 1`` (1: time falls as much as MACs)."""
    return (1 - f) / (1 - mr)


def ratio_cells(mr: float, td: float, tv: float) -> list:
    """Table cells of one measurement: MACs ratio, dense and variant ms, time ratio ``f``,
    realized / ideal ``mr / f`` and share (:func:`share_realized`)."""
    f = tv / td
    return [f"{mr:.3f}", f"{td:.2f}", f"{tv:.2f}", f"{f:.2f}", f"{mr / f:.2f}", f"{share_realized(mr, f):.2f}"]


def timing_args(ap: argparse.ArgumentParser, report: str) -> None:
    """The options every TT timing script shares: ``--batches``, ``--rounds``, ``--threads`` and
    ``--out`` (default ``docs/results/<report>``)."""
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", report))


def start_timing(args, need_ort: bool = True) -> tuple[bool, float, float]:
    """Threads and warnings set for a timing run; ``(onnxruntime available, load average, start
    time)``.  Without onnxruntime: ``SystemExit`` when ``need_ort``, else a line saying so."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    try:
        import onnxruntime  # noqa: F401  (optional extra: pip install "admm-compress[onnx]")
        ort = True
    except ImportError:
        if need_ort:
            raise SystemExit("onnxruntime is needed: pip install -e '.[onnx]'")
        ort = False
        print("onnxruntime not installed: eager and TorchScript only", flush=True)
    return ort, os.getloadavg()[0], time.perf_counter()


def finish_report(args, title: str, doc: str, body: list, load0: float, t0: float, shown: list) -> None:
    """Print ``shown`` and write the report: title, the script's docstring excerpt, ``body``, the
    machine line (:func:`footer`), atomically to ``args.out``."""
    text = "\n".join([title, "", doc, "", *body, "", footer(args.threads, load0, t0), ""])
    print("\n".join(shown))
    write_report(args.out, text)


def footer(threads: int, load0: float, t0: float) -> str:
    """The machine line closing a report (load average at the start and now, run time, UTC date)."""
    return (f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} "
            f"thread(s), load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (shared 2-core machine), "
            f"{time.perf_counter() - t0:.0f} s, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8], help="uniform TT ranks (r, r) swept")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile (Inductor, freezing) of every model; "
                         "writes tt_latency_floor_compile.md")
    timing_args(ap, "tt_latency_floor.md")
    args = ap.parse_args(argv)
    if args.compile:
        _compile_setup()
        if args.out == ap.get_default("out"):
            args.out = args.out[:-3] + "_compile.md"
    ort, load0, t0 = start_timing(args, need_ort=False)
    rows = []
    for arch in args.archs:
        torch.manual_seed(0)
        dense = ARCHS[arch]().eval()
        d_macs = ac.complexity(dense, INPUT).macs
        variants = {}
        for r in args.ranks:
            fin, chain = tt_model(dense, (r, r))
            variants[f"chain ({r}, {r})"] = (fin, chain)
            variants[f"fold_first ({r})"] = (fin, refold(chain, "fold_first"))
            variants[f"fold_last ({r})"] = (fin, refold(chain, "fold_last"))
        eager = {"dense": dense}
        macs = {}
        for label, (fin, m) in variants.items():
            check_outputs(fin, m)
            eager[label] = m
            macs[label] = ac.complexity(m, INPUT).macs / d_macs
        for b in args.batches:
            x = torch.randn(b, *INPUT, generator=torch.Generator().manual_seed(3))
            jit = {k: _jit(m, x)[0] for k, m in eager.items()}
            modes = [("eager", eager), ("jit", jit)]
            if ort:
                modes.append(("ort", {k: _ort(m, x) for k, m in eager.items()}))
            if args.compile:
                modes.append(("compile", {k: _compiled(m) for k, m in eager.items()}))
            for mode, mods in modes[1:]:  # TorchScript / ORT / torch.compile compute what eager does
                for k in mods:
                    with torch.inference_mode():
                        ref, got = eager[k](x), mods[k](x)
                    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * max(1.0, float(ref.abs().max())))
            rep, warm = (20, 5) if b == 1 else (max(3, 40 // b), 2)
            for mode, mods in modes:
                t = {k: v[1] for k, v in measure(mods, b, args.rounds, warm, rep).items()}
                print(f"{arch} b={b} {mode}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items()), flush=True)
                for label in variants:
                    rows.append((arch, b, mode, label, macs[label], t["dense"], t[label]))
    hdr = ["model", "batch", "mode", "variant", "MACs ratio", "dense CPU ms", "variant CPU ms", "time ratio",
           "realized / ideal", "share"]
    table = ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for arch, b, mode, label, mr, td, tv in rows:
        table.append("| " + " | ".join([arch, str(b), mode, label, *ratio_cells(mr, td, tv)]) + " |")
    # per (arch, batch, mode) and MACs budget m: the fastest measured variant within the budget
    floor = ["| model | batch | mode | m | fastest variant with MACs ratio <= m | its MACs ratio | time ratio | "
             "max realized / ideal at m | max share at m |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r[0], r[1], r[2]) for r in rows}, key=lambda k: (list(ARCHS).index(k[0]), k[1], k[2]))
    for arch, b, mode in keys:
        for m in (0.5, 0.25):
            cand = [r for r in rows if r[:3] == (arch, b, mode) and r[4] <= m]
            if not cand:
                continue
            best = min(cand, key=lambda r: r[6])
            f = best[6] / best[5]
            floor.append(f"| {arch} | {b} | {mode} | {m:g} | {best[3]} | {best[4]:.3f} | {f:.2f} | {m / f:.2f} | "
                         f"{(1 - f) / (1 - m):.2f} |")
    finish_report(args, "# The latency floor of stock-conv TT layers (benchmarks/tt_latency_floor.py)",
                  __doc__.split("\n\n", 1)[1].split("Writes ``")[0].strip(),
                  ["## The fastest measured realization within a MACs budget, and what it leaves for the target", "",
                   *floor, "", "## Every measurement", "", *table], load0, t0, floor)


if __name__ == "__main__":
    main()
