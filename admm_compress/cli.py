"""``admm-compress``: run benchmark problems with benchmark solvers from the command line.

::

    admm-compress list
    admm-compress run digits_fcn lrpet --set pruning_ratio=0.7 --epochs 20 --out runs/quick
    admm-compress bench digits_fcn --solvers dense lrpet svd_truncation --seeds 0 1 --out runs/bench

``run`` trains the problem's model densely (``pretrain_epochs``), measures it, trains it with the
solver (``epochs``, then ``finetune_epochs``), exports the compact model, measures it again and
writes ``results.json``, ``model_state_dict.pt`` (the exported model) and three PNG plots
(accuracy vs MACs, per-layer singular value spectra, ADMM residuals).  On an exact problem
(known answer) it runs the solver and reports the error to the known answer instead.
``bench`` does ``run`` for several solvers on the same problem and seeds (the dense pretraining
is shared) and writes ``bench.md``, ``bench.csv`` and ``tradeoff.png``.

Problems and solvers are files in ``problems/`` and ``solvers/`` folders (see
:mod:`admm_compress.bench.registry` for the contract and the search path).  Any typo in a name or a
parameter stops the command before anything runs, with the list of valid names.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "run_one", "build_parser"]

log = logging.getLogger("admm_compress.cli")


class CLIError(ValueError):
    """A usage error (reported with exit code 2, before any work)."""


def _write(text: str = "", stream=None) -> None:
    (stream or sys.stdout).write(text + "\n")
    (stream or sys.stdout).flush()


# ============================================================================ output files
RUN_FILES = ("results.json", "model_state_dict.pt", "accuracy_vs_macs.png", "spectra.png", "residuals.png")
BENCH_FILES = ("bench.md", "bench.csv", "tradeoff.png")


def _check_output_dir(path: Path, what: str, files: Sequence[str] = ()) -> None:
    """Create ``path`` (with its parents) and write a probe file in it, before any training.

    Raises :class:`CLIError` naming the path when it is a file, cannot be created, or is not
    writable, or when one of the ``files`` the command will write there is a folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".admm-compress-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"{what} {str(path)!r} cannot be written: {e.strerror or e}"
                       + (f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) != str(path) else "")
                       ) from None
    for name in files:
        f = path / name
        if f.is_dir():
            raise CLIError(f"{what}: {str(f)!r} is a folder, but the command writes a file there")


def _commit(tmp: str, path: Path) -> None:
    """Move a completely written temporary file onto ``path`` (atomic on one file system)."""
    os.replace(tmp, path)


class _Writer:
    """Writes output files atomically (temporary file in the same folder, then :func:`os.replace`).

    A late I/O error (disk full, folder removed, permissions changed during training) does not
    lose what was computed: the file is written into one rescue folder under the system's
    temporary directory instead, and :attr:`failed` records ``{"path", "error", "written_to"}``.
    """

    def __init__(self):
        self.failed: list[dict] = []
        self._rescue: Path | None = None

    def __call__(self, path: Path, write: Callable[[str], Any]) -> Path:
        path = Path(path)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            write(tmp)
            _commit(tmp, path)
            return path
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            if tmp is not None and os.path.exists(tmp):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if self._rescue is None:
                self._rescue = Path(tempfile.mkdtemp(prefix="admm-compress-rescue-"))
            alt = self._rescue / path.name
            write(str(alt))
            msg = f"{type(e).__name__}: {e}"
            self.failed.append({"path": str(path), "error": msg, "written_to": str(alt)})
            log.error("could not write %s (%s); wrote %s instead", path, msg, alt)
            return alt

    def text(self, path: Path, text: str) -> Path:
        def write(p):
            with open(p, "w", newline="") as f:
                f.write(text)
        return self(path, write)

    def json(self, path: Path, obj) -> Path:
        return self.text(path, json.dumps(obj, indent=1))

    def report(self) -> None:
        """Print every failed write and where its content went (stderr)."""
        for f in self.failed:
            _write(f"admm-compress: error: could not write {f['path']} ({f['error']}); its content is in "
                   f"{f['written_to']}", sys.stderr)


