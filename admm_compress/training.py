"""Small pieces of an ordinary PyTorch training loop: devices, batches, evaluation, mixed precision,
BatchNorm recalibration.

The atomic checkpoint functions live in :mod:`admm_compress.checkpoint`; they are importable from
here too (the same objects), where they used to be defined.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ._validation import check_int
from .checkpoint import (CheckpointError, check_writable, load_checkpoint, rng_state,  # noqa: F401
                         save_checkpoint, set_rng_state)

__all__ = [
    "resolve_device",
    "evaluate",
    "save_checkpoint",
    "check_writable",
    "load_checkpoint",
    "CheckpointError",
    "NonFiniteError",
    "rng_state",
    "set_rng_state",
    "move_batch",
    "tree_detach",
    "batch_size",
    "count_correct",
    "Amp",
    "recalibrate_bn",
]

log = logging.getLogger(__name__)


class Amp:
    """Mixed precision of one training run: autocast context, loss dtype, loss scaling.

    ``Amp(None)`` is plain float training (every method is a pass-through).  ``Amp(torch.bfloat16)``
    runs forward passes and losses under :func:`torch.autocast` on ``device_type``;
    ``Amp(torch.float16)`` adds a :class:`torch.amp.GradScaler` (``scaler="auto"``; pass a scaler
of your own, or ``None`` for none).  The
    loss is returned in float32 so a penalty added to it is not rounded to half precision.
    Compressors receive it in ``backward(..., amp=)``; the trainer owns it.
    """

    def __init__(self, dtype: torch.dtype | None = None, device_type: str = "cpu", scaler: Any = "auto"):
        if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"fit: autocast={dtype!r}; allowed: None, torch.bfloat16, torch.float16")
        self.dtype = dtype
        self.device_type = device_type
        if isinstance(scaler, str) and scaler == "auto":  # float16 needs loss scaling; the others do not
            scaler = torch.amp.GradScaler(device_type) if dtype is torch.float16 else None
        self.scaler = scaler

    def autocast(self):
        """``torch.autocast`` for the forward pass, or a no-op context."""
        import contextlib

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss in float32 under autocast, as is otherwise."""
        return loss.float() if self.dtype is not None else loss

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the GradScaler's scale (as is without one)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the GradScaler under float16."""
        self.scale(loss).backward()

    def step(self, optimizer) -> None:
        """``optimizer.step()`` (``scaler.step`` + ``scaler.update`` under float16)."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def __repr__(self) -> str:
        return f"Amp({self.dtype}, {self.device_type!r}, scaler={self.scaler is not None})"


class NonFiniteError(FloatingPointError):
    """The loss or a weight became NaN or infinite during training."""


def resolve_device(device: Any = None, model: nn.Module | None = None) -> torch.device:
    """The device to train on: ``device`` if given (validated), else the model's, else CPU.

    Raises ``ValueError`` for an unknown device string and ``RuntimeError`` when CUDA is asked
    for on a machine without it.
    """
    if device is None:
        if model is not None:
            for p in model.parameters():
                return p.device
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} was asked for, but CUDA is not available on this "
                               f"machine (torch {torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def _to(obj: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) structure on ``device``; other leaves as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, obj)


def move_batch(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """Split a loader batch into ``(inputs, targets)`` on ``device``.

    Inputs and targets are usually tensors; nested lists / tuples / dicts of tensors (e.g.
    per-image target dicts) are moved leaf by leaf.
    """
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(f"each batch of the loader must be (inputs, targets), got {type(batch).__name__}"
                         + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""))
    return _to(batch[0], device), _to(batch[1], device)


def tree_detach(obj: Any) -> Any:
    """``obj`` with every tensor detached, whatever its structure.

    Models return a tensor, a tuple (auxiliary logits), a dict (torchvision segmentation's
    ``{"out", "aux"}``) or any :mod:`torch.utils._pytree` container (HF-style ``ModelOutput``
    is registered there by ``transformers``); leaves that are not tensors are kept as they are.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, obj)


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    from torch.utils import _pytree as pytree

    for leaf in pytree.tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def batch_size(inputs: Any, targets: Any) -> int:
    """Examples in a batch: the leading dimension of the targets (or of the inputs).

    The first tensor leaf with at least one dimension decides; a target that is a list (one
    entry per example, e.g. detection target dicts) counts its length.
    """
    if isinstance(targets, list) and targets and not isinstance(targets[0], torch.Tensor):
        return len(targets)
    for obj in (targets, inputs):
        t = _first_tensor(obj)
        if t is not None and t.dim() >= 1:
            return int(t.shape[0])
    return 1


def count_correct(outputs: Any, targets: Any, accuracy_fn: Callable | None = None):
    """``(correct, total)`` of one batch for the top-1 accuracy, or ``None`` when not defined.

    Default: when ``outputs`` is a tensor of logits ``(N, C, *S)`` and ``targets`` an integer
    tensor of class indices ``(N, *S)`` (classification ``S = ()``, segmentation ``S = (H, W)``),
    the entries with ``argmax_C(outputs) == targets`` among those whose target is a valid class
    ``0 <= t < C`` (so an ``ignore_index`` such as 255 or -100 is not counted).  Anything else
    (a dict or tuple of outputs, regression targets) has no default accuracy: ``None``.

    ``accuracy_fn(outputs, targets)`` replaces the default; it returns the number of correct
    examples of the batch (counted against :func:`batch_size`) or a pair ``(correct, total)``
    (e.g. pixels), as Python numbers or 0-d tensors, or ``None`` to skip the batch.
    Returned values may be device tensors (no host sync per batch).
    """
    if accuracy_fn is not None:
        r = accuracy_fn(outputs, targets)
        if r is None:
            return None
        if isinstance(r, (tuple, list)):
            if len(r) != 2:
                raise ValueError(f"accuracy_fn must return correct or (correct, total), got a "
                                 f"{type(r).__name__} of length {len(r)}")
            return r[0], r[1]
        return r, batch_size(None, targets)
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return None
    if (outputs.dim() < 2 or targets.dim() != outputs.dim() - 1 or targets.is_floating_point()
            or targets.is_complex() or targets.dtype == torch.bool
            or targets.shape[0] != outputs.shape[0] or tuple(targets.shape[1:]) != tuple(outputs.shape[2:])):
        return None
    valid = (targets >= 0) & (targets < outputs.shape[1])
    correct = ((outputs.argmax(1) == targets) & valid).sum()
    return correct, valid.sum()


