"""The life cycle every compression method implements, and the hooks the trainer calls.

A *compressor* is what :func:`admm_compress.trainer.fit` drives (the life cycle of
:mod:`torch.ao.pruning`'s sparsifiers; the formulation/optimizer split of cooper):

===========================  =============================================================
``prepare(model)``           resolve the spec on the model (refusals raise here, before any
                             training), set up auxiliary state, reparameterize if needed
``penalty()``                added to the task loss by the default :meth:`Compressor.backward`
``backward(model, x, y,      one batch's forward + backward (a method whose objective is not
loss_fn, amp)``              ``loss + penalty`` -- Decomposable-Net's joint loss -- overrides it)
``step()``                   after every optimizer step (ADMM's Z/U update every ``K`` steps)
``epoch_end()``              after every epoch
``finalize(model)``          make the weights exactly satisfy the constraints
``export_spec(**size)``      the :class:`~admm_compress.Constrain` list :func:`admm_compress.export`
                             builds compact layers from
``state_dict()`` /           everything needed to resume (the trainer stores it in its
``load_state_dict(sd)``      checkpoints under ``"solver"``)
===========================  =============================================================

The trainer's hooks (:meth:`Compressor.default_optimizer`, :meth:`Compressor.on_fit_start`,
:meth:`Compressor.finetune_structure`, ...) have defaults here; a method overrides the public
hooks it needs and never a private method of another class.  The implementations:
:class:`~admm_compress.Solver` (ADMM or projected SGD; LRPET, TRP and RASPA configure it),
:class:`~admm_compress.methods.LoRITaSolver` and
:class:`~admm_compress.methods.DecomposableNetSolver`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

from .specs import Binding, Constrain, _as_list, describe, resolve, unwrap

__all__ = ["Compressor", "FitContext"]

log = logging.getLogger(__name__)


class FitContext:
    """What :func:`admm_compress.trainer.fit` tells :meth:`Compressor.on_fit_start` about the run.

    Attributes: ``model`` (as trained, possibly a DDP wrapper), ``loader``, ``loss_fn``, ``epochs``
    (constrained epochs), ``optimizer``, ``device``, ``progress`` (bar setting), ``amp``
    (:class:`~admm_compress.training.Amp`).
    """

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)

    def __repr__(self) -> str:
        return f"FitContext({', '.join(sorted(self.__dict__))})"


class Compressor:
    """Base class of the compression methods (see the module docstring for the life cycle).

    Holds what every method shares: the spec, the :class:`~admm_compress.specs.Binding` list
    :meth:`prepare` resolved, the step/epoch/update counters and the per-update records
    (``residuals``) the trainer copies into ``History.updates``.

    Class attributes
    ----------------
    plain_gradient : bool
        Whether :meth:`backward` computes the gradient of ``loss + penalty()``.
    finetune_objective : bool
        ``False`` (default): fine-tuning after :meth:`finalize` trains the plain task loss with
        the structure kept (:meth:`finetune_structure`).  ``True``: fine-tuning epochs keep
        running this compressor's :meth:`backward` / :meth:`step` / :meth:`epoch_end`
        (Decomposable-Net, whose model stays full-rank and exportable at any size).
    """

    finetune_objective: bool = False
    #: Whether :meth:`backward`'s gradient is that of ``loss + penalty()`` (so a framework's own
    #: automatic optimization, e.g. Lightning's, computes the same step); ``False`` for a method
    #: that combines gradients itself (Decomposable-Net's Eq. 12).
    plain_gradient: bool = True

    def __init__(self, spec):
        self.spec: list[Constrain] = _as_list(spec)
        self.bindings: list[Binding] = []
        self.steps = 0
        self.epochs_done = 0
        self.n_updates = 0
        self.residuals: list[dict] = []
        #: ``||W - Pi(W)|| / ||W||`` of the last :meth:`finalize` (``None``: nothing projected)
        self.projection_distance: float | None = None
        #: keyword defaults of :meth:`fit` a preset sets (e.g. ``lorita_paper``'s lr); the caller's win
        self.fit_defaults: dict[str, Any] = {}
        self._model_ref: nn.Module | None = None

    # ------------------------------------------------------------ life cycle
    @property
    def prepared(self) -> bool:
        """Whether :meth:`prepare` has bound the spec to a model."""
        return bool(self.bindings)

    def _require_prepared(self) -> None:
        if not self.bindings:
            raise RuntimeError(f"{type(self).__name__} is not prepared: "
                               "call solver.prepare(model) (or solver.fit) first")

    def prepare(self, model: nn.Module) -> "Compressor":
        """Resolve the spec on ``model`` (raises before touching it if any spec cannot be applied)."""
        self.bindings = resolve(self.spec, model, warn=True)
        self._model_ref = unwrap(model)
        self.steps = self.epochs_done = self.n_updates = 0
        self.residuals = []
        return self

    def _check_model(self, model: nn.Module | None) -> nn.Module:
        """The prepared model (``model`` must be it, or ``None``)."""
        if model is not None and unwrap(model) is not self._model_ref:
            raise ValueError("finalize(model): this is not the model the solver was prepared on")
        return self._model_ref

    def penalty(self) -> torch.Tensor:
        """Term added to the task loss (default 0); differentiable in the weights."""
        self._require_prepared()
        p = next(self._model_ref.parameters())
        return torch.zeros((), device=p.device, dtype=p.dtype)

    def backward(self, model: nn.Module, inputs: Any, targets: Any, loss_fn,
                 amp=None) -> tuple[torch.Tensor, Any]:
        """Forward and backward of one batch; returns ``(loss, outputs)``, detached.

        Default: ``loss_fn(model(x), y) + penalty()`` under ``amp``'s autocast
        (:class:`~admm_compress.training.Amp`; ``None`` = plain precision).
        """
        from .training import Amp, tree_detach

        amp = amp if amp is not None else Amp(None)
        with amp.autocast():
            out = model(inputs)
            loss = loss_fn(out, targets)
        loss = amp.loss(loss) + self.penalty()
        amp.backward(loss)
        return loss.detach(), tree_detach(out)

    def step(self) -> bool:
        """Call after every optimizer step; returns whether an update ran (default: counts only)."""
        self._require_prepared()
        self.steps += 1
        return False

    def epoch_end(self) -> bool:
        """Call at the end of every epoch; returns whether an update ran (default: counts only)."""
        self._require_prepared()
        self.epochs_done += 1
        return False

    def finalize(self, model: nn.Module | None = None) -> dict[str, bool]:
        """Make the constraints hold exactly; returns ``{weight key: feasible}`` (default: nothing to do)."""
        self._require_prepared()
        self._check_model(model)
        return {b.key: True for b in self.bindings}

    # ------------------------------------------------------------------ export
    def export_spec(self) -> list[Constrain]:
        """The specs :func:`admm_compress.export` builds compact layers from (default: :attr:`spec`)."""
        return list(self.spec)

    def export(self, model: nn.Module, inplace: bool = False) -> nn.Module:
        """:func:`admm_compress.export` of the finalized ``model`` with :meth:`export_spec`."""
        from .export import export

        return export(model, self.export_spec(), inplace=inplace)

    def describe(self) -> str:
        """Table of the bound weights (layer, shape, view, constraint, dense and compressed size)."""
        text = describe(self.bindings) if self.bindings else "(not prepared)"
        skipped = getattr(self.bindings, "skipped", None)
        if skipped:
            text += "\nleft unconstrained (export could not compress them):\n" + "\n".join(
                f"  {n}: {why}" for n, why in skipped)
        return text

    def repr_fields(self) -> str:
        return f"specs={len(self.spec)}"

    def __repr__(self) -> str:
        state = f", prepared on {len(self.bindings)} weight(s)" if getattr(self, "bindings", None) else ""
        return f"{type(self).__name__}({self.repr_fields()}{state})"

    # ------------------------------------------------------------------- state
    def state_keys(self) -> list[str]:
        """The keys of the state this compressor keeps per weight (checked on resume)."""
        return [b.key for b in self.bindings]

    def state_dict(self) -> dict:
        """Counters, per-update records and :meth:`state_keys`: everything needed to resume."""
        return {"keys": self.state_keys(), "steps": self.steps, "epochs_done": self.epochs_done,
                "n_updates": self.n_updates,
                "residuals": [{k: v for k, v in r.items() if k != "layers"} for r in self.residuals]}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` (after :meth:`prepare` on the same architecture).

        Checks before changing anything: a state that does not fit raises ``TypeError`` /
        ``ValueError`` and leaves the compressor as it was.
        """
        self._require_prepared()
        if not isinstance(sd, dict):
            raise TypeError(f"load_state_dict: sd must be a dict from {type(self).__name__}.state_dict(), "
                            f"got {type(sd).__name__}")
        missing = [k for k in ("steps", "epochs_done", "n_updates", "keys") if k not in sd]
        if missing:
            raise ValueError(f"load_state_dict: sd lacks {missing}; it is not a {type(self).__name__}.state_dict()")
        keys = self.state_keys()
        if list(sd["keys"]) != keys:
            raise ValueError(f"solver state is for weights {list(sd['keys'])}, but this solver binds {keys}")
        self.steps, self.epochs_done, self.n_updates = int(sd["steps"]), int(sd["epochs_done"]), int(sd["n_updates"])
        self.residuals = list(sd.get("residuals", []))

    def check_state(self, sd: dict) -> str | None:
        """Why a checkpoint's compressor state ``sd`` cannot be resumed by this compressor, or ``None``.

        Checked by the trainer before anything is loaded, in both the training and the
        fine-tuning phase (``Solver``: the ``mode``).
        """
        return None

    # ----------------------------------------------------------- trainer hooks
    def fit(self, model: nn.Module, loader, epochs: int = 1, **kwargs):
        """Train ``model`` under the constraints, finalize, optionally fine-tune.

        The convenient entry: :func:`admm_compress.trainer.fit` with this compressor (see there
        for every keyword); the preset's :attr:`fit_defaults` fill the keywords not given.
        """
        from .trainer import fit

        for k, v in self.fit_defaults.items():
            kwargs.setdefault(k, v)
        return fit(self, model, loader, epochs=epochs, **kwargs)

    def default_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """Optimizer of the constrained phase when ``fit`` gets none: SGD(lr, momentum 0.9, wd 5e-4)."""
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def default_finetune_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """Optimizer of fine-tuning when ``fit`` gets none: SGD(lr / 10, momentum 0.9, wd 5e-4)."""
        return torch.optim.SGD(model.parameters(), lr=lr / 10, momentum=0.9, weight_decay=5e-4)

    #: Set by :func:`~admm_compress.trainer.fit` around :meth:`finalize`: the settle epochs that
    #: follow it (the ADMM :class:`~admm_compress.Solver` then logs an open gap at INFO, not WARNING).
    settle_next: int = 0

    def settle_epochs(self, epochs: int, steps_per_epoch: int | None = None, optimizer=None) -> int:
        """How many of :func:`~admm_compress.trainer.fit`'s ``epochs`` train the structured
        weights at the training learning rate after an early :meth:`finalize` (default 0: all
        ``epochs`` are constrained training; ADMM :class:`~admm_compress.Solver`: its ``settle``).
        ``fit`` passes the loader's length and the training optimizer (``None`` when unknown)."""
        return 0

    #: Learning-rate multiplier of :meth:`slow_settle_parameters` in the settle epochs.
    slow_settle_lr_scale: float = 0.1

    def slow_settle_parameters(self, model: nn.Module) -> list:
        """Parameters the settle epochs train at :attr:`slow_settle_lr_scale` times the learning
        rate (default: none; the ADMM :class:`~admm_compress.Solver`: the factors of low-rank /
        TT weights, whose steps move the weight by up to ``2 sigma_1`` times a dense step)."""
        return []

    def settle_lr_groups(self, model: nn.Module) -> list[tuple[list, Any]]:
        """``[(parameters, learning-rate multiplier), ...]``: the parameters the settle epochs
        train at their own multiple of the learning rate, one optimizer parameter group each
        after the group of all other parameters (default: :meth:`slow_settle_parameters` at
        :attr:`slow_settle_lr_scale`, when there are any).  A multiplier is a number or a
        function of the learning rate the settle optimizer is built with."""
        slow = self.slow_settle_parameters(model)
        return [(slow, self.slow_settle_lr_scale)] if slow else []

    def on_fit_start(self, run: FitContext) -> None:
        """Called by the trainer after :meth:`prepare` and the optimizer are set up (default: nothing)."""

    def on_fit_end(self, history) -> None:
        """Called by the trainer when ``fit`` returns or raises (default: nothing)."""

    def wants_bn_recalibration(self) -> bool:
        """Whether the trainer recomputes the BatchNorm running statistics on the training data
        around :meth:`finalize` and after fine-tuning (default: False; ADMM :class:`Solver`: True)."""
        return False

    def evaluation_context(self) -> contextlib.AbstractContextManager:
        """Context the trainer evaluates the model in (LoRITa: one factor product per layer)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def finetune_structure(self, model: nn.Module) -> Iterator[None]:
        """Keep the constraints' structure during fine-tuning: the factors of every hard-constrained
        weight are trained (:func:`admm_compress.parametrizations.structure`), then released to
        dense structured weights."""
        from .parametrizations import release, structure

        structure(self.bindings)
        try:
            yield
        finally:
            release(self.bindings)

    def restore_finetune(self, model: nn.Module, state: dict) -> None:
        """Before resuming a fine-tuning checkpoint: rebuild what :meth:`finalize` changed beyond
        the weights (LoRITa's truncated ranks) from the saved compressor ``state`` (default: nothing)."""

    def epoch_summary(self) -> dict:
        """Entries added to the trainer's per-epoch record (``Solver``: the last residuals)."""
        return {}

    def should_stop(self, record: dict) -> bool:
        """Whether training may stop after the epoch of ``record`` (``Solver``: ``tol`` reached)."""
        return False
