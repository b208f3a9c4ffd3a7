"""One ``admm-compress run``: dense pretraining, the solver's training, export, measurement
(accuracy, MACs, parameters, file bytes, eager and ONNX Runtime latency) and the run's table."""
from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

from ._io import RUN_FILES, CLIError, _check_output_dir, _Writer

__all__ = ["run_one"]

log = logging.getLogger("admm_compress.cli")


def _fmt(v, spec=".2f", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _ratio(after, before) -> str:
    """``"x0.41"`` (after / before), ``"-"`` when either is missing or before is 0."""
    return f"x{after / before:.2f}" if after is not None and before else "-"


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(headers) + " |\n")
    out.write("| " + " | ".join("---" for _ in headers) + " |\n")
    for r in rows:
        out.write("| " + " | ".join(str(c) for c in r) + " |\n")
    return out.getvalue()


def _jsonable(x):
    import torch

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() < 64 else f"tensor{tuple(x.shape)}"
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def _median(xs):
    """Median (robust to the first epoch's warm-up), None for an empty list."""
    import statistics

    return float(statistics.median(xs)) if xs else None


def _measure(model, problem, device, latency_batch, latency_repeats, ort: bool = True) -> dict:
    """Accuracy, MACs / params (ptflops, pytorch backend) and latency of ``model``."""
    import admm_compress as ac

    out: dict[str, Any] = {}
    ev = ac.evaluate(model, problem.test_loader, problem.loss_fn, device, accuracy_fn=problem.accuracy_fn)
    out["accuracy"], out["loss"] = ev["accuracy"], ev["loss"]
    try:
        c = ac.complexity(model, problem.input_size, backend="pytorch")
        out["macs"], out["params"] = int(c.macs), int(c.params)
    except (ValueError, RuntimeError) as e:  # a layer ptflops cannot count: record, don't abort
        log.warning("complexity count failed: %s", e)
        out["macs"], out["params"], out["complexity_error"] = None, None, str(e)
    lat = ac.latency(model, problem.input_size, batch=latency_batch, repeats=latency_repeats,
                     warmup=max(2, latency_repeats // 5))
    out["latency_ms"] = lat.median
    out["latency"] = lat.as_dict()
    out["ort_latency_ms"], out["ort_note"] = (_ort_latency(model, problem, latency_batch, latency_repeats) if ort
                                              else (None, "n/a: skipped (--no-ort)"))
    out["state_dict_bytes"] = ac.saved_bytes(model)  # torch.save of the state dict, in memory
    return out


def _ort_latency(model, problem, batch: int, repeats: int) -> tuple[float | None, str]:
    """Median ONNX Runtime (CPU) latency of ``model`` in ms and a note, or ``(None, "n/a: why")``.

    Needs the optional ``onnx`` / ``onnxruntime`` (``pip install "admm-compress[onnx]"``); the
    ORT output is checked against eager before timing (:func:`admm_compress.deploy.ort_latency`).
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "n/a: onnxruntime not installed (pip install 'admm-compress[onnx]')"
    import torch

    from ..deploy import ort_latency

    try:
        r = ort_latency(model, problem.input_size, batch=batch, repeats=repeats, warmup=max(2, repeats // 5),
                        threads=torch.get_num_threads())
    except Exception as e:  # an op the exporter / ORT lacks, or outputs that differ: report, don't abort
        msg = (str(e).strip().splitlines() or [""])[0][:120]
        log.warning("ONNX Runtime latency not measured: %s: %s", type(e).__name__, msg)
        return None, f"n/a: ONNX export or run failed ({type(e).__name__}: {msg})"
    return r["median_ms"], (f"ONNX Runtime CPU, {r['threads']} thread(s), median of {repeats} calls, batch {batch}; "
                            f"outputs equal eager (max rel. diff {r['max_rel_diff']:.1e})")


# ============================================================================ one run
def _build_problem(pentry, seed: int, device: str, pparams: dict):
    """``pentry.build``; a bad parameter value (ValueError / TypeError) becomes a usage error."""
    from .registry import RegistryError

    try:
        return pentry.build(seed=seed, device=device, **pparams)
    except RegistryError:
        raise
    except (ValueError, TypeError) as e:
        raise CLIError(f"problem {pentry.name!r} with {_params_text(pparams)}: {e}") from e


def _check_solver_builds(sentry, problem, full_sparams: dict) -> None:
    """Build the solver once and bind its spec to the problem's model, before any training.

    A parameter value the solver refuses (``--set pruning_ratio=1.5``) or a spec that does not
    fit the model then stops the command at once with exit code 2, instead of after the dense
    pretraining.  Nothing is trained or modified.
    """
    from .registry import RegistryError
    from ..compressor import Compressor
    from ..specs import SpecError, resolve

    from .._validation import check_float

    try:
        solver = sentry.build(problem, **full_sparams)
        if isinstance(solver, Compressor) and solver.spec:
            resolve(solver.spec, problem.model)
        if "lr_scale" in full_sparams:  # the solver trains with problem.lr * lr_scale
            check_float("lr_scale", full_sparams["lr_scale"], low=0.0, low_open=True, where=f"solver {sentry.name!r}")
    except (RegistryError, SpecError):
        raise
    except (ValueError, TypeError) as e:
        raise CLIError(f"solver {sentry.name!r} with {_params_text(full_sparams)}: {e}") from e


def _reseed_loader(loader, seed: int) -> None:
    """Reset the shuffling generator a loader owns (``DataLoader(generator=...)``), if any."""
    import torch

    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            g.manual_seed(seed)


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of a torchrun launch (``(0, 1)`` otherwise)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed(device: str) -> str:
    """Join the process group torchrun set up; returns this rank's device."""
    import torch
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def _shard(loader, world: int, seed: int):
    """The training loader split over ``world`` ranks (DistributedSampler, same global batch)."""
    from torch.utils.data import DataLoader, DistributedSampler

    ds = getattr(loader, "dataset", None)
    bs = getattr(loader, "batch_size", None)
    if ds is None or bs is None:
        raise CLIError("--nproc needs the problem's train_loader to be a torch DataLoader with a batch_size")
    if bs % world:
        raise CLIError(f"--nproc {world}: the problem's batch_size={bs} is the global batch and must be "
                       f"divisible by the number of processes")
    return DataLoader(ds, batch_size=bs // world, sampler=DistributedSampler(ds, shuffle=True, seed=seed),
                      num_workers=loader.num_workers, drop_last=loader.drop_last)


def run_one(pentry, sentry, pparams: dict, sparams: dict, seed: int, device: str, out: Path,
            epochs: int | None = None, progress: bool = True, latency_batch: int = 32,
            latency_repeats: int = 30, pretrained: dict | None = None, plots: bool = True,
            solvers: dict | None = None, ort: bool = True) -> dict:
    """Train, compress, export and evaluate ``sentry`` on ``pentry``; write the run's files to ``out``.

    ``ort=False`` skips the ONNX Runtime latency (``--no-ort``; recorded as "n/a: skipped").

    ``pretrained`` (a dict shared between calls) caches the dense pretraining per seed, so a
    benchmark trains the dense model once; ``solvers`` (all loaded entries) names the applicable
    ones when ``sentry`` does not apply to an exact problem.  Returns the ``results.json`` content.
    """
    import torch

    from .. import plots as P
    from .registry import cosine, train_dense
    from ..training import resolve_device

    rank, world = _world()
    if world > 1:
        device = _init_distributed(device)
        progress = progress and rank == 0
    dev = resolve_device(device)
    if epochs is not None:
        pparams = dict(pparams, epochs=epochs)
    torch.manual_seed(seed)
    problem = _build_problem(pentry, seed, str(dev), pparams)
    sentry.check_problem(problem, [n for n, e in sorted((solvers or {}).items()) if e.available
                                   and e.kind == "admm" and e.constraint in problem.accepts])
    full_sparams = sentry.resolve(sparams, problem)
    _check_solver_builds(sentry, problem, full_sparams)
    # only once every name and parameter has been checked, and before any training
    _check_output_dir(out, "--out", RUN_FILES)
    writer = _Writer()
    res: dict[str, Any] = {"problem": problem.name, "solver": sentry.name, "solver_kind": sentry.kind,
                           "problem_params": {k: v for k, v in {**pentry.defaults, **pparams}.items()},
                           "solver_params": full_sparams, "seed": seed, "device": str(dev),
                           "epochs": problem.epochs, "pretrain_epochs": problem.pretrain_epochs,
                           "finetune_epochs": problem.finetune_epochs, "torch": torch.__version__,
                           "meta": problem.meta}
    model = problem.model.to(dev)
    train_model, train_loader = model, problem.train_loader
    if world > 1:
        if problem.is_exact:
            raise CLIError(f"--nproc applies to training problems; {problem.name!r} is an exact problem")
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
        train_loader = _shard(problem.train_loader, world, seed)
    solver_lr = problem.lr * float(full_sparams.get("lr_scale", 1.0))
    fit_kw = dict(optimizer=problem.optimizer, loss_fn=problem.loss_fn, device=dev, progress=progress, lr=solver_lr)
    if problem.accuracy_fn is not None:  # models with dict / tuple outputs
        fit_kw["accuracy_fn"] = problem.accuracy_fn

    if problem.is_exact:
        solver = sentry.build(problem, **full_sparams)
        t0 = time.perf_counter()
        hist = solver.fit(model, problem.train_loader, epochs=problem.epochs, **fit_kw)
        res["wall_s"] = time.perf_counter() - t0
        res["answer"] = problem.check_answer(model)
        res["history"] = hist.to_dict() if hasattr(hist, "to_dict") else {}
        if plots:
            res["plots"] = {"residuals": str(writer(out / "residuals.png", lambda p: P.residuals(
                hist.epochs, p, f"{problem.name} / {sentry.name}")))}
        res["write_failures"] = writer.failed
        writer.json(out / "results.json", _jsonable(res))
        return res

    # ---- dense reference (shared between solvers of a benchmark through `pretrained`)
    key = (problem.name, seed, json.dumps(_jsonable(pparams), sort_keys=True))
    if pretrained is not None and key in pretrained:
        cached = pretrained[key]
        model.load_state_dict(cached["state"])
        dense = cached["dense"]
    else:
        t0 = time.perf_counter()
        dh = train_dense(train_model, train_loader, problem.pretrain_epochs, problem.optimizer, problem.loss_fn,
                         problem.test_loader, dev, progress, problem.lr,
                         scheduler=cosine(problem.pretrain_epochs), accuracy_fn=problem.accuracy_fn)
        dense = _measure(model, problem, dev, latency_batch, latency_repeats, ort)
        dense["epoch_time_s"] = _median([e["wall"] for e in dh.epochs])
        dense["pretrain_wall_s"] = time.perf_counter() - t0
        dense["spectra"] = P.weight_spectra(model)
        if pretrained is not None:
            pretrained[key] = {"state": copy.deepcopy(model.state_dict()), "dense": dense}
    res["before"] = {k: v for k, v in dense.items() if k != "spectra"}

    # ---- constrained training with the solver, export, measurement
    # same RNG stream for every solver of a benchmark, whatever ran before, and the same as a lone
    # `run` (whose loader generator also went through pretraining's shuffles)
    torch.manual_seed(seed + 1)
    _reseed_loader(train_loader, seed + 1)
    solver = sentry.build(problem, **full_sparams)
    t0 = time.perf_counter()
    hist = solver.fit(train_model, train_loader, epochs=problem.epochs, val_loader=problem.test_loader,
                      finetune_epochs=problem.finetune_epochs, scheduler=cosine(problem.epochs), **fit_kw)
    fit_wall = time.perf_counter() - t0
    if rank != 0:  # every rank holds the same weights; rank 0 measures and writes
        return {}
    res["nproc"] = world
    spectra_after = P.weight_spectra(model)
    model.eval()
    compact = sentry.export(solver, model, problem, full_sparams)
    compact.to(dev).eval()
    after = _measure(compact, problem, dev, latency_batch, latency_repeats, ort)
    after["epoch_time_s"] = _median([e["wall"] for e in hist.epochs if e.get("phase", "train") == "train"])
    res["after"] = after
    res["fit_wall_s"] = fit_wall
    # the exported model equals the finalized one (before fine-tuning) or the fine-tuned one
    res["history"] = hist.to_dict() if hasattr(hist, "to_dict") else {}
    b, a = dense, after
    res["acc_before"], res["acc_after"] = b["accuracy"], a["accuracy"]
    res["acc_drop"] = b["accuracy"] - a["accuracy"]
    res["macs_before"], res["macs_after"] = b.get("macs"), a.get("macs")
    res["params_before"], res["params_after"] = b.get("params"), a.get("params")
    res["macs_drop"] = (100.0 * (1 - a["macs"] / b["macs"])) if a.get("macs") and b.get("macs") else None
    res["params_drop"] = (100.0 * (1 - a["params"] / b["params"])) if a.get("params") and b.get("params") else None
    res["latency_before_ms"], res["latency_after_ms"] = b["latency_ms"], a["latency_ms"]
    res["latency_ratio"] = a["latency_ms"] / b["latency_ms"] if b["latency_ms"] else None
    res["time_ratio"] = (a["epoch_time_s"] / b["epoch_time_s"]
                         if a.get("epoch_time_s") and b.get("epoch_time_s") else None)
    res["latency_note"] = (f"median of {latency_repeats} forward passes, batch {latency_batch}, {dev}, "
                           f"torch threads {torch.get_num_threads()}")
    state = compact.state_dict()
    res["files"] = {"state_dict": str(writer(out / "model_state_dict.pt", lambda p: torch.save(state, p)))}
    res["state_dict_bytes"] = None  # sparse layers store values + index only: the file size, next to the params
    try:
        res["state_dict_bytes"] = Path(res["files"]["state_dict"]).stat().st_size
    except OSError:
        pass
    res["state_dict_bytes_before"] = b.get("state_dict_bytes")
    res["ort_latency_before_ms"], res["ort_latency_after_ms"] = b.get("ort_latency_ms"), a.get("ort_latency_ms")
    res["ort_latency_ratio"] = (a["ort_latency_ms"] / b["ort_latency_ms"]
                                if a.get("ort_latency_ms") and b.get("ort_latency_ms") else None)
    res["ort_note"] = a.get("ort_note") if a.get("ort_latency_ms") is None else (b.get("ort_note") or a.get("ort_note"))
    if plots:
        pts = [{"label": "dense", "macs": b.get("macs"), "accuracy": b["accuracy"], "marker": "s"},
               {"label": sentry.name, "macs": a.get("macs"), "accuracy": a["accuracy"]}]
        title = f"{problem.name} / {sentry.name}"
        res["plots"] = {
            "accuracy_vs_macs": str(writer(out / "accuracy_vs_macs.png",
                                           lambda p: P.accuracy_vs_macs(pts, p, f"{problem.name}"))),
            "spectra": str(writer(out / "spectra.png", lambda p: P.singular_spectra(
                dense["spectra"], spectra_after, p, title=f"{title}: singular values before / after"))),
            "residuals": str(writer(out / "residuals.png", lambda p: P.residuals(hist.epochs, p, title))),
        }
    res["write_failures"] = writer.failed
    writer.json(out / "results.json", _jsonable(res))
    return res


def _run_table(res: dict) -> str:
    if "answer" in res:
        a = res["answer"]
        rows = [[k, f"{v:.3g}"] for k, v in a["errors"].items()]
        rows += [[k, "yes" if v else "NO"] for k, v in a.get("checks", {}).items()]
        rows += [["tolerance", f"{a['tolerance']:.3g}"], ["reached known answer", "yes" if a["ok"] else "NO"],
                 ["wall time (s)", f"{res['wall_s']:.2f}"]]
        return _markdown(["relative error to known answer", "value"], rows)
    mega = lambda v: None if v is None else v / 1e6  # noqa: E731
    rows = [["accuracy (%)", _fmt(res["acc_before"]), _fmt(res["acc_after"]), _fmt(-res["acc_drop"], "+.2f")],
            ["MACs (M)", _fmt(mega(res["macs_before"]), ".3f"), _fmt(mega(res["macs_after"]), ".3f"),
             (f"-{res['macs_drop']:.1f} %" if res["macs_drop"] is not None else "-")],
            ["params (M)", _fmt(mega(res["params_before"]), ".4f"), _fmt(mega(res["params_after"]), ".4f"),
             (f"-{res['params_drop']:.1f} %" if res["params_drop"] is not None else "-")],
            ["saved state dict (bytes)", _fmt(res.get("state_dict_bytes_before"), "d"),
             _fmt(res.get("state_dict_bytes"), "d"),
             _ratio(res.get("state_dict_bytes"), res.get("state_dict_bytes_before"))],
            ["latency (ms)", _fmt(res["latency_before_ms"], ".3f"), _fmt(res["latency_after_ms"], ".3f"),
             (f"x{res['latency_ratio']:.2f}" if res["latency_ratio"] else "-")],
            (["latency ONNX Runtime (ms)", _fmt(res.get("ort_latency_before_ms"), ".3f"),
              _fmt(res.get("ort_latency_after_ms"), ".3f"), f"x{res['ort_latency_ratio']:.2f}"]
             if res.get("ort_latency_ratio") else
             ["latency ONNX Runtime (ms)", "n/a", "n/a", res.get("ort_note") or "n/a"]),
            ["epoch time (s)", _fmt(res["before"].get("epoch_time_s"), ".3f"),
             _fmt(res["after"].get("epoch_time_s"), ".3f"),
             (f"x{res['time_ratio']:.2f}" if res["time_ratio"] else "-")],
            ["wall time (s)", _fmt(res["before"].get("pretrain_wall_s"), ".1f"), _fmt(res["fit_wall_s"], ".1f"), ""]]
    return _markdown(["", "dense (before)", f"{res['solver']} (after)", "change"], rows)


def _slug(v) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", str(v)) or "x"


def _params_text(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items()) or "-"


