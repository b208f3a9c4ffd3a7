"""Questions about the model graph answered with torch.fx (not by module order).

LRPET's BN rectification needs, for each convolution, the BatchNorm that consumes its output.
The official code pairs them by index order, which silently breaks on shortcut convolutions and
re-ordered definitions; here the pairing comes from a symbolic trace of the forward pass.
"""
from __future__ import annotations

import logging

from torch import fx, nn

__all__ = ["consumer_batchnorms", "GraphError"]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GraphError(RuntimeError):
    """The model's forward pass could not be traced to answer a graph question."""


def consumer_batchnorms(model: nn.Module) -> dict[str, str]:
    """Map each module name whose output feeds exactly one BatchNorm (and nothing else) to that BN.

    Traced with :func:`torch.fx.symbolic_trace`; a module used more than once in the forward pass
    is left out (no unique pairing).

    Raises
    ------
    GraphError
        If the forward pass cannot be traced symbolically (data-dependent control flow).
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise GraphError(f"cannot trace {type(model).__name__} with torch.fx to pair layers with "
                         f"their BatchNorm ({type(e).__name__}: {e}); pass metric=None to project "
                         f"without BN rectification") from e
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), _BN):
            pairs[str(node.target)] = str(users[0].target)
    return pairs
