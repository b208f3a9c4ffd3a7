"""Small facts about the layer being replaced, shared by the exporters (and TRP's VH exporter)."""
from __future__ import annotations

from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_cls(m: nn.Module):
    """``nn.Conv1d`` / ``2d`` / ``3d`` for the weight's spatial rank."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[m.weight.dim() - 2]


def explicit_padding(m: nn.Module) -> tuple[int, ...] | None:
    """Numeric padding of a conv (``'same'`` converted when symmetric), or None."""
    p = m.padding
    nd = m.weight.dim() - 2
    if isinstance(p, str):
        if p == "valid":
            return (0,) * nd
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return tuple(p)


def factory(m: nn.Module) -> dict:
    """``device`` / ``dtype`` keyword arguments that build new layers next to ``m``'s weight."""
    return {"device": m.weight.device, "dtype": m.weight.dtype}


def bias_of(m: nn.Module, with_bias: bool):
    """``m``'s bias when the exported layer should carry it, else None."""
    b = getattr(m, "bias", None)
    return b if (with_bias and b is not None) else None