def _check_finite_assignments(assign: dict) -> None:
    """``--set key=nan`` / ``inf``: no parameter takes a non-finite number."""
    for k, v in assign.items():
        vals = v if isinstance(v, tuple) else (v,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in vals):
            raise CLIError(f"--set {k}={v!r}: parameters must be finite numbers")


# ============================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--problems-dir", action="append", default=[], metavar="DIR",
                        help="extra folder of problem files (searched first; repeatable)")
    common.add_argument("--solvers-dir", action="append", default=[], metavar="DIR",
                        help="extra folder of solver files (searched first; repeatable)")
    common.add_argument("-v", "--verbose", action="count", default=0, help="log INFO (-v) or DEBUG (-vv)")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assign",
                       help="set a problem or solver parameter; prefix problem. / solver. when both have it, or "
                            "SOLVER. for one solver of a bench (lorita.rank_ratio=0.25); values: ints, "
                            "floats, true/false, none, comma lists")
    train.add_argument("--epochs", type=int, default=None, help="solver training epochs (default: the problem's)")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    train.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/<name>)")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice; 1 is fastest for tiny models on a busy machine)")
    train.add_argument("--latency-batch", type=int, default=32, help="batch size of the latency measurement")
    train.add_argument("--latency-repeats", type=int, default=30, help="timed forward passes for latency")

    p = argparse.ArgumentParser(prog="admm-compress", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,bench,list}")
    r = sub.add_parser("run", parents=[common, train], help="train, compress, export and evaluate one solver")
    r.add_argument("problem", help="problem name (see `admm-compress list`)")
    r.add_argument("solver", help="solver name (see `admm-compress list`)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N local processes (torch.distributed: gloo on cpu, nccl on cuda; or launch "
                        "under torchrun without this flag); the problem's batch_size is the global batch, "
                        "split evenly")
    b = sub.add_parser("bench", parents=[common, train], help="several solvers on one problem: one table + plot")
    b.add_argument("problem", help="problem name (see `admm-compress list`)")
    b.add_argument("--solvers", nargs="+", default=None, metavar="SOLVER",
                   help="solvers to run (default: every available solver that applies)")
    b.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S")
    b.add_argument("--grid", action="store_true",
                   help="sweep each solver's parameter grid (PARAMS in its file, every combination); "
                        "a parameter given with --set stays fixed")
    b.add_argument("--title", default=None, help="title of the table and the plot")
    b.add_argument("--report", default=None, metavar="PREFIX",
                   help="also write PREFIX.md, PREFIX.csv and PREFIX.png (e.g. docs/results/bench_digits_fcn)")
    sub.add_parser("list", parents=[common], help="problems, solvers and their parameters")
    return p


# ============================================================================ helpers
def _split_assignments(assign: dict, pdefaults: dict, sdefaults_by_solver: dict[str, dict],
                       problem: str) -> tuple[dict, dict[str, dict]]:
    """Route ``--set`` keys to the problem or to the solvers that have them; unknown keys raise."""
    from .bench.registry import RegistryError

    pparams: dict = {}
    sparams: dict[str, dict] = {s: {} for s in sdefaults_by_solver}
    for key, val in assign.items():
        head, dot, bare = key.partition(".")
        if dot and head in sdefaults_by_solver:  # SOLVER.key=value: that solver only
            if bare not in sdefaults_by_solver[head]:
                raise RegistryError(_unknown_param(bare, problem, pdefaults, {head: sdefaults_by_solver[head]}))
            sparams[head][bare] = val
            continue
        if dot and head not in ("problem", "solver"):
            raise RegistryError(f"--set {key}: '{head}' is neither 'problem', 'solver' nor one of the solvers "
                                f"{sorted(sdefaults_by_solver)}")
        scope = head if dot else ""
        bare = bare if dot else key
        in_p = bare in pdefaults
        in_s = [s for s, d in sdefaults_by_solver.items() if bare in d]
        if scope == "problem" or (not scope and in_p and not in_s):
            if not in_p:
                raise RegistryError(_unknown_param(bare, problem, pdefaults, sdefaults_by_solver))
            pparams[bare] = val
        elif scope == "solver" or (not scope and in_s and not in_p):
            if not in_s:
                raise RegistryError(_unknown_param(bare, problem, pdefaults, sdefaults_by_solver))
            for s in in_s:
                sparams[s].setdefault(bare, val)
        elif in_p and in_s:
            raise RegistryError(f"--set {key}: both the problem and solver(s) {in_s} have '{bare}'; "
                                f"write problem.{bare}=... or solver.{bare}=...")
        else:
            raise RegistryError(_unknown_param(bare, problem, pdefaults, sdefaults_by_solver))
    return pparams, sparams


