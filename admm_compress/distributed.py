"""``torch.distributed`` helpers shared by the compressors and the trainer.

Every helper is a no-op in one process (no initialized process group), so single-process code
calls them unconditionally.  The Z-/U-steps and hard projections are computed on every rank and
then :func:`broadcast_` overwrites them with rank 0's values, so all ranks hold bit-identical
weights even where SVDs are not deterministic across processes (tests/test_distributed.py).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["world_size", "rank", "broadcast_", "barrier", "rewrap", "progress_disabled"]


def world_size() -> int:
    """Processes of the default ``torch.distributed`` group (1 when not initialized)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not initialized)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values, in place (no-op in one process).

    Non-contiguous tensors go through a contiguous copy.
    """
    if world_size() == 1:
        return
    import torch.distributed as dist

    for t in tensors:
        if t.is_contiguous():
            dist.broadcast(t, src=0)
        else:
            buf = t.contiguous()
            dist.broadcast(buf, src=0)
            t.copy_(buf)


def barrier() -> None:
    """``dist.barrier()`` when several processes run."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: only rank 0 draws; ``None`` lets tqdm decide (on for a terminal)."""
    if rank() != 0:
        return True
    return None if progress is None else not progress


def rewrap(model: nn.Module) -> nn.Module:
    """A fresh ``DistributedDataParallel`` around ``model``'s module with the same settings.

    Needed after the parameters of a wrapped model were replaced (a compressor's ``prepare`` or
    the fine-tuning structure registers new parameters, which the old wrapper does not
    synchronize).  Any other model is returned as it is.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    kw = {} if model.broadcast_buffers else {"broadcast_buffers": False}  # the default needs no (deprecated) kwarg
    return nn.parallel.DistributedDataParallel(model.module, device_ids=model.device_ids,
                                               output_device=model.output_device,
                                               find_unused_parameters=model.find_unused_parameters, **kw)
