"""Benchmark entries: problem and solver files loaded from folders (benchopt style).

The repository's ``problems/`` and ``solvers/`` folders (and any folder a user names) hold one
small Python file per entry.  The library never imports them; the CLI (and :func:`load_problems`
/ :func:`load_solvers`) loads them with :func:`importlib.util.spec_from_file_location`.

Contract of a problem file (``problems/<name>.py``)
---------------------------------------------------
``NAME``       str, the name used on the command line (defaults to the file stem).
``DEFAULTS``   dict of the problem's parameters and their defaults: at least ``epochs`` (training
               epochs of the solver), usually ``pretrain_epochs`` (dense training before the
               solver), ``batch_size``, ``lr`` and ``finetune_epochs``.  ``--set key=value`` may
               change any of them, and nothing else.
``build(seed, device, **params) -> Problem``
               Builds the model, the data and the loss (see :class:`Problem`).  ``params`` holds
               every key of ``DEFAULTS`` (defaults filled in).
``DESCRIPTION`` optional one-line text for ``admm-compress list``.

Contract of a solver file (``solvers/<name>.py``)
-------------------------------------------------
``NAME``       str (defaults to the file stem).
``PARAMS``     dict ``name -> list of values``: the grid ``bench --grid`` sweeps (every
               combination; its first value is not special; the default comes from ``DEFAULTS``).
``DEFAULTS``   dict ``name -> default``; every key of ``PARAMS`` must be in it.
``build(problem, **params)`` (or ``build(**params)``)
               Returns an :class:`admm_compress.Solver`, or any object with the same protocol:
               ``fit(model, loader, epochs, optimizer=..., loss_fn=..., val_loader=...,
               finetune_epochs=..., device=..., progress=..., lr=...) -> History`` and either
               ``export(model) -> nn.Module`` or a ``spec`` for :func:`admm_compress.export`.
               Baselines that are not constrained training derive from :class:`Baseline`.
``lr_scale``   optional key of ``DEFAULTS``: the solver trains with ``problem.lr * lr_scale``
               (e.g. LoRITa, whose N-factor products amplify the effective step).
``KIND``       optional: ``"method"`` (default), ``"baseline"`` or ``"admm"``.
``CONSTRAINT`` optional, for ``KIND = "admm"``: the constraint family (``"lowrank"``,
               ``"sparse"``, ``"channels"``, ``"tt"``); an exact problem lists the families it accepts in
               :attr:`Problem.accepts`.
``REQUIRES``   optional list of module names ``build`` imports lazily; ``admm-compress list``
               reports the entry as unavailable when one cannot be found.
``export(solver, model, problem, **params)``
               optional: how to turn the trained model into the compact one.  Default:
               ``solver.export(model)`` when the solver has it, else
               ``admm_compress.export(model, solver.spec)``.

A solver's ``build`` may import modules that do not exist yet; such an import error is caught
when the solver is built, and ``admm-compress list`` reports the entry as unavailable.

Search path: folders given explicitly (``--problems-dir`` / ``--solvers-dir``), then each
folder ``<p>/problems`` / ``<p>/solvers`` for ``<p>`` in the ``ADMM_COMPRESS_PATH`` environment
variable (``os.pathsep``-separated), then ``./problems`` / ``./solvers`` of the current working
directory, then those of the source checkout this package was installed from (editable install).
The first file that defines a name wins.

(Formerly ``admm_compress.registry``; that path still imports and is this module, so entry files
written against it keep working.)
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._validation import check_choice, check_float, check_int
from ..exportable import register_checker

__all__ = ["Problem", "Baseline", "ProblemEntry", "SolverEntry", "RegistryError", "load_problems",
           "load_solvers", "search_path", "parse_value", "parse_assignments", "check_params",
           "train_dense", "cosine", "cifar10_problem", "MatrixVariable", "MatrixProblemModel"]

log = logging.getLogger(__name__)

ENV_VAR = "ADMM_COMPRESS_PATH"


class RegistryError(ValueError):
    """An unknown problem / solver / parameter name, or a malformed entry file."""


# =========================================================================== problems
@dataclasses.dataclass
class Problem:
    """What a problem file's ``build`` returns.

    Attributes
    ----------
    name : str
    model : nn.Module
        Freshly initialized (seeded) model; the CLI trains it.
    train_loader, test_loader : iterable of (inputs, targets)
    input_size : tuple of int
        One input without the batch dimension (for MACs and latency).
    loss_fn : callable, default cross entropy
        ``loss_fn(outputs, targets)``; the outputs are whatever the model returns (a tensor, a
        tuple, a dict...).
    epochs : int
        Solver training epochs.
    pretrain_epochs : int
        Dense training epochs before the solver (0: the solver starts from the initialization).
    finetune_epochs : int
        Fine-tuning epochs after the solver's final projection (structure kept).
    lr : float
        Learning rate of the default optimizer (SGD, momentum 0.9, weight decay 5e-4).
    optimizer : callable, optional
        ``params -> optimizer`` overriding the default optimizer (exact problems use plain SGD).
    task : {"classification", "exact"}
        ``"exact"``: a problem with a known answer (no accuracy, MACs or export).
    known_answer : dict, optional
        Exact problems: ``{parameter name: tensor}`` the solution must equal.
    tolerance : float
        Exact problems: largest relative Frobenius error accepted.
    spec : list of Constrain, optional
        Exact problems: the problem's own constraint (the admm solvers use it).
    accepts : tuple of str
        Exact problems: constraint families (``"lowrank"``, ``"sparse"``, ``"tt"``) of the
        solvers that may solve it.
    solver_defaults : dict
        Solver parameters that suit this problem (e.g. ``rho``); used unless the user sets them.
    answer_fn : callable, optional
        ``model -> {name: tensor}`` extracting the solution (default: ``named_parameters``).
    answer_checks : callable, optional
        ``model -> {check name: bool}``: further conditions of the known answer (e.g. the exact
        rank); all must hold for ``ok``.
    keep_dense : tuple of str
        Module names (globs) the network solvers leave dense, e.g. the final classifier.
    meta : dict
        Anything else worth recording in ``results.json``.
    accuracy_fn : callable, optional
        ``accuracy_fn(outputs, targets) -> correct or (correct, total)`` for models whose outputs
        are not a logits tensor (see :func:`admm_compress.training.count_correct`).

    Every field is checked when the problem is built (``epochs=-1``, ``lr=nan`` raise there, so
    the CLI refuses them before any training).
    """

    name: str
    model: nn.Module
    train_loader: Any
    test_loader: Any
    input_size: tuple
    loss_fn: Callable = F.cross_entropy
    epochs: int = 1
    pretrain_epochs: int = 0
    finetune_epochs: int = 0
    lr: float = 0.05
    optimizer: Callable | None = None
    task: str = "classification"
    known_answer: dict | None = None
    tolerance: float = 1e-3
    spec: list | None = None
    accepts: tuple = ()
    solver_defaults: dict = dataclasses.field(default_factory=dict)
    answer_fn: Callable | None = None
    answer_checks: Callable | None = None
    keep_dense: tuple = ()
    meta: dict = dataclasses.field(default_factory=dict)
    accuracy_fn: Callable | None = None

    def __post_init__(self):
        """Check every field (a bad ``--set`` value stops the CLI here, before any training)."""
        where = f"Problem {self.name!r}"
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(self.model).__name__}")
        for k in ("epochs", "pretrain_epochs", "finetune_epochs"):
            setattr(self, k, check_int(k, getattr(self, k), low=0, where=where))
        self.lr = check_float("lr", self.lr, low=0.0, low_open=True, where=where)
        self.tolerance = check_float("tolerance", self.tolerance, low=0.0, low_open=True, where=where)
        check_choice("task", self.task, ("classification", "exact"), where=where)
        for k in ("loss_fn", "optimizer", "accuracy_fn", "answer_fn", "answer_checks"):
            v = getattr(self, k)
            if v is not None and not callable(v):
                raise TypeError(f"{where}: {k} must be callable, got {v!r}")
        if self.loss_fn is None:
            raise TypeError(f"{where}: loss_fn must be callable, got None")
        size = tuple(self.input_size) if isinstance(self.input_size, (tuple, list)) else None
        if size is None or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size):
            raise ValueError(f"{where}: input_size={self.input_size!r} must be a tuple of positive ints "
                             f"(one input without the batch dimension)")
        self.input_size = size
        if isinstance(self.keep_dense, str):
            self.keep_dense = (self.keep_dense,)
        self.keep_dense = tuple(self.keep_dense)
        if not all(isinstance(k, str) for k in self.keep_dense):
            raise TypeError(f"{where}: keep_dense must hold module-name globs (str), got {self.keep_dense!r}")
        for k in ("train_loader", "test_loader"):
            ld = getattr(self, k)
            if ld is None:
                raise ValueError(f"{where}: {k} must be an iterable of (inputs, targets), got None")
            try:
                empty = len(ld) == 0
            except TypeError:  # iterables without a length are checked when they are read
                empty = False
            if empty:
                raise ValueError(f"{where}: {k} yields no batch (len 0); check the parameters that size it "
                                 f"(e.g. steps_per_epoch, batch_size)")

    @property
    def is_exact(self) -> bool:
        return self.task == "exact"

    def solution(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The tensors compared with :attr:`known_answer`."""
        model = self.model if model is None else model
        if self.answer_fn is not None:
            return {k: v.detach() for k, v in self.answer_fn(model).items()}
        return {k: v.detach() for k, v in model.named_parameters()}

    def check_answer(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Relative Frobenius errors ``||x - x*|| / ||x*||`` per known tensor, and ``ok``."""
        if not self.known_answer:
            raise ValueError(f"problem {self.name!r} has no known answer")
        sol = self.solution(model)
        errors = {}
        for k, ref in self.known_answer.items():
            if k not in sol:
                raise KeyError(f"problem {self.name!r}: the solution has no tensor {k!r} "
                               f"(it has {sorted(sol)})")
            x = sol[k].to(ref.dtype)
            errors[k] = float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
        worst = max(errors.values())
        checks = {k: bool(v) for k, v in (self.answer_checks(model if model is not None else self.model)
                                          if self.answer_checks is not None else {}).items()}
        return {"errors": errors, "max_error": worst, "tolerance": self.tolerance, "checks": checks,
                "ok": worst <= self.tolerance and all(checks.values())}


class MatrixVariable(nn.Module):
    """A free matrix ``X`` (the parameter ``weight``); ``forward`` ignores its input and returns ``X``.

    Lets the exact matrix problems (best rank-r approximation, robust PCA, matrix completion)
    run through the same :meth:`admm_compress.Solver.fit` loop as networks: the loss compares
    ``X`` with the data carried as the batch's targets.
    """

    def __init__(self, m: int, n: int, dtype=torch.float64):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(m, n, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - returns the variable
        return self.weight


def _matrix_variable_check(module, param_name, constraint, view):
    """A free matrix of an exact problem is solved, not exported: accept any set on it."""
    return "" if isinstance(module, MatrixVariable) else None


register_checker(_matrix_variable_check)


class MatrixProblemModel(nn.Module):
    """Holds one :class:`MatrixVariable` under the name ``x`` (spec target ``"x"``)."""

    def __init__(self, m: int, n: int, dtype=torch.float64):
        super().__init__()
        self.x = MatrixVariable(m, n, dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.x(inputs)


# =========================================================================== baselines
def train_dense(model: nn.Module, loader: Iterable, epochs: int, optimizer=None, loss_fn=None,
                val_loader=None, device=None, progress: bool | None = None, lr: float = 0.05,
                phase: str = "train", scheduler=None, accuracy_fn=None):
    """Plain training (no constraint): the dense baseline and the pretraining of the CLI.

    The library's one trainer with no compressor (:func:`admm_compress.trainer.fit`), so dense
    and constrained runs share the epoch loop, devices, validation and accuracy.  ``scheduler``
    is an optional factory ``optimizer -> LR scheduler`` stepped once per epoch (the CLI passes
    :func:`cosine`).  ``phase`` labels the epoch records ("train" or "finetune").

    Returns an :class:`admm_compress.History` with one record per epoch (``loss``,
    ``train_accuracy``, ``val_accuracy`` when ``val_loader`` is given, ``wall``).
    """
    from ..trainer import fit

    hist = fit(None, model, loader, epochs=epochs, optimizer=optimizer, loss_fn=loss_fn, val_loader=val_loader,
               device=device, progress=progress, lr=lr, scheduler=scheduler, accuracy_fn=accuracy_fn)
    for rec in hist.epochs:
        rec["phase"] = phase
    return hist


def cifar10_problem(name: str, make_model: Callable[[], nn.Module], model_name: str, keep_dense: Sequence[str], *,
                    seed: int, epochs: int, pretrain_epochs: int, finetune_epochs: int, batch_size: int, lr: float,
                    root=None, download: bool = False, num_workers: int = 2) -> "Problem":
    """The :class:`Problem` of the ``problems/cifar10_*.py`` files: ``make_model()`` on CIFAR-10
    read from ``root`` (downloaded only with ``download=True``); seeds torch with ``seed`` and
    builds the data before the model."""
    from .. import data

    torch.manual_seed(seed)
    train, test = data.cifar10(root=root, batch_size=batch_size, download=download, num_workers=num_workers,
                               seed=seed)
    return Problem(name, make_model(), train, test, (3, 32, 32), epochs=epochs, pretrain_epochs=pretrain_epochs,
                   finetune_epochs=finetune_epochs, lr=lr, keep_dense=tuple(keep_dense),
                   meta={"model": model_name, "data": "cifar10"})


def cosine(epochs: int, final_fraction: float = 0.01):
    """Scheduler factory: cosine annealing from the optimizer's LR to ``final_fraction`` of it
    over ``epochs`` epochs (one ``step()`` per epoch), for ``fit(..., scheduler=cosine(n))``."""
    def make(opt):
        base = opt.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(epochs), 1),
                                                          eta_min=base * final_fraction)
    return make


class Baseline:
    """Protocol of a benchmark entry that is not a constrained-training :class:`Solver`.

    Subclasses implement :meth:`compress` (what happens to the trained dense model) and set
    :attr:`spec` there if :func:`admm_compress.export` should build compact layers; the default
    :meth:`fit` trains densely for ``epochs``, calls :meth:`compress`, then fine-tunes with the
    structure kept for ``finetune_epochs``.
    """

    spec: list | None = None

    def fit(self, model: nn.Module, loader, epochs: int = 1, optimizer=None, loss_fn=None, val_loader=None,
            finetune_epochs: int = 0, device=None, progress: bool | None = None, lr: float = 0.05,
            scheduler=None, accuracy_fn=None, **_):
        from ..training import evaluate

        finetune_epochs = check_int("finetune_epochs", finetune_epochs, low=0, where=f"{type(self).__name__}.fit")
        hist = train_dense(model, loader, epochs, optimizer, loss_fn, val_loader, device, progress, lr,
                           scheduler=scheduler, accuracy_fn=accuracy_fn)
        self.compress(model, loader)
        if val_loader is not None:
            hist.final["after_finalize"] = evaluate(model, val_loader, loss_fn, device, accuracy_fn=accuracy_fn)
        if finetune_epochs > 0:
            ft = self.finetune(model, loader, finetune_epochs, loss_fn, val_loader, device, progress, lr)
            hist.epochs.extend(ft.epochs)
            if val_loader is not None:
                hist.final["after_finetune"] = evaluate(model, val_loader, loss_fn, device, accuracy_fn=accuracy_fn)
        return hist

    def compress(self, model: nn.Module, loader) -> None:  # pragma: no cover - interface
        """Compress the trained dense ``model`` in place."""

    def finetune(self, model, loader, epochs, loss_fn, val_loader, device, progress, lr):
        """Fine-tune keeping the structure; default: dense fine-tuning (lr / 10)."""
        return train_dense(model, loader, epochs, None, loss_fn, val_loader, device, progress, lr / 10,
                           phase="finetune")

    def export(self, model: nn.Module) -> nn.Module:
        """The compact model (a copy): :func:`admm_compress.export` with :attr:`spec`, or a copy."""
        from ..export import export

        if not self.spec:
            return copy.deepcopy(model)
        return export(model, self.spec)


# =========================================================================== loading
def _repo_root_guess() -> Path:
    return Path(__file__).resolve().parents[2]


def search_path(kind: str, extra: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Folders searched for ``kind`` (``"problems"`` or ``"solvers"``) entry files, in order."""
    if kind not in ("problems", "solvers"):
        raise ValueError(f"kind must be 'problems' or 'solvers', got {kind!r}")
    out: list[Path] = []
    for d in extra or ():
        p = Path(d).expanduser()
        if not p.is_dir():
            raise RegistryError(f"--{kind}-dir {os.fspath(d)!r} is not a folder")
        out.append(p)
    for root in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        r = Path(root).expanduser()
        out.append(r / kind if (r / kind).is_dir() else r)
    out.append(Path.cwd() / kind)
    out.append(_repo_root_guess() / kind)
    seen, uniq = set(), []
    for p in out:
        rp = p.resolve()
        if rp not in seen and p.is_dir():
            seen.add(rp)
            uniq.append(p)
    return uniq


def _load_module(path: Path, kind: str) -> ModuleType:
    modname = f"_admm_compress_{kind}_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise RegistryError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception:
        del sys.modules[modname]
        raise
    return mod


@dataclasses.dataclass
class _Entry:
    name: str
    path: Path
    module: ModuleType | None
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.module is not None and self.error is None

    @property
    def description(self) -> str:
        if self.module is None:
            return ""
        d = getattr(self.module, "DESCRIPTION", None) or (self.module.__doc__ or "").strip().split("\n")[0]
        return d


@dataclasses.dataclass
class ProblemEntry(_Entry):
    defaults: dict = dataclasses.field(default_factory=dict)

    def build(self, seed: int = 0, device: str = "cpu", **params) -> Problem:
        full = check_params(self.name, "problem", params, self.defaults)
        prob = self.module.build(seed=seed, device=device, **full)
        if not isinstance(prob, Problem):
            raise RegistryError(f"problem file {self.path} build() returned {type(prob).__name__}, "
                                f"not admm_compress.bench.registry.Problem")
        return prob


@dataclasses.dataclass
class SolverEntry(_Entry):
    params: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)
    kind: str = "method"
    constraint: str | None = None

    def missing_requirements(self) -> list[str]:
        """Modules named in ``REQUIRES`` that cannot be imported (checked without importing)."""
        if self.module is None:
            return []
        out = []
        for name in getattr(self.module, "REQUIRES", ()):
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                out.append(name)
        return out

    @property
    def available(self) -> bool:
        return self.module is not None and self.error is None and not self.missing_requirements()

    @property
    def why_unavailable(self) -> str:
        if self.error:
            return self.error
        miss = self.missing_requirements()
        return f"missing module(s) {', '.join(miss)}" if miss else ""

    def export(self, solver, model: nn.Module, problem: Problem, params: Mapping[str, Any]) -> nn.Module:
        """The compact model: the file's ``export`` hook, ``solver.export(model)`` or ``ac.export``."""
        hook = getattr(self.module, "export", None)
        if callable(hook):
            return hook(solver, model, problem, **params)
        own = getattr(solver, "export", None)
        if callable(own):
            return own(model)
        from ..export import export

        return export(model, solver)  # through export_spec(): what training selected

    def resolve(self, params: Mapping[str, Any], problem: Problem | None = None) -> dict:
        """Defaults < problem's solver_defaults < user's ``params``, names checked."""
        check_params(self.name, "solver", params, self.defaults)
        full = dict(self.defaults)
        if problem is not None:
            full.update({k: v for k, v in problem.solver_defaults.items() if k in self.defaults})
        full.update(params)
        return full

    def check_problem(self, problem: Problem, valid: Iterable[str] = ()) -> None:
        """Refuse a solver that does not apply to an exact problem (before any work)."""
        if not problem.is_exact:
            return
        if self.kind != "admm" or self.constraint not in problem.accepts:
            ok = ", ".join(valid) or "(none loaded)"
            raise RegistryError(f"solver {self.name!r} does not apply to the exact problem {problem.name!r} "
                                f"(it accepts admm solvers for {list(problem.accepts)}); use one of: {ok}")

    def build(self, problem: Problem | None = None, **params):
        if not self.available:
            raise RegistryError(f"solver {self.name!r} is unavailable: {self.why_unavailable}")
        full = self.resolve(params, problem)
        fn = self.module.build
        try:
            if "problem" in inspect.signature(fn).parameters:
                return fn(problem=problem, **full)
            return fn(**full)
        except (ImportError, AttributeError) as e:
            if isinstance(e, AttributeError) and "admm_compress" not in str(e):
                raise
            raise RegistryError(f"solver {self.name!r} is unavailable: {e}") from e


