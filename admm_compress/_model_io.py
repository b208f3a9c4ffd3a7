"""How :func:`~admm_compress.complexity` and :func:`~admm_compress.latency` build a model's input
and call the model (a tensor, a tuple of positional arguments or a dict of keyword arguments),
and the checks of the arguments they share."""
from __future__ import annotations

import numbers
from typing import Any, Mapping

import torch
from torch import nn

from ._validation import check_int


def _check_model(model: Any) -> nn.Module:
    """The module to count (a DDP / DataParallel wrapper is unwrapped: its forward would sync)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .specs import unwrap

    return unwrap(model)


def _check_input_size(input_size: Any) -> tuple:
    if isinstance(input_size, numbers.Integral) and not isinstance(input_size, bool):
        input_size = (input_size,)
    if not isinstance(input_size, (tuple, list, torch.Size)) or len(input_size) == 0:
        raise ValueError(f"input_size must be a non-empty tuple of positive ints without the batch "
                         f"dimension, e.g. (3, 32, 32), got {input_size!r}")
    return tuple(check_int("input_size entry", d, low=1) for d in input_size)


def _dtype_device(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _check_input_options(input_constructor, input_dtype, where: str):
    if input_constructor is not None and not callable(input_constructor):
        raise TypeError(f"{where}: input_constructor must be a callable shape -> tensor, tuple of "
                        f"tensors or dict of keyword tensors, got {input_constructor!r}")
    if input_dtype is not None and not isinstance(input_dtype, torch.dtype):
        raise TypeError(f"{where}: input_dtype must be a torch.dtype (e.g. torch.long for token ids) "
                        f"or None, got {input_dtype!r}")
    if input_constructor is not None and input_dtype is not None:
        raise ValueError(f"{where}: give input_constructor or input_dtype, not both (the constructor "
                         f"chooses its own dtype)")


def _build_input(shape: tuple, dtype, device, input_constructor, input_dtype, where: str, random: bool):
    """The model input for ``shape`` = ``(batch, *input_size)``: a tensor, a tuple (positional
    arguments) or a dict (keyword arguments).

    Default: a float tensor of the model's dtype (zeros, or ``randn`` when ``random``);
    ``input_dtype`` integer or bool: zeros of that dtype (valid token ids / masks for any
    vocabulary); ``input_constructor(shape)``: whatever it returns, moved to ``device``.
    """
    if input_constructor is None:
        dt = input_dtype if input_dtype is not None else dtype
        if random and dt.is_floating_point:
            return torch.randn(shape, dtype=dt, device=device)
        return torch.zeros(shape, dtype=dt, device=device)
    x = input_constructor(shape)

    def move(t, path):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: input_constructor{tuple(shape)} must return a tensor, a tuple/list "
                            f"of tensors or a dict of tensors; {path} is a {type(t).__name__}")
        return t.to(device)

    if isinstance(x, torch.Tensor):
        return move(x, "the result")
    if isinstance(x, (tuple, list)) and x:
        return tuple(move(t, f"item {i}") for i, t in enumerate(x))
    if isinstance(x, Mapping) and x:
        return {k: move(t, f"key {k!r}") for k, t in x.items()}
    return move(x, "the result")


class _CallWith(nn.Module):
    """``model(*args)`` for a tuple input (ptflops calls ``model(x)`` or ``model(**x)``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, args):
        return self.model(*args)


def _runner(model: nn.Module, example):
    """(module ptflops calls, its input): dicts and tensors go as they are, tuples through
    :class:`_CallWith` as the keyword ``args`` (so ptflops sees no positional batch)."""
    if isinstance(example, tuple):
        return _CallWith(model), {"args": example}
    return None, example


def _call(model: nn.Module, example):
    if isinstance(example, tuple):
        return model(*example)
    if isinstance(example, dict):
        return model(**example)
    return model(example)
