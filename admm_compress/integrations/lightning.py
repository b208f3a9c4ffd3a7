"""Run any compressor (:class:`admm_compress.Solver`, :mod:`admm_compress.methods`) inside a
``lightning.Trainer``.

The life cycle of :meth:`Solver.fit <admm_compress.Solver.fit>` mapped on Lightning's hooks::

    Lightning hook                      compressor call
    ----------------------------------  ---------------------------------------------------------
    setup(stage="fit")                  solver.prepare(model)   (before configure_optimizers, so
                                        reparameterizing methods such as LoRITa get their factors
                                        into the optimizer)
    training_step (wrapped)             loss + solver.penalty()  (ADMM's rho/2 ||W - Z + U||^2)
    on_train_batch_end                  solver.step() once per optimizer step taken
                                        (trainer.global_step advanced; gradient accumulation safe)
    on_train_epoch_end                  solver.epoch_end()       (Z/U update when every="epoch")
    on_fit_end                          solver.finalize(model)   (W = Pi(W): hard constraints hold)
    state_dict / load_state_dict        solver.state_dict()      (Z, U, rho, counters) inside
                                        Lightning's checkpoint: ``fit(ckpt_path=...)`` resumes

The penalty is added to the loss returned by ``training_step`` (a tensor, or the ``"loss"``
entry of a dict) by wrapping the module's ``training_step`` for the duration of ``fit``
(``add_penalty=True``, the default).  With ``add_penalty=False`` the module adds it itself::

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x), y) + self.compression.penalty()

Usage::

    import lightning as L
    from admm_compress.integrations.lightning import CompressionCallback

    cb = CompressionCallback(ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(ratio=0.3))], rho=0.1),
                             module="net")      # prepare on lit_module.net (names as in the spec)
    L.Trainer(max_epochs=10, callbacks=[cb]).fit(lit_module, train_loader)
    compact = cb.export()                       # ac.export of the finalized model

Methods whose gradient is not ``d(loss + penalty)/dW`` (Decomposable-Net's two-pass joint loss)
cannot be expressed through automatic optimization; with them the callback raises at setup and
the module should call ``cb.solver.backward(model, x, y, loss_fn)`` itself under
``automatic_optimization = False``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("admm_compress.integrations.lightning needs Lightning: "
                          "pip install 'admm-compress[lightning]'") from e

from ..compressor import Compressor

__all__ = ["CompressionCallback"]

log = logging.getLogger(__name__)


def _plain_backward(solver: Compressor) -> bool:
    """Whether the solver's gradient is that of ``loss + penalty()`` (what automatic optimization computes)."""
    return bool(getattr(solver, "plain_gradient", True))


class CompressionCallback(Callback):
    """A Lightning callback running ``solver`` during ``Trainer.fit``.

    Parameters
    ----------
    solver : admm_compress.Solver
        Any compressor: ``ac.Solver(spec, ...)`` or one from :mod:`admm_compress.methods`.
    module : str, optional
        Attribute of the LightningModule holding the network the spec refers to (e.g. ``"net"``);
        default: the LightningModule itself (spec names then start with its attribute names).
    add_penalty : bool
        Add ``solver.penalty()`` to the loss ``training_step`` returns (see the module docstring).
    finalize : bool
        Call ``solver.finalize(model)`` at the end of ``fit`` (hard constraints hold afterwards).
    """

    def __init__(self, solver: Compressor, module: str | None = None, add_penalty: bool = True,
                 finalize: bool = True):
        super().__init__()
        if not isinstance(solver, Compressor):
            raise TypeError(f"CompressionCallback: solver must be an admm_compress.Solver (or a method from "
                            f"admm_compress.methods), got {type(solver).__name__}")
        if module is not None and (not isinstance(module, str) or not module):
            raise TypeError(f"CompressionCallback: module must be a non-empty attribute name or None, got {module!r}")
        for name, val in (("add_penalty", add_penalty), ("finalize", finalize)):
            if not isinstance(val, bool):
                raise TypeError(f"CompressionCallback: {name} must be a bool, got {val!r}")
        self.solver = solver
        self.module = module
        self.add_penalty = add_penalty
        self.do_finalize = finalize
        self.feasible: dict[str, bool] | None = None
        self._model: nn.Module | None = None
        self._last_step: int | None = None
        self._wrapped: tuple[Any, Any] | None = None

    # -------------------------------------------------------------------------- helpers
    @property
    def state_key(self) -> str:
        return f"CompressionCallback[{type(self.solver).__name__}, module={self.module}]"

    def model_of(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        net = getattr(pl_module, self.module, None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"CompressionCallback: the LightningModule has no sub-module {self.module!r} "
                             f"(module= names the attribute holding the network)")
        return net

    def penalty(self) -> torch.Tensor:
        """``solver.penalty()``: add it to the loss yourself when ``add_penalty=False``."""
        return self.solver.penalty()

    def export(self, **kw) -> nn.Module:
        """``solver.export(model)``: the compact model (call after ``fit``)."""
        if self._model is None:
            raise RuntimeError("CompressionCallback.export: no model yet; run trainer.fit first")
        return self.solver.export(self._model, **kw)

    # ---------------------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        model = self.model_of(pl_module)
        if getattr(pl_module, "automatic_optimization", True) and not _plain_backward(self.solver):
            raise ValueError(f"CompressionCallback: {type(self.solver).__name__} computes its own gradient "
                             f"(solver.backward); under automatic optimization Lightning would compute "
                             f"d(loss + penalty)/dW instead. Set automatic_optimization = False and call "
                             f"solver.backward(model, x, y, loss_fn) in training_step")
        if self._model is not model or not self.solver.prepared:
            self.solver.prepare(model)
            self._model = model
        if self.add_penalty and getattr(pl_module, "automatic_optimization", True) and self._wrapped is None:
            original = pl_module.training_step
            solver = self.solver

            def training_step(*args, **kwargs):
                out = original(*args, **kwargs)
                if isinstance(out, torch.Tensor):
                    return out + solver.penalty()
                if isinstance(out, Mapping) and "loss" in out:
                    out = dict(out)
                    out["loss"] = out["loss"] + solver.penalty()
                return out

            pl_module.training_step = training_step
            self._wrapped = (pl_module, original)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._wrapped is not None and self._wrapped[0] is pl_module:
            if "training_step" in pl_module.__dict__:
                del pl_module.__dict__["training_step"]  # back to the class's method
            self._wrapped = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._last_step is None:
            self._last_step = trainer.global_step
        while self._last_step < trainer.global_step:  # one solver.step() per optimizer step taken
            self.solver.step()
            self._last_step += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.solver.epoch_end()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.do_finalize:
            self.feasible = self.solver.finalize(self.model_of(pl_module))
            log.info("finalized %d constrained weight(s): %d feasible", len(self.feasible),
                     sum(self.feasible.values()))

    # -------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        return {"solver": self.solver.state_dict()} if self.solver.prepared else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "solver" in state_dict:
            self.solver.load_state_dict(state_dict["solver"])