def _entry_name(mod: ModuleType, path: Path) -> str:
    name = getattr(mod, "NAME", path.stem)
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{path}: NAME must be a non-empty string, got {name!r}")
    return name


def _scan(kind: str, extra) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for folder in search_path(kind, extra):
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                mod = _load_module(path, kind)
            except Exception as e:  # a broken file is listed, not fatal
                name = path.stem
                if name not in entries:
                    entries[name] = (ProblemEntry if kind == "problems" else SolverEntry)(
                        name, path, None, f"{type(e).__name__}: {e}")
                continue
            name = _entry_name(mod, path)
            if name in entries:
                log.debug("%s %r in %s is shadowed by %s", kind, name, path, entries[name].path)
                continue
            if not callable(getattr(mod, "build", None)):
                raise RegistryError(f"{path}: a {kind[:-1]} file must define build(...)")
            defaults = dict(getattr(mod, "DEFAULTS", {}))
            if kind == "problems":
                entries[name] = ProblemEntry(name, path, mod, None, defaults)
            else:
                grid = dict(getattr(mod, "PARAMS", {}))
                missing = [k for k in grid if k not in defaults]
                if missing:
                    raise RegistryError(f"{path}: PARAMS names {missing} have no entry in DEFAULTS")
                for k, v in grid.items():
                    if not isinstance(v, (list, tuple)) or not v:
                        raise RegistryError(f"{path}: PARAMS[{k!r}] must be a non-empty list of values")
                kind_ = getattr(mod, "KIND", "method")
                entries[name] = SolverEntry(name, path, mod, None, grid, defaults, kind_,
                                            getattr(mod, "CONSTRAINT", None))
    return entries