def accuracy_percent(correct, total) -> float:
    """``100 * correct / total`` as a float; NaN when nothing was counted (accuracy not defined)."""
    total = float(total)
    return 100.0 * float(correct) / total if total > 0 else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable | None = None,
             device: Any = None, max_batches: int | None = None,
             accuracy_fn: Callable | None = None) -> dict[str, float]:
    """Mean loss and top-1 accuracy (in %) of ``model`` on ``loader`` in eval mode.

    ``loss_fn(outputs, targets)`` receives the model's outputs as they are (a tensor, tuple,
    dict, ...).  The accuracy is that of :func:`count_correct` (``accuracy_fn`` replaces the
    default); it is NaN when it is not defined for these outputs (e.g. a dict of outputs and no
    ``accuracy_fn``).  The model's train/eval mode is restored afterwards.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    if accuracy_fn is not None and not callable(accuracy_fn):
        raise TypeError(f"evaluate: accuracy_fn must be callable, got {accuracy_fn!r}")
    dev = resolve_device(device, model)
    was_training = model.training
    model.eval()
    total, loss_sum = 0, 0.0
    correct = counted = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = move_batch(batch, dev)
            out = model(x)
            n = batch_size(x, y)
            loss_sum += float(loss_fn(out, y, reduction="sum")) if _accepts_reduction(loss_fn) \
                else float(loss_fn(out, y)) * n
            cc = count_correct(out, y, accuracy_fn)
            if cc is not None:
                correct += cc[0]
                counted += cc[1]
            total += n
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no batch")
    return {"loss": loss_sum / total, "accuracy": accuracy_percent(correct, counted), "n": total}


def _accepts_reduction(fn: Callable) -> bool:
    return fn in (nn.functional.cross_entropy, nn.functional.mse_loss, nn.functional.nll_loss)


def check_finite_loss(loss: torch.Tensor, epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteError` if ``loss`` is NaN or infinite."""
    v = float(loss.detach())
    if not math.isfinite(v):
        raise NonFiniteError(f"the training loss became {v} at epoch {epoch}, step {step}; "
                             f"lower the learning rate or rho. The last checkpoint (if any) is intact.")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int | None = 20, device: Any = None,
                   amp: "Amp | None" = None) -> int:
    r"""Recompute the running statistics of every BatchNorm of ``model`` on ``loader``.

    Each BN (with ``track_running_stats``) is reset and set to a cumulative average
    (``momentum=None``), then ``batches`` batches are forwarded with the BNs in train mode and
    every other module in eval mode (no dropout); afterwards :math:`\mu` is the mean of the batch
    means and :math:`\sigma^2` the mean of the (unbiased) batch variances.  Modes and momenta
    are restored.  Used after every change of the weights that the running statistics did not
    see: Decomposable-Net's per-size export (footnote 1 / US-Nets: statistics computed per size
    after training) and the ADMM solver's final projection.

    Parameters
    ----------
    model : nn.Module
        Modified in place (running statistics only).
    loader : iterable of batches
        ``(inputs, targets)`` pairs or bare input tensors (training data, no augmentation needed).
    batches : int >= 1 or None
        At most this many batches (``None``: the whole loader).
    device : optional
        Where to run (default: the model's device).
    amp : Amp, optional
        Run the forward passes under this mixed-precision setting (as training did).

    Returns
    -------
    int
        Number of batches used (0 when the model has no tracked BatchNorm; nothing is run then).
    """
    if batches is not None:
        batches = check_int("bn_batches", batches, low=1, where="recalibrate_bn")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        log.info("recalibrate_bn: %s has no BatchNorm with running statistics; nothing to do",
                 type(model).__name__)
        return 0
    dev = resolve_device(device, model)
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    n = 0
    try:
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                x, _ = move_batch(batch, dev)
            elif isinstance(batch, torch.Tensor):
                x = batch.to(dev)
            else:
                raise TypeError(f"recalibrate_bn: batches must be tensors or (inputs, targets) pairs, "
                                f"got {type(batch).__name__}")
            if amp is not None:
                with amp.autocast():
                    _call_model(model, x)
            else:
                _call_model(model, x)
            n += 1
            if batches is not None and n >= batches:
                break  # before fetching another batch (a loader may load or augment on fetch)
    finally:
        for m, t in modes.items():
            m.training = t
        for bn, mom in momenta.items():
            bn.momentum = mom
    if n == 0:
        raise ValueError("recalibrate_bn: bn_loader yielded no batch")
    log.info("recalibrated %d BatchNorm layer(s) on %d batch(es)", len(bns), n)
    return n


def _call_model(model: nn.Module, x) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple of inputs, ``model(**x)`` for a dict."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)
