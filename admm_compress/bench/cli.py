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
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from ._io import (BENCH_FILES, RUN_FILES, CLIError, _check_finite_assignments, _check_output_dir,  # noqa: F401
                  _check_run_numbers, _commit, _default_out, _load, _problem_entry, _solver_entry,
                  _split_assignments, _Writer, _write)
from .run import (_build_problem, _check_solver_builds, _jsonable, _ort_latency, _run_table,  # noqa: F401
                  _world, run_one)
from .compare import _cmd_bench  # noqa: F401

__all__ = ["main", "run_one", "build_parser"]

log = logging.getLogger("admm_compress.cli")


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
                       help="torch CPU threads (default: torch's choice; "
                            "1 is fastest for tiny models on a busy machine)")
    train.add_argument("--latency-batch", type=int, default=32, help="batch size of the latency measurement")
    train.add_argument("--latency-repeats", type=int, default=30, help="timed forward passes for latency")
    train.add_argument("--no-ort", action="store_true",
                       help="skip the ONNX Runtime latency (measured by default when onnxruntime is installed; "
                            "the ONNX export takes seconds per model)")

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


def _cmd_run(args) -> int:
    from .registry import parse_assignments
    from ..training import resolve_device

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
                  latency_repeats=args.latency_repeats, solvers=solvers, ort=not args.no_ort)


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


# ============================================================================ entry
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``admm-compress`` console script; returns the exit code."""
    from .registry import RegistryError
    from ..specs import SpecError

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