def load_problems(extra: Sequence[str | os.PathLike] | None = None) -> dict[str, ProblemEntry]:
    """All problem entries found on the search path (see module docstring), by name."""
    return _scan("problems", extra)


def load_solvers(extra: Sequence[str | os.PathLike] | None = None) -> dict[str, SolverEntry]:
    """All solver entries found on the search path, by name (unavailable ones included)."""
    return _scan("solvers", extra)


# =========================================================================== parameters
def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, ``"a,b"`` ->
    a tuple of parsed values, anything else -> the string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in t:
        return tuple(parse_value(p) for p in t.split(",") if p.strip())
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_assignments(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: parse_value(value)}``; malformed items raise."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise RegistryError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise RegistryError(f"--set expects key=value, got {item!r}")
        out[k] = parse_value(v)
    return out


def check_params(entry: str, kind: str, params: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """``defaults`` updated by ``params``; unknown names raise :class:`RegistryError` listing the valid
    ones (with a did-you-mean), and a non-bool value for a parameter whose default is a bool raises."""
    unknown = sorted(k for k in params if k not in defaults)
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(defaults), n=1)
            if close:
                hints.append(f"{k!r} (did you mean {close[0]!r}?)")
            else:
                hints.append(repr(k))
        raise RegistryError(f"unknown parameter(s) {', '.join(hints)} for {kind} {entry!r}; valid: "
                            f"{', '.join(sorted(defaults)) or '(none)'}")
    for k, v in params.items():  # a flag takes true/false, nothing else (`--set include_linear=x`)
        if isinstance(defaults[k], bool) and not isinstance(v, bool):
            raise RegistryError(f"parameter {k}={v!r} of {kind} {entry!r} must be true or false "
                                f"(default {defaults[k]})")
    full = dict(defaults)
    full.update(params)
    return full


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> RegistryError:
    """The error for a typo in a problem / solver name (lists the valid names)."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RegistryError(f"unknown {kind} {name!r}{hint}; valid {kind}s: {', '.join(valid)}")