def _unknown_param(key, problem, pdefaults, sdefaults_by_solver) -> str:
    import difflib

    everything = sorted(set(pdefaults) | {k for d in sdefaults_by_solver.values() for k in d})
    close = difflib.get_close_matches(key, everything, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    lines = [f"unknown parameter {key!r}{hint}.",
             f"  problem {problem!r} parameters: {', '.join(sorted(pdefaults)) or '(none)'}"]
    for s, d in sdefaults_by_solver.items():
        lines.append(f"  solver {s!r} parameters: {', '.join(sorted(d)) or '(none)'}")
    return "\n".join(lines)


def _load(args):
    from .bench.registry import load_problems, load_solvers

    return load_problems(args.problems_dir), load_solvers(args.solvers_dir)


def _problem_entry(problems, name):
    from .bench.registry import unknown_name_error

    if name not in problems:
        raise unknown_name_error("problem", name, problems)
    e = problems[name]
    if e.module is None:
        raise CLIError(f"problem {name!r} ({e.path}) cannot be loaded: {e.error}")
    return e


def _solver_entry(solvers, name):
    from .bench.registry import RegistryError, unknown_name_error

    if name not in solvers:
        raise unknown_name_error("solver", name, solvers)
    e = solvers[name]
    if not e.available:
        raise RegistryError(f"solver {name!r} ({e.path}) is unavailable: {e.why_unavailable}")
    return e


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


def _measure(model, problem, device, latency_batch, latency_repeats) -> dict:
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
    out["ort_latency_ms"], out["ort_note"] = _ort_latency(model, problem, latency_batch, latency_repeats)
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

    from .deploy import ort_latency

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
    from .bench.registry import RegistryError

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
    from .bench.registry import RegistryError
    from .compressor import Compressor
    from .specs import SpecError, resolve

    from ._validation import check_float

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
            solvers: dict | None = None) -> dict:
    """Train, compress, export and evaluate ``sentry`` on ``pentry``; write the run's files to ``out``.

    ``pretrained`` (a dict shared between calls) caches the dense pretraining per seed, so a
    benchmark trains the dense model once; ``solvers`` (all loaded entries) names the applicable
    ones when ``sentry`` does not apply to an exact problem.  Returns the ``results.json`` content.
    """
    import torch

    import admm_compress as ac
    from . import plots as P
    from .bench.registry import cosine, train_dense
    from .training import resolve_device

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
        dense = _measure(model, problem, dev, latency_batch, latency_repeats)
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
    after = _measure(compact, problem, dev, latency_batch, latency_repeats)
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
             _fmt(res.get("state_dict_bytes"), "d"), _ratio(res.get("state_dict_bytes"), res.get("state_dict_bytes_before"))],
            ["latency (ms)", _fmt(res["latency_before_ms"], ".3f"), _fmt(res["latency_after_ms"], ".3f"),
             (f"x{res['latency_ratio']:.2f}" if res["latency_ratio"] else "-")],
            (["latency ONNX Runtime (ms)", _fmt(res.get("ort_latency_before_ms"), ".3f"),
              _fmt(res.get("ort_latency_after_ms"), ".3f"), f"x{res['ort_latency_ratio']:.2f}"]
             if res.get("ort_latency_ratio") else
             ["latency ONNX Runtime (ms)", "n/a", "n/a", res.get("ort_note") or "n/a"]),
            ["epoch time (s)", _fmt(res["before"].get("epoch_time_s"), ".3f"), _fmt(res["after"].get("epoch_time_s"), ".3f"),
             (f"x{res['time_ratio']:.2f}" if res["time_ratio"] else "-")],
            ["wall time (s)", _fmt(res["before"].get("pretrain_wall_s"), ".1f"), _fmt(res["fit_wall_s"], ".1f"), ""]]
    return _markdown(["", "dense (before)", f"{res['solver']} (after)", "change"], rows)


