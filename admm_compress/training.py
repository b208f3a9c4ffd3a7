"""Small pieces of an ordinary PyTorch training loop: devices, evaluation, atomic checkpoints.

Checkpoints are written atomically (a temporary file in the same folder, flushed and fsync'ed,
then :func:`os.replace`), so a process killed while writing never leaves a truncated file in
place of the last good one; they are read with ``torch.load(..., weights_only=True)`` so a file
carrying pickled code is refused instead of executed.
"""
from __future__ import annotations

import logging
import glob
import math
import os
import tempfile
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = [
    "resolve_device",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "NonFiniteError",
    "rng_state",
    "set_rng_state",
    "move_batch",
]

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, foreign, unsafe, other model)."""


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


def move_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a loader batch into ``(inputs, targets)`` on ``device``."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(f"each batch of the loader must be (inputs, targets), got {type(batch).__name__}"
                         + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""))
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable | None = None,
             device: Any = None, max_batches: int | None = None) -> dict[str, float]:
    """Mean loss and top-1 accuracy (in %) of ``model`` on ``loader`` in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    dev = resolve_device(device, model)
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = move_batch(batch, dev)
            out = model(x)
            loss_sum += float(loss_fn(out, y, reduction="sum")) if _accepts_reduction(loss_fn) \
                else float(loss_fn(out, y)) * y.shape[0]
            if out.dim() == 2 and y.dim() == 1:
                correct += int((out.argmax(1) == y).sum())
            total += y.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no batch")
    return {"loss": loss_sum / total, "accuracy": 100.0 * correct / total, "n": total}


def _accepts_reduction(fn: Callable) -> bool:
    return fn in (nn.functional.cross_entropy, nn.functional.mse_loss, nn.functional.nll_loss)


def rng_state(loader: Any = None) -> dict[str, torch.Tensor]:
    """The RNG states a resumed run needs to see the same data order and dropout masks."""
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        st["loader"] = gen.get_state()
    sampler_gen = getattr(getattr(loader, "sampler", None), "generator", None)
    if isinstance(sampler_gen, torch.Generator) and sampler_gen is not gen:
        st["sampler"] = sampler_gen.get_state()
    return st


def set_rng_state(st: dict[str, torch.Tensor], loader: Any = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda"]))
    gen = getattr(loader, "generator", None)
    if "loader" in st and isinstance(gen, torch.Generator):
        gen.set_state(st["loader"])
    sampler_gen = getattr(getattr(loader, "sampler", None), "generator", None)
    if "sampler" in st and isinstance(sampler_gen, torch.Generator):
        sampler_gen.set_state(st["sampler"])


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` with :func:`torch.save` atomically: temp file, fsync, then rename.

    A crash at any point leaves either the previous file or the complete new one.  Temp files are
    named ``.<name>.tmp-*.pt``; those left by a writer of the same path that was killed mid-write
    (a path has one writer: rank 0) are removed after the next successful write.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.pt")):
        try:
            os.unlink(stale)
            log.info("removed %s, left by an interrupted checkpoint write", stale)
        except OSError:
            pass


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    required: Iterable[str] = ()) -> dict:
    """Read a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` if unusable."""
    path = os.fspath(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"checkpoint {path!r} cannot be read safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated, not a "
                              f"torch.save file, or carries objects other than tensors and "
                              f"plain containers") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}; it was not written by "
                              f"admm_compress.Solver.fit")
    return obj


def check_finite_loss(loss: torch.Tensor, epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteError` if ``loss`` is NaN or infinite."""
    v = float(loss.detach())
    if not math.isfinite(v):
        raise NonFiniteError(f"the training loss became {v} at epoch {epoch}, step {step}; "
                             f"lower the learning rate or rho. The last checkpoint (if any) is intact.")
