"""What every ``admm-compress`` command shares: the usage error, console output and the atomic
output-file writer with its rescue folder."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

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


# ============================================================================ arguments and entries
def _split_assignments(assign: dict, pdefaults: dict, sdefaults_by_solver: dict[str, dict],
                       problem: str) -> tuple[dict, dict[str, dict]]:
    """Route ``--set`` keys to the problem or to the solvers that have them; unknown keys raise."""
    from .registry import RegistryError

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
    from .registry import load_problems, load_solvers

    return load_problems(args.problems_dir), load_solvers(args.solvers_dir)


def _problem_entry(problems, name):
    from .registry import unknown_name_error

    if name not in problems:
        raise unknown_name_error("problem", name, problems)
    e = problems[name]
    if e.module is None:
        raise CLIError(f"problem {name!r} ({e.path}) cannot be loaded: {e.error}")
    return e


def _solver_entry(solvers, name):
    from .registry import RegistryError, unknown_name_error

    if name not in solvers:
        raise unknown_name_error("solver", name, solvers)
    e = solvers[name]
    if not e.available:
        raise RegistryError(f"solver {name!r} ({e.path}) is unavailable: {e.why_unavailable}")
    return e


def _default_out(*parts) -> Path:
    return Path("runs") / "_".join(str(p) for p in parts)


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