# ============================================================================ commands
def _cmd_list(args) -> int:
    problems, solvers = _load(args)
    _write("Problems (admm-compress run PROBLEM SOLVER [--set key=value ...]):")
    for name, e in sorted(problems.items()):
        if e.module is None:
            _write(f"  {name:<22} UNAVAILABLE: {e.error}")
            continue
        _write(f"  {name:<22} {e.description}")
        _write(f"  {'':<22}   defaults: " + ", ".join(f"{k}={v}" for k, v in e.defaults.items()))
    _write("")
    _write("Solvers:")
    for name, e in sorted(solvers.items()):
        if not e.available:
            _write(f"  {name:<22} UNAVAILABLE: {e.why_unavailable}")
            continue
        _write(f"  {name:<22} [{e.kind}] {e.description}")
        if e.params:
            _write(f"  {'':<22}   grid:     " + ", ".join(f"{k} in {list(v)}" for k, v in e.params.items()))
        _write(f"  {'':<22}   defaults: " + (", ".join(f"{k}={v}" for k, v in e.defaults.items()) or "(none)"))
    return 0


def _default_out(*parts) -> Path:
    return Path("runs") / "_".join(str(p) for p in parts)


def _cmd_run(args) -> int:
    from .bench.registry import parse_assignments
    from .training import resolve_device

    problems, solvers = _load(args)
    pentry = _problem_entry(problems, args.problem)
    sentry = _solver_entry(solvers, args.solver)
    assign = parse_assignments(args.assign)
    _check_finite_assignments(assign)
    pparams, sparams = _split_assignments(assign, pentry.defaults, {sentry.name: sentry.defaults}, pentry.name)
    _check_run_numbers(args)
    resolve_device(args.device)  # CUDA asked for but absent: clear error before any work
    if args.nproc < 1:
        raise CLIError(f"--nproc={args.nproc} must be >= 1")
    rank, world = _world()
    if args.nproc > 1 and world == 1:  # run this command in N processes (what torchrun does on one node)
        return _spawn(args.nproc, args._argv)
    if args.nproc not in (1, world):  # under torchrun, --nproc may be left out
        raise CLIError(f"--nproc={args.nproc} but this process was launched with WORLD_SIZE={world}")
    out = Path(args.out) if args.out else _default_out(pentry.name, sentry.name, args.seed)
    try:
        res = _run_main(args, pentry, sentry, pparams, sparams, solvers, out)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank != 0:
        return 0
    return _report_run(args, pentry, sentry, res, out)


