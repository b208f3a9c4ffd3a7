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
import logging
from typing import Any, Callable, Iterable, Sequence

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


# Loading the entry files and checking their parameters (formerly here; same names importable).
from .entries import (ProblemEntry, SolverEntry, _Entry, check_params, load_problems,  # noqa: E402,F401
                      load_solvers, parse_assignments, parse_value, search_path, unknown_name_error)
