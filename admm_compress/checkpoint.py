"""Checkpoints: atomic writes, safe reads, and the format of a :func:`~admm_compress.trainer.fit` run.

Checkpoints are written atomically (a temporary file in the same folder, flushed and fsync'ed,
then :func:`os.replace`), so a process killed while writing never leaves a truncated file in
place of the last good one; they are read with ``torch.load(..., weights_only=True)`` so a file
carrying pickled code is refused instead of executed.

Format ``admm_compress.fit/1`` (:data:`CHECKPOINT_FORMAT`; one file, written after every epoch):
``model``, ``optimizer``, ``solver`` (the compressor's ``state_dict``), ``epoch`` (the next one),
``phase`` ("train" / "finetune"), ``rng``, ``history``, ``residuals``, and ``scheduler`` /
``finalized`` where they exist.  :func:`save_fit` writes it, :func:`read_fit` checks it and
:func:`resume_fit` restores a run from it after checking it fits the model, compressor and
optimizer.  The generic pieces (:func:`save_checkpoint`, :func:`load_checkpoint`,
:func:`rng_state`) are also importable from :mod:`admm_compress.training`, their former home.
"""
from __future__ import annotations

import glob
import logging
import os
import tempfile
from typing import Any, Iterable

import torch

from .specs import unwrap

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "check_writable",
           "rng_state", "set_rng_state", "save_fit", "read_fit", "resume_fit"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "admm_compress.fit/1"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, foreign, unsafe, other model)."""


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


def check_writable(path: str | os.PathLike, what: str = "path") -> None:
    """Create the folder of the file ``path`` and prove a file can be written there.

    Raises ``ValueError`` naming ``path`` (and the OS error) when the folder cannot be created
    (a parent is a file, no permission) or is not writable, or when ``path`` is a folder.
    Called before any training so an unusable output path fails at once, not after hours.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what}={path!r} is a directory; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what}={path!r} cannot be written: folder {folder!r}: {e.strerror or e}") from None


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` with :func:`torch.save` atomically: temp file, fsync, then rename.

    A crash at any point leaves either the previous file or the complete new one.  Temp files are
    named ``.<name>.tmp-*.pt``; those left by a writer of the same path that was killed mid-write
    (a path has one writer: rank 0) are removed after the next successful write.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.tmp-"
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".pt", dir=folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError, naming no path
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        msg = (f"writing checkpoint {path!r} failed ({type(e).__name__}: {e}); the previous checkpoint "
               f"file, if any, is intact")
        if isinstance(e, OSError):  # same class, so callers catching OSError still do
            err = type(e)(msg) if e.errno is None else type(e)(e.errno, msg)
            raise err from e
        raise CheckpointError(msg) from e
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
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


def save_fit(path, compressor, model, opt, sched, loader, next_epoch, phase, history: dict, finalized=None):
    """Write the :data:`CHECKPOINT_FORMAT` checkpoint of a :func:`~admm_compress.trainer.fit` run (atomically)."""
    obj = {"format": CHECKPOINT_FORMAT, "model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
           "solver": compressor.state_dict() if compressor is not None else {}, "epoch": next_epoch,
           "phase": phase, "rng": rng_state(loader), "history": history}
    if sched is not None:
        obj["scheduler"] = sched.state_dict()
    if finalized is not None:
        obj["finalized"] = finalized
    # the full per-update records (with the per-layer entries that state_dict() leaves out), so
    # a resumed run's history equals an uninterrupted one's
    obj["residuals"] = [dict(r) for r in compressor.residuals] if compressor is not None else []
    save_checkpoint(obj, path)


def read_fit(path, map_location) -> dict:
    """Read a :func:`~admm_compress.trainer.fit` checkpoint (``weights_only=True``) and check its
    format, phase and epoch.

    Raises :class:`CheckpointError` for a truncated, unsafe or foreign file.
    """
    ck = load_checkpoint(path, map_location=map_location,
                         required=("format", "model", "optimizer", "solver", "epoch", "phase", "rng"))
    where = f"checkpoint {os.fspath(path)!r}"
    if ck["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} has format {ck['format']!r}; expected {CHECKPOINT_FORMAT!r}")
    if ck["phase"] not in ("train", "finetune"):
        raise CheckpointError(f"{where} has phase={ck['phase']!r}; expected 'train' or 'finetune'")
    ep = ck["epoch"]
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 0:
        raise CheckpointError(f"{where} has epoch={ep!r}; expected an int >= 0")
    for name in ("model", "optimizer", "solver", "rng"):
        if not isinstance(ck[name], dict):
            raise CheckpointError(f"{where}: entry {name!r} is a {type(ck[name]).__name__}, expected a dict")
    if ck["phase"] == "finetune" and not isinstance(ck.get("finalized"), dict):
        raise CheckpointError(f"{where} is a fine-tuning checkpoint without the finalized weights")
    return ck


def resume_fit(ck, path, compressor, model, opt, sched, loader) -> tuple[int, str, dict]:
    """Restore model, optimizer, scheduler, compressor state and RNG states from ``ck``.

    Returns ``(next epoch, phase, history as a dict)``.

    Everything is checked against this model, compressor and optimizer before anything is
    loaded, so a checkpoint of another model or spec raises
    :class:`CheckpointError` and leaves the model's weights alone.
    """
    where = f"checkpoint {os.fspath(path)!r}"
    sd = ck["solver"]
    why = compressor.check_state(sd) if compressor is not None else None
    if why:
        raise CheckpointError(f"{where} {why}")
    if ck["phase"] == "finetune":
        log.info("resuming fine-tuning from %s at epoch %d", path, ck["epoch"])
        return int(ck["epoch"]), "finetune", ck.get("history", {})
    if compressor is not None:
        keys = compressor.state_keys()
        if list(sd.get("keys", [])) != keys:
            raise CheckpointError(f"{where} is from another spec: its solver state constrains "
                                  f"{list(sd.get('keys', []))}, this solver binds {keys}")
    target = unwrap(model)
    own = target.state_dict()
    saved = ck["model"]
    bad = [k for k in own if k not in saved] + [k for k in saved if k not in own]
    bad += [f"{k}: {tuple(getattr(saved[k], 'shape', ()))} vs {tuple(own[k].shape)}" for k in own
            if k in saved and (not isinstance(saved[k], torch.Tensor) or saved[k].shape != own[k].shape)]
    if bad:
        raise CheckpointError(f"{where} is from another model: {len(bad)} mismatching state_dict "
                              f"entries (e.g. {bad[:3]})")
    saved_groups = [len(g.get("params", ())) for g in ck["optimizer"].get("param_groups", [])]
    own_groups = [len(g["params"]) for g in opt.param_groups]
    if saved_groups != own_groups:
        raise CheckpointError(f"{where}: its optimizer state has parameter groups of sizes {saved_groups}, "
                              f"this optimizer has {own_groups} (another optimizer or model?)")
    if compressor is not None:
        try:  # compressor state first: it checks shapes (and subclass fields) and touches no weight
            compressor.load_state_dict(sd)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: the solver state does not fit this solver: {e}") from e
    target.load_state_dict(saved)
    opt.load_state_dict(ck["optimizer"])
    if sched is not None:
        if "scheduler" in ck:
            sched.load_state_dict(ck["scheduler"])
        else:
            log.warning("%s holds no LR scheduler state; the scheduler restarts", where)
    if "residuals" in ck and compressor is not None:
        compressor.residuals = [dict(r) for r in ck["residuals"]]
    set_rng_state(ck["rng"], loader)
    log.info("resumed from %s at epoch %d", path, ck["epoch"])
    return int(ck["epoch"]), "train", ck.get("history", {})