def _spawn_worker(rank: int, world: int, port: int, argv: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import torch

    # share the cores instead of oversubscribing them (--threads, parsed later, overrides this)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    code = main(argv)
    if code:
        raise SystemExit(code)


def _spawn(world: int, argv: list) -> int:
    """Start ``world`` local processes running ``argv`` with torchrun's environment variables.

    Equivalent to ``torchrun --standalone --nproc-per-node=N -m admm_compress run ...`` (which
    also works); returns the first non-zero exit code.
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free local port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawn_worker, args=(r, world, port, list(argv))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    return next((c for c in codes if c), 0)


def _run_main(args, pentry, sentry, pparams, sparams, solvers, out):
    return run_one(pentry, sentry, pparams, sparams[sentry.name], args.seed, args.device, out, args.epochs,
                  progress=not args.no_progress, latency_batch=args.latency_batch,
                  latency_repeats=args.latency_repeats, solvers=solvers)


def _report_run(args, pentry, sentry, res, out) -> int:
    res["command"] = "admm-compress " + " ".join(shlex.quote(a) for a in args._argv)
    writer = _Writer()
    earlier = list(res.get("write_failures", []))
    if earlier:  # one rescue folder for the whole run
        writer._rescue = Path(earlier[0]["written_to"]).parent
    results_path = writer.json(out / "results.json", _jsonable(res))
    _write(f"\n{pentry.name} / {sentry.name} (seed {args.seed})\n")
    _write(_run_table(res))
    _write(f"wrote {results_path}" + ("" if "answer" in res else f", {res.get('files', {}).get('state_dict')}")
           + f" and plots in {out}/")
    writer.failed = [f for f in earlier if f["path"] != str(out / "results.json")] + writer.failed
    if writer.failed:
        writer.report()
        return 1
    if "answer" in res and not res["answer"]["ok"]:
        return 1
    return 0


def _check_run_numbers(args):
    if args.epochs is not None and args.epochs < 0:
        raise CLIError(f"--epochs={args.epochs} must be >= 0")
    for seed in ([args.seed] if hasattr(args, "seed") else []) + list(getattr(args, "seeds", None) or []):
        if seed < 0:
            raise CLIError(f"seed {seed} must be >= 0")
    if args.latency_batch < 1 or args.latency_repeats < 1:
        raise CLIError("--latency-batch and --latency-repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads={args.threads} must be >= 1")
        import torch

        torch.set_num_threads(args.threads)


BENCH_HEADERS = ["solver", "params", "seed", "acc before (%)", "acc after (%)", "acc drop", "MACs (M)",
                 "MACs drop (%)", "params (M)", "params drop (%)", "saved (bytes)", "latency ratio",
                 "ORT latency ratio", "train-time ratio", "wall (s)"]


def _bench_row(res: dict, shown: dict) -> list:
    if "answer" in res:
        return [res["solver"], _params_text(shown), res["seed"], "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                _fmt(res["wall_s"], ".1f")]
    m = lambda v: None if v is None else v / 1e6  # noqa: E731
    return [res["solver"], _params_text(shown), res["seed"], _fmt(res["acc_before"]), _fmt(res["acc_after"]),
            _fmt(res["acc_drop"], "+.2f"), _fmt(m(res["macs_after"]), ".3f"), _fmt(res["macs_drop"], ".1f"),
            _fmt(m(res["params_after"]), ".4f"), _fmt(res["params_drop"], ".1f"), _fmt(res.get("state_dict_bytes")),
            _fmt(res["latency_ratio"], ".2f"), _fmt(res.get("ort_latency_ratio"), ".2f", none="n/a"),
            _fmt(res["time_ratio"], ".2f"), _fmt(res["fit_wall_s"], ".1f")]


def _grid(entry, fixed: dict) -> list[dict]:
    """Every combination of the solver's ``PARAMS`` values, the ``fixed`` (``--set``) keys left out."""
    keys = [k for k in entry.params if k not in fixed]
    return [dict(zip(keys, vals)) for vals in itertools.product(*(entry.params[k] for k in keys))] or [{}]


def _slug(v) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", str(v)) or "x"


def _params_text(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items()) or "-"


def _cmd_bench(args) -> int:
    from .bench.registry import RegistryError, parse_assignments
    from .training import resolve_device

    problems, solvers = _load(args)
    pentry = _problem_entry(problems, args.problem)
    if args.solvers:
        chosen = [_solver_entry(solvers, s) for s in args.solvers]  # typos stop everything here
    else:
        chosen = [e for _, e in sorted(solvers.items()) if e.available]
        skipped = [n for n, e in sorted(solvers.items()) if not e.available]
        if skipped:
            log.warning("skipping unavailable solver(s): %s", ", ".join(skipped))
    assign = parse_assignments(args.assign)
    _check_finite_assignments(assign)
    pparams, sparams = _split_assignments(assign, pentry.defaults, {e.name: e.defaults for e in chosen}, pentry.name)
    _check_run_numbers(args)
    resolve_device(args.device)
    # exact problems: keep the solvers that apply (explicitly named ones that do not apply -> error)
    probe = None
    if getattr(pentry.module, "build", None) is not None:
        probe_params = dict(pparams)
        probe = _build_problem(pentry, args.seeds[0], "cpu", probe_params)
    if probe is not None and probe.is_exact:
        ok = [e for e in chosen if e.kind == "admm" and e.constraint in probe.accepts]
        if args.solvers and len(ok) != len(chosen):
            bad = [e.name for e in chosen if e not in ok]
            raise RegistryError(f"solver(s) {bad} do not apply to the exact problem {pentry.name!r}; "
                                f"applicable: {[e.name for e in ok]}")
        chosen = ok
    jobs = [(e, combo) for e in chosen for combo in (_grid(e, sparams[e.name]) if args.grid else [{}])]
    if probe is not None:  # bad solver parameter values stop the bench before any training
        for e, combo in jobs:
            _check_solver_builds(e, probe, e.resolve({**combo, **sparams[e.name]}, probe))
    del probe
    out = Path(args.out) if args.out else _default_out("bench", pentry.name)
    # every output location is created and probed before the first training starts
    report_prefix = None
    if args.report:
        report_prefix = Path(args.report)
        if not report_prefix.name or report_prefix.name in (".", ".."):
            raise CLIError(f"--report {args.report!r} must end with a file-name prefix (e.g. docs/results/bench)")
        _check_output_dir(report_prefix.parent, "--report folder",
                          [report_prefix.name + ext for ext in (".md", ".csv", ".png")])
    _check_output_dir(out, "--out", BENCH_FILES)
    cache: dict = {}
    rows, results, failures = [], [], []
    run_write_failures: list[dict] = []
    for seed in args.seeds:
        for e, combo in jobs:
            tag = e.name + "".join(f"_{_slug(k)}-{_slug(v)}" for k, v in combo.items())
            _write(f"[bench] {pentry.name} / {e.name}{' ' + _params_text(combo) if combo else ''} / seed {seed}",
                   sys.stderr)
            try:
                res = run_one(pentry, e, pparams, {**combo, **sparams[e.name]}, seed, args.device,
                              out / f"{tag}_seed{seed}",
                              args.epochs, progress=not args.no_progress, latency_batch=args.latency_batch,
                              latency_repeats=args.latency_repeats, pretrained=cache, plots=True)
            except Exception as exc:  # one failing solver must not lose the others' results
                log.error("%s failed: %s: %s", e.name, type(exc).__name__, exc, exc_info=args.verbose > 0)
                failures.append((e.name, seed, f"{type(exc).__name__}: {exc}"))
                continue
            run_write_failures.extend(res.get("write_failures", []))
            keys = list(e.params) + [k for k in sparams[e.name] if k not in e.params]
            shown = {k: res["solver_params"][k] for k in keys if k in res["solver_params"]}
            results.append(res)
            rows.append(_bench_row(res, shown))
    command = "admm-compress " + " ".join(shlex.quote(a) for a in args._argv)
    title = args.title or f"admm-compress bench {pentry.name}"
    md = [f"# {title}", "", f"Command: `{command}`", ""]
    if results and "answer" not in results[0]:
        r0 = results[0]
        md += [f"Problem parameters: {_params_text(r0['problem_params'])}; seeds {args.seeds}; device {r0['device']}.",
               f"Dense reference (seed {r0['seed']}): accuracy {r0['acc_before']:.2f} %, "
               f"{(r0['macs_before'] or 0) / 1e6:.3f} M MACs, {(r0['params_before'] or 0) / 1e6:.4f} M params "
               f"(ptflops, pytorch backend).",
               "Every row starts from that dense model and trains `epochs` more epochs (plus `finetune_epochs`); "
               "the `dense` row is the unconstrained run at the same budget. "
               "Drops are relative to the dense model; saved = bytes of the exported model's state-dict file "
               f"(dense: {r0.get('state_dict_bytes_before')} bytes); latency ratio = compressed / dense median latency "
               f"({r0.get('latency_note', '')}); ORT latency ratio = the same in ONNX Runtime "
               f"({r0.get('ort_note') or 'n/a'}); train-time ratio = median solver epoch time / median dense epoch time.",
               ""]
        md.append(_markdown(BENCH_HEADERS, rows))
    elif results:
        erows = [[r["solver"], r["seed"], ", ".join(f"{k}: {v:.2e}" for k, v in r["answer"]["errors"].items()),
                  f"{r['answer']['tolerance']:.1e}", "yes" if r["answer"]["ok"] else "NO", _fmt(r["wall_s"], ".2f")]
                 for r in results]
        md.append(_markdown(["solver", "seed", "relative error to known answer", "tolerance", "reached", "wall (s)"],
                            erows))
    if failures:
        md += ["", "Failed runs:", ""] + [f"- {n} (seed {s}): {msg}" for n, s, msg in failures]
    has_plot = bool(results) and "answer" not in results[0]
    targets = [(out / "bench.md", out / "bench.csv", out / "tradeoff.png")]
    if report_prefix is not None:
        prefix = report_prefix
        targets.append((prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv"),
                        prefix.with_name(prefix.name + ".png")))
    writer = _Writer()
    writer.failed = run_write_failures  # the runs' own files first, then the tables
    written = []
    for md_path, csv_path, png_path in targets:
        img = [f"![trade-off]({png_path.name})"] if has_plot else []
        written.append(writer.text(md_path, "\n".join(md + [""] + img) + "\n"))
        written.append(writer(csv_path, lambda p: _write_csv(Path(p), results)))
        if has_plot:
            from . import plots as P

            rows_ = ([{"solver": r["solver"], "macs_drop": r["macs_drop"], "acc_after": r["acc_after"],
                       "setting": json.dumps(_jsonable(r["solver_params"]), sort_keys=True)} for r in results]
                     + [{"solver": "dense (pretrained, before)", "macs_drop": 0.0, "acc_after": r["acc_before"]}
                        for r in results])
            written.append(writer(png_path, lambda p: P.tradeoff(rows_, p, title)))
    _write("\n".join(md))
    _write("wrote " + ", ".join(str(p) for p in written))
    writer.report()
    return 1 if failures or not results or writer.failed else 0


def _write_csv(path: Path, results: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["problem", "solver", "seed", "solver_params", "acc_before", "acc_after", "acc_drop",
                    "macs_before", "macs_after", "macs_drop", "params_before", "params_after", "params_drop",
                    "latency_before_ms", "latency_after_ms", "latency_ratio", "time_ratio", "fit_wall_s",
                    "max_error", "ok", "state_dict_bytes_before", "state_dict_bytes", "ort_latency_before_ms",
                    "ort_latency_after_ms", "ort_latency_ratio"])
        for r in results:
            w.writerow([r["problem"], r["solver"], r["seed"], json.dumps(_jsonable(r["solver_params"])),
                        r.get("acc_before"), r.get("acc_after"), r.get("acc_drop"), r.get("macs_before"),
                        r.get("macs_after"), r.get("macs_drop"), r.get("params_before"), r.get("params_after"),
                        r.get("params_drop"), r.get("latency_before_ms"), r.get("latency_after_ms"),
                        r.get("latency_ratio"), r.get("time_ratio"), r.get("fit_wall_s", r.get("wall_s")),
                        r.get("answer", {}).get("max_error"), r.get("answer", {}).get("ok"),
                        r.get("state_dict_bytes_before"), r.get("state_dict_bytes"), r.get("ort_latency_before_ms"),
                        r.get("ort_latency_after_ms"), r.get("ort_latency_ratio")])


# ============================================================================ entry
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``admm-compress`` console script; returns the exit code."""
    from .bench.registry import RegistryError
    from .specs import SpecError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors
        return int(e.code or 0)
    args._argv = argv
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    cmd = {"run": _cmd_run, "bench": _cmd_bench, "list": _cmd_list}[args.command]
    try:
        return cmd(args)
    except (RegistryError, CLIError, SpecError) as e:
        _write(f"admm-compress: error: {e}", sys.stderr)
        return 2
    except (ValueError, RuntimeError, TypeError, FileNotFoundError) as e:
        if args.verbose:
            raise
        _write(f"admm-compress: error: {type(e).__name__}: {e}", sys.stderr)
        return 2 if _is_setup_error(e) else 1
    except KeyboardInterrupt:
        _write("admm-compress: interrupted", sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` & co.: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


def _is_setup_error(e: Exception) -> bool:
    msg = str(e)
    return "CUDA is not available" in msg or "is not a valid torch device" in msg or isinstance(e, FileNotFoundError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
