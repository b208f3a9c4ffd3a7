"""The training loop every compressor runs in: ``fit(compressor, model, loader, ...)``.

One trainer for every method (and for dense training: ``compressor=None``): optimizer
factory, epochs, mixed precision (:class:`~admm_compress.training.Amp`), DDP rewrapping,
callbacks, atomic checkpoints with resume, fine-tuning with the structure kept.  What differs
between methods is behind the :class:`~admm_compress.compressor.Compressor` life cycle and
hooks; ``Solver.fit(model, loader, ...)`` (and every method's ``fit``) is this function.

Several processes (``torchrun --nproc-per-node N script.py``): initialize the process group,
wrap the model in :class:`~torch.nn.parallel.DistributedDataParallel` and give each rank a
:class:`~torch.utils.data.DistributedSampler` loader; ``fit`` calls ``sampler.set_epoch`` every
epoch.  Specs resolve through the wrapper; the Z-step, U-step and hard projections are computed
on every rank and rank 0's result is broadcast, so all ranks hold bit-identical ``W``, ``Z``,
``U`` (tests/test_distributed.py, 2 gloo processes, also against one process over the same
global batches); a solver whose ``prepare`` reparameterizes the model (LoRITa, RASPA) and the
structured fine-tuning get a fresh DDP wrapper around the new parameters; checkpoints are
written by rank 0 only (then a barrier) and read by every rank on resume::

    dist.init_process_group("gloo")           # "nccl" on GPUs
    model = DistributedDataParallel(model)
    loader = DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds))
    methods.lrpet(0.6).fit(model, loader, epochs=30, checkpoint="run.pt")

Checkpoints (format ``admm_compress.fit/1``, written atomically after every epoch, read with
``weights_only=True``) are :mod:`admm_compress.checkpoint`'s.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ._validation import check_float, check_int
from .compressor import Compressor, FitContext
from .distributed import barrier, progress_disabled, rank, rewrap
from .distributed import broadcast_ as _broadcast_
from .specs import unwrap
from .checkpoint import (CHECKPOINT_FORMAT, load_checkpoint, read_fit, resume_fit, rng_state, save_fit,
                         set_rng_state)
from .training import (Amp, NonFiniteError, accuracy_percent, batch_size, check_finite_loss, check_writable,
                       count_correct, evaluate, move_batch, recalibrate_bn, resolve_device, tree_detach)

__all__ = ["fit", "History", "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)



@dataclasses.dataclass
class History:
    """What :func:`fit` measured.

    Attributes
    ----------
    epochs : list of dict
        One record per epoch: ``phase`` ("train" or "finetune"), ``epoch``, ``loss`` (mean training
        loss incl. penalty), ``train_accuracy``, ``val_loss``/``val_accuracy`` (when a validation
        loader is given), ``primal``/``dual`` (overall ADMM residuals after the epoch), ``rho``,
        ``wall`` (seconds of the epoch).
    updates : list of dict
        One record per Z/U update: ``step``, ``primal``, ``dual``, ``rho`` and per-weight residuals.
    final : dict
        ``feasible``, ``projection_distance``; and with a val loader the evaluations
        ``before_finalize``, ``after_finalize``, ``after_finetune``.
    """

    epochs: list = dataclasses.field(default_factory=list)
    updates: list = dataclasses.field(default_factory=list)
    final: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"epochs": list(self.epochs), "updates": list(self.updates), "final": dict(self.final)}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(list(d.get("epochs", [])), list(d.get("updates", [])), dict(d.get("final", {})))

    def column(self, key: str, phase: str | None = None) -> list:
        """The values of ``key`` over epochs (optionally of one phase)."""
        return [e.get(key) for e in self.epochs if phase is None or e.get("phase") == phase]


# ================================================================== validation
def _check_optimizer(name: str, optimizer: Any) -> None:
    if optimizer is not None and not (isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)):
        raise TypeError(f"fit: {name} must be a torch.optim.Optimizer or a factory params -> "
                        f"optimizer, got {type(optimizer).__name__}")


def _check_arguments(model, loader, val_loader, optimizer, finetune_optimizer, callbacks, checkpoint, progress,
                     fns: dict) -> None:
    """Every argument of :func:`fit` checked before any work (messages name the parameter)."""
    if loader is None:
        raise ValueError("fit: loader is None; pass an iterable of (inputs, targets) batches")
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"fit: callbacks must be callables cb(solver, model, record), got {cb!r}")
    _check_optimizer("optimizer", optimizer)
    _check_optimizer("finetune_optimizer", finetune_optimizer)
    if not isinstance(model, nn.Module):
        hint = " (a state_dict? build the model and load it first)" if isinstance(model, dict) else ""
        raise TypeError(f"fit: model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    for name, ld in (("loader", loader), ("val_loader", val_loader)):
        try:
            n_batches = None if ld is None else len(ld)
        except (TypeError, NotImplementedError):  # iterators and iterable datasets have no len
            n_batches = None
        if n_batches == 0:
            raise ValueError(f"fit: {name} is empty (len({name}) == 0); it must yield at least one "
                             f"(inputs, targets) batch")
    for name, fn in fns.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"fit: {name} must be callable, got {fn!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"fit: progress must be a bool or None, got {progress!r}")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"fit: checkpoint must be a file path (str or os.PathLike), got "
                            f"{type(checkpoint).__name__}")
        if os.path.isdir(checkpoint):
            raise ValueError(f"fit: checkpoint={os.fspath(checkpoint)!r} is a directory; give a file path")
        check_writable(checkpoint, "fit: checkpoint")  # a bad folder fails now, not after epoch 1


def _settle_optimizer(compressor: Compressor, optimizer: Any, lr: float) -> Callable:
    """The settle stage's optimizer over the structured parameters: the training optimizer's
    kind and settings (a factory is called again, with the parameter groups; an instance is
    rebuilt from its class and ``defaults``; none: SGD as the compressor's default at ``lr``),
    with the learning rate of each of :meth:`Compressor.settle_lr_groups` (factors) multiplied by
    its multiplier (a function of the optimizer's learning rate is called with it)."""

    def make(model):
        groups = [(ps, scale) for ps, scale in compressor.settle_lr_groups(unwrap(model)) if ps]
        ids = {id(p) for ps, _ in groups for p in ps}
        params = ([{"params": [p for p in model.parameters() if id(p) not in ids]}]
                  + [{"params": list(ps)} for ps, _ in groups]) if groups else model.parameters()
        if optimizer is None:
            base = compressor.default_optimizer(model, lr)
            opt = type(base)(params, **base.defaults) if groups else base  # its kind and settings, the groups
        elif isinstance(optimizer, torch.optim.Optimizer):
            opt = type(optimizer)(params, **optimizer.defaults)
        else:
            opt = optimizer(params)
        if not groups:
            return opt
        def mult(scale, lr):
            return float(scale(lr)) if callable(scale) else float(scale)

        if len(opt.param_groups) != 1 + len(groups):  # a factory that regrouped what it was given: keep it
            lr0 = opt.param_groups[0]["lr"]
            log.warning("fit: the optimizer factory returned %d parameter group(s) for the settle stage's %d "
                        "(other parameters, then factors), so the factors settle at its learning rate instead "
                        "of %s times it (they may diverge); build the optimizer from the iterable it is given",
                        len(opt.param_groups), 1 + len(groups), " / ".join(f"{mult(s, lr0):g}" for _, s in groups))
            return opt
        for g, (_, scale) in zip(opt.param_groups[1:], groups):
            g["lr"] = g["lr"] * mult(scale, g["lr"])
        return opt

    return make


def _continued(make_sched: Callable, opt, steps: int):
    """``make_sched(opt)`` stepped ``steps`` epochs in: the user's schedule continued on a new
    optimizer of the same settings (the learning rate the constrained epochs had reached)."""
    sched = make_sched(opt)
    with warnings.catch_warnings():  # stepping before any optimizer step is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            sched.step()
    return sched


def _finetune_optimizer(compressor: Compressor, optimizer: Any, lr: float) -> Callable:
    if optimizer is None:
        return lambda model: compressor.default_finetune_optimizer(model, lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        return lambda model: optimizer
    return lambda model: optimizer(model.parameters())


def _make_optimizer(compressor: Compressor | None, model: nn.Module, optimizer: Any, lr: float):
    if optimizer is None:
        if compressor is None:
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        return compressor.default_optimizer(model, lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        have = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in have]
        if missing:
            raise ValueError(f"fit: the optimizer does not hold {len(missing)} trainable parameter(s) of "
                             f"the model (e.g. {missing[:3]}); it was probably built before the model "
                             f"was reparameterized — pass a factory `lambda params: SGD(params, ...)`")
        return optimizer
    return optimizer(model.parameters())


# ==================================================================== fit
def fit(compressor: Compressor | None, model: nn.Module, loader: Iterable, epochs: int = 1,
        optimizer: Any = None, loss_fn: Callable | None = None, val_loader: Iterable | None = None,
        finetune_epochs: int = 0, finetune_optimizer: Any = None, device: Any = None,
        callbacks: Sequence[Callable] = (), checkpoint: str | os.PathLike | None = None,
        scheduler: Callable | None = None, progress: bool | None = None, lr: float = 0.05,
        autocast: torch.dtype | None = None, accuracy_fn: Callable | None = None) -> History:
    """Train ``model`` under ``compressor``'s constraints, finalize, and optionally fine-tune.

    Parameters
    ----------
    compressor : Compressor or None
        The method (:class:`~admm_compress.Solver`, a :mod:`~admm_compress.methods` solver);
        ``None`` trains densely (no prepare, no finalize: the same loop as pretraining).
    model : nn.Module
        Trained in place; satisfies the hard constraints on return.
    loader : iterable of (inputs, targets)
    epochs : int
        Constrained training epochs (0 = direct compression: finalize only).  When the compressor
        settles (:meth:`~admm_compress.compressor.Compressor.settle_epochs`; the ADMM
        :class:`~admm_compress.Solver`'s ``settle="auto"`` with ``rho="auto"``), the last
        ``settle_epochs(epochs, len(loader), optimizer)`` of them (all of them when the
        constrained part would be too short to do its work) train the structured weights after
        an early :meth:`~admm_compress.compressor.Compressor.finalize`, with the training optimizer's
        settings; factors (:meth:`~admm_compress.compressor.Compressor.settle_lr_groups`:
        ScaledGD-preconditioned low-rank factors and TT cores at 0.3 of its learning rate, the
        sparse values of ``L + S`` at a tenth) in their own parameter groups (records with
        ``phase="settle"``;
        ``history.final["settle_epochs"]``).
    optimizer : torch.optim.Optimizer or callable, optional
        An optimizer over ``model.parameters()`` or a factory ``params -> optimizer`` (needed
        when ``prepare`` reparameterizes the model, e.g. LoRITa).  Default: the compressor's
        :meth:`~admm_compress.compressor.Compressor.default_optimizer` (SGD(lr, momentum 0.9,
        weight decay 5e-4) unless the method's paper says otherwise).
    loss_fn : callable, default cross entropy
        ``loss_fn(outputs, targets) -> scalar``; ``outputs`` is whatever the model returns
        (a tensor, a tuple with auxiliary logits, a dict such as torchvision segmentation's
        ``{"out", "aux"}``, an HF-style output), so a model with structured outputs trains
        with a ``loss_fn`` that reads them.
    val_loader : iterable, optional
        Evaluated after every epoch, before and after finalize and after fine-tuning.
    finetune_epochs : int
        Epochs of fine-tuning after finalize with the structure kept (factors of the
        constraint are trained, see :mod:`admm_compress.parametrizations`).
    finetune_optimizer : optimizer factory, optional
        Default: the compressor's ``default_finetune_optimizer`` (SGD with ``lr / 10``).
    device : str or torch.device, optional
    callbacks : sequence of callables
        ``cb(compressor, model, record)`` after every epoch; returning ``True`` stops training.
    checkpoint : path, optional
        Written atomically after every epoch (model, optimizer, compressor, RNG states, history);
        if it exists when ``fit`` starts, training resumes from it.  Its folder is created and
        probed for writing before training (an unwritable path raises ``ValueError`` naming it).
    scheduler : callable, optional
        ``optimizer -> LR scheduler`` stepped once per epoch.
    progress : bool, optional
        Progress bar (default: on when stderr is a terminal).
    lr : float
        Learning rate of the default optimizer.
    autocast : torch.bfloat16 or torch.float16, optional
        Mixed precision: forward passes and losses run under :func:`torch.autocast` on the
        training device (``float16`` adds a :class:`torch.amp.GradScaler`).  Weights, Z, U
        and every projection stay in the weights' dtype; SVDs run in float32 or float64.
    accuracy_fn : callable, optional
        ``accuracy_fn(outputs, targets)`` -> number of correct examples of the batch, or
        ``(correct, total)`` (see :func:`admm_compress.training.count_correct`); used for
        ``train_accuracy`` / ``val_accuracy``.  Default: top-1 accuracy when the outputs are
        a logits tensor ``(N, C, *S)`` and the targets class indices ``(N, *S)``; for other
        outputs (dict, tuple, regression) the accuracies are NaN (not measured).
    """
    if compressor is not None and not isinstance(compressor, Compressor):
        raise TypeError(f"fit: compressor must be an admm_compress Compressor (a Solver or a "
                        f"admm_compress.methods solver) or None, got {type(compressor).__name__}")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fit: autocast={autocast!r}; allowed: None, torch.bfloat16, torch.float16")
    epochs = check_int("epochs", epochs, low=0, where="fit")
    finetune_epochs = check_int("finetune_epochs", finetune_epochs, low=0, where="fit")
    lr = check_float("lr", lr, low=0.0, low_open=True, where="fit")
    _check_arguments(model, loader, val_loader, optimizer, finetune_optimizer, callbacks, checkpoint, progress,
                     {"loss_fn": loss_fn, "scheduler": scheduler, "accuracy_fn": accuracy_fn})
    if compressor is None and finetune_epochs:
        raise ValueError("fit: finetune_epochs needs a compressor (dense training has no structure to keep)")
    dev = resolve_device(device, model)
    amp = Amp(autocast, dev.type)
    # an existing checkpoint is read and checked (weights_only) before any work is done
    pending = read_fit(checkpoint, dev) if checkpoint is not None and os.path.exists(checkpoint) else None
    loss_fn = loss_fn or F.cross_entropy
    model.to(dev)
    if compressor is not None:
        before = [id(p) for p in unwrap(model).parameters()]
        compressor.prepare(model)
        if [id(p) for p in unwrap(model).parameters()] != before:
            model = rewrap(model)  # DDP: prepare reparameterized the model (LoRITa, RASPA)
    opt = _make_optimizer(compressor, model, optimizer, lr)
    sched = scheduler(opt) if scheduler is not None else None
    run = _Run(compressor, loss_fn, dev, amp, accuracy_fn, val_loader, progress, callbacks, checkpoint, loader)
    history = History()
    try:
        steps_per_epoch = len(loader)
    except (TypeError, NotImplementedError):  # an iterator
        steps_per_epoch = None
    settle = compressor.settle_epochs(epochs, steps_per_epoch, opt) if compressor is not None else 0
    if settle and settle == epochs:
        log.info("fit: no constrained epochs (%d step(s) per epoch leave the compressor's constrained part too "
                 "short; see its settle_epochs): the final projection now, then %d epoch(s) on the set with the "
                 "training optimizer (settle), then %d fine-tuning epoch(s)", steps_per_epoch or 0, settle,
                 finetune_epochs)
    elif settle:
        log.info("fit: %d ADMM epoch(s), then the final projection and %d epoch(s) on the set with the "
                 "training optimizer (settle), then %d fine-tuning epoch(s)", epochs - settle, settle,
                 finetune_epochs)
    epochs -= settle
    if compressor is not None:
        compressor.on_fit_start(FitContext(model=model, loader=loader, loss_fn=loss_fn, epochs=epochs, optimizer=opt,
                                           device=dev, progress=progress, amp=amp))
    try:
        start_epoch, phase = 0, "train"
        if pending is not None:
            start_epoch, phase, saved = resume_fit(pending, checkpoint, compressor, model, opt, sched, loader)
            history = History.from_dict(saved)
        if phase == "train":
            if run.train(model, opt, sched, history, start_epoch, epochs) and settle:
                log.info("fit: no settle epochs (a callback stopped training)")
                settle = 0  # a callback's stop ends the `epochs`; fine-tuning still runs
            if compressor is None:
                return history
            history.updates = list(compressor.residuals)
            if val_loader is not None:  # the accuracy the final projection starts from
                run.recalibrate(model)
                history.final["before_finalize"] = run.evaluate(model)
            compressor.settle_next = settle  # finalize: an open gap is expected when settle epochs follow
            try:
                feasible = compressor.finalize(model)
            finally:
                compressor.settle_next = 0
            if val_loader is not None or settle + finetune_epochs == 0:  # else fine-tuning ends with its own pass
                run.recalibrate(model)
            history.final["feasible"] = all(feasible.values())
            history.final["projection_distance"] = compressor.projection_distance
            if val_loader is not None:
                history.final["after_finalize"] = run.evaluate(model)
            start_epoch = 0
        if compressor is not None:
            if phase == "finetune":  # resuming: the split the interrupted run used
                settle = int(history.final.get("settle_epochs", 0))
            history.final["settle_epochs"] = settle
        if settle + finetune_epochs > 0:
            stages = [("settle", settle, _settle_optimizer(compressor, optimizer, lr), scheduler, epochs),
                      ("finetune", finetune_epochs, _finetune_optimizer(compressor, finetune_optimizer, lr), None, 0)]
            run.finetune(model, [st for st in stages if st[1] > 0], history, start_epoch if phase == "finetune" else 0)
            run.recalibrate(model)
            if val_loader is not None:
                history.final["after_finetune"] = run.evaluate(model)
        return history
    finally:
        if compressor is not None:
            compressor.on_fit_end(history)


class _Run:
    """The settings of one :func:`fit` call and its epoch loops."""

    def __init__(self, compressor, loss_fn, dev, amp, accuracy_fn, val_loader, progress, callbacks, checkpoint,
                 loader):
        self.c, self.loss_fn, self.dev, self.amp = compressor, loss_fn, dev, amp
        self.accuracy_fn, self.val_loader, self.progress = accuracy_fn, val_loader, progress
        self.callbacks, self.checkpoint, self.loader = tuple(callbacks), checkpoint, loader

    def recalibrate(self, model) -> None:
        """Recompute the BatchNorm running statistics on the training loader when the compressor
        asks for it (ADMM :class:`~admm_compress.Solver`: its penalty shrinks the weights of
        scale-invariant conv -> BN layers during training and the final projection moves them at
        once, so the running averages describe weights that no longer exist).  The loader's and
        torch's RNG states are restored afterwards: the batches training sees do not change."""
        if self.c is None or not self.c.wants_bn_recalibration():
            return
        st = rng_state(self.loader)
        try:
            recalibrate_bn(unwrap(model), self.loader, device=self.dev, amp=self.amp)
        finally:
            set_rng_state(st, self.loader)
        _broadcast_([b for m in unwrap(model).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     for b in (m.running_mean, m.running_var) if b is not None])

    def evaluate(self, model) -> dict:
        ctx = self.c.evaluation_context() if self.c is not None else _null()
        with ctx:
            return evaluate(model, self.val_loader, self.loss_fn, self.dev, accuracy_fn=self.accuracy_fn)

    def _after_epoch(self, model, opt, sched, history, rec, epoch, phase, finalized=None) -> bool:
        history.epochs.append(rec)
        log.info("epoch %d: %s", epoch, {k: v for k, v in rec.items() if k != "phase"})
        stop = any(bool(cb(self.c, model, rec)) for cb in self.callbacks)
        if self.checkpoint is not None:
            if rank() == 0:  # one writer under DDP; every rank resumes from the file
                save_fit(self.checkpoint, self.c, model, opt, sched, self.loader, epoch + 1, phase,
                         history.to_dict(), finalized)
            barrier()
        return stop

    def train(self, model, opt, sched, history, start_epoch, epochs) -> bool:
        """The constrained epochs; returns whether a callback stopped them."""
        from tqdm.auto import tqdm

        desc = "admm" if self.c is not None else "train"
        bar = tqdm(range(start_epoch, epochs), desc=desc, disable=progress_disabled(self.progress),
                   initial=start_epoch, total=epochs, unit="epoch")
        for epoch in bar:
            rec = self.epoch(model, opt, epoch, "train", objective=self.c is not None)
            if sched is not None:
                sched.step()
            bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("loss", "primal", "val_accuracy") if k in rec})
            if self._after_epoch(model, opt, sched, history, rec, epoch, "train"):
                log.info("a callback stopped training after epoch %d", epoch)
                return True
            if self.c is not None and self.c.should_stop(rec):
                break
        return False

    def finetune(self, model, stages, history, start_epoch) -> None:
        """Train the structured weights (:meth:`Compressor.finetune_structure`) through ``stages``
        = ``[(phase, epochs, model -> optimizer, scheduler factory or None, epochs done), ...]``
        (settle, then fine-tuning), each with a fresh optimizer; a stage with a scheduler continues
        it where the constrained epochs left it (``epochs done`` steps in); ``start_epoch``
        counts across the stages (resuming)."""
        from tqdm.auto import tqdm

        c = self.c
        finalized = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if start_epoch > 0:  # resuming: rebuild the same structure from the saved finalized weights
            ck = load_checkpoint(self.checkpoint, map_location=self.dev)
            c.restore_finetune(unwrap(model), ck.get("solver", {}))
            finalized = ck["finalized"]
            unwrap(model).load_state_dict(finalized)
        before = [id(p) for p in unwrap(model).parameters()]
        with c.finetune_structure(unwrap(model)):
            if [id(p) for p in unwrap(model).parameters()] != before:
                model = rewrap(model)  # DDP: the factors are new parameters; a fresh wrapper syncs them
            total = sum(st[1] for st in stages)
            if start_epoch >= total > 0:  # resuming a run whose last epoch was checkpointed: that is the result
                unwrap(model).load_state_dict(ck["model"])
                set_rng_state(ck["rng"], self.loader)
            bar = tqdm(range(start_epoch, total), desc=stages[0][0], initial=start_epoch, total=total,
                       disable=progress_disabled(self.progress), unit="epoch")
            first, opt, sched, stage_end = True, None, None, 0
            bounds = []
            for phase, n, make, make_sched, done in stages:
                bounds.append((stage_end, stage_end + n, phase, make, make_sched, done))
                stage_end += n
            for epoch in bar:
                lo, _, phase, make, make_sched, done = next(b for b in bounds if b[0] <= epoch < b[1])
                if epoch == lo or first:  # a fresh optimizer per stage (its state is restored when resuming)
                    opt = make(model)
                    sched = _continued(make_sched, opt, done + epoch - lo) if make_sched is not None else None
                    if first and start_epoch > 0:
                        unwrap(model).load_state_dict(ck["model"])
                        if epoch > lo:  # the checkpoint is of this stage's optimizer
                            opt.load_state_dict(ck["optimizer"])
                        set_rng_state(ck["rng"], self.loader)
                    bar.set_description(phase)
                    first = False
                rec = self.epoch(model, opt, epoch, phase, objective=c.finetune_objective)
                if sched is not None:
                    sched.step()
                bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("loss", "val_accuracy") if k in rec})
                if self._after_epoch(model, opt, None, history, rec, epoch, "finetune", finalized):
                    break

    def _batch(self, model, x, y, objective: bool):
        if objective:
            return self.c.backward(model, x, y, self.loss_fn, amp=self.amp)
        amp = self.amp
        with amp.autocast():
            out = model(x)
            loss = self.loss_fn(out, y)
        loss = amp.loss(loss)
        amp.backward(loss)
        return loss.detach(), tree_detach(out)

    def epoch(self, model, opt, epoch: int, phase: str, objective: bool) -> dict:
        """One pass over the loader; returns the epoch's record."""
        model.train()
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a different shuffle every epoch
            sampler.set_epoch(epoch)
        dev = self.dev
        t0 = time.perf_counter()
        n = nb = 0
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        counted = torch.zeros((), device=dev, dtype=torch.long)
        for i, batch in enumerate(self.loader):
            x, y = move_batch(batch, dev)
            opt.zero_grad(set_to_none=True)
            try:
                loss, out = self._batch(model, x, y, objective)
            except RuntimeError as e:
                if i == 0 and any(w in str(e) for w in ("shape", "size", "dimension", "channels")):
                    shapes = tuple(getattr(x, "shape", ())), tuple(getattr(y, "shape", ()))
                    raise ValueError(f"fit: the model cannot take the loader's first batch of epoch {epoch} "
                                     f"(inputs {shapes[0]}, targets {shapes[1]}): {e}") from e
                raise
            except TypeError as e:
                if i == 0 and self.loss_fn is F.cross_entropy and "must be Tensor" in str(e):
                    raise TypeError(f"fit: the default loss_fn (cross entropy) needs the model to return a logits "
                                    f"tensor ({e}); for a model returning a dict or tuple pass a loss_fn that "
                                    f"reads it, e.g. loss_fn=lambda out, y: F.cross_entropy(out['out'], y)") from e
                raise
            check_finite_loss(loss, epoch, i)
            self.amp.step(opt)
            if objective:
                self.c.step()
            bs = batch_size(x, y)
            loss_sum += loss * bs
            cc = count_correct(out, y, self.accuracy_fn)  # None: no accuracy for these outputs
            if cc is not None:
                correct += torch.as_tensor(cc[0], device=dev).long()
                counted += torch.as_tensor(cc[1], device=dev).long()
            n += bs
            nb += 1
        if nb == 0:
            raise ValueError(f"fit: the training loader yielded no batch in epoch {epoch}")
        if objective:
            self.c.epoch_end()
        _check_weights_finite(model, epoch)
        rec = {"phase": phase, "epoch": epoch, "loss": float(loss_sum) / n,
               "train_accuracy": accuracy_percent(int(correct), int(counted))}
        if objective:
            rec.update(self.c.epoch_summary())
        if self.val_loader is not None:
            ev = self.evaluate(model)
            rec.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
        rec["wall"] = time.perf_counter() - t0
        return rec


def _null():
    import contextlib

    return contextlib.nullcontext()


def _check_weights_finite(model, epoch):
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"parameter '{name}' became non-finite in epoch {epoch}; the last "
                                 f"checkpoint (if any) is intact")


