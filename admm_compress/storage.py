"""Compact on-disk form of unstructured sparse weights, and the bytes a model's state dict takes.

An exported :class:`~admm_compress.layers.SparseLinear` / ``SparseConv1d`` / ``SparseConv2d``
keeps, in memory, a dense ``weight`` and a 0/1 ``mask`` (so it fine-tunes like its dense
parent).  Its *state dict* stores only the effective weight ``W = weight * mask`` as

* ``weight_values``: the ``k`` entries of ``W`` on the support ``mask != 0``, in row-major
  order (same dtype as the weight; zeros inside the support are kept), and
* the support, in whichever of three encodings takes the fewest bytes for this layer
  (:func:`encode_support`), for a weight of ``n`` entries with ``R`` rows (output channels) and
  ``C = n / R`` columns:

  ===========  ==========================================  ============================
  encoding     keys                                        index bytes
  ===========  ==========================================  ============================
  bitmask      ``weight_bitmask`` (uint8, 1 bit / entry)   ``ceil(n / 8)``
  COO          ``weight_coo`` (flat positions)             ``k * s(n - 1)``
  CSR          ``weight_csr_crow`` (``R + 1`` row          ``(R + 1) * s(k) + k * s(C - 1)``
               pointers), ``weight_csr_col`` (columns)
  ===========  ==========================================  ============================

  where ``s(m)`` is the size of the smallest integer type holding ``m`` (1 byte up to 255,
  2 up to 32767, 4 up to 2**31 - 1, else 8).  The bitmask costs 1 bit per weight, CSR about
  ``16 d`` bits per weight (2-byte columns) at density ``d``: the bitmask is chosen above
  ``d ~ 1/16``, CSR/COO below.  A float32 layer at density ``d`` thus stores at most
  ``4 d n + n / 8`` bytes against ``4 n`` dense: ``(d + 1/32)`` of dense (13 % at ``d = 0.1``).

Loading (``load_state_dict``) decodes the support and scatters the values back: the weight and
mask come back bit for bit (the weight outside the mask is stored as zero, which is what the layer
multiplies it by).  A state dict in the older dense form (``weight`` + ``mask``) still loads.
"""
from __future__ import annotations

import io
import math

import torch
from torch import nn

__all__ = ["encode_support", "decode_support", "storage_bytes", "saved_bytes", "storage_report",
           "SUPPORT_KEYS"]

#: state-dict key suffixes (after ``<prefix>weight_``) of each support encoding
SUPPORT_KEYS = {"bitmask": ("bitmask",), "coo": ("coo",), "csr": ("csr_crow", "csr_col")}


def _int_dtype(max_value: int) -> torch.dtype:
    """Smallest integer dtype holding ``0 .. max_value`` (uint8, int16, int32, int64)."""
    if max_value <= 255:
        return torch.uint8
    if max_value <= 2 ** 15 - 1:
        return torch.int16
    if max_value <= 2 ** 31 - 1:
        return torch.int32
    return torch.int64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _index_bytes(n: int, rows: int, k: int) -> dict[str, int]:
    """Bytes of each support encoding for ``k`` non-zeros among ``n`` entries in ``rows`` rows."""
    cols = n // max(rows, 1)
    return {
        "bitmask": math.ceil(n / 8),
        "coo": k * _itemsize(_int_dtype(max(n - 1, 0))),
        "csr": (rows + 1) * _itemsize(_int_dtype(k)) + k * _itemsize(_int_dtype(max(cols - 1, 0))),
    }


_BITS = 1 << torch.arange(8, dtype=torch.uint8)  # little-endian bit order inside each byte


def encode_support(mask: torch.Tensor, fmt: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """Encode the support ``mask != 0`` of a weight (dim 0 = rows) in its smallest encoding.

    Parameters
    ----------
    mask : Tensor
        Any shape with ``mask.dim() >= 1``; rows are ``mask.shape[0]``.
    fmt : {"bitmask", "coo", "csr"} or None
        Force an encoding; ``None`` picks the one with the fewest bytes (ties: bitmask, COO, CSR).

    Returns
    -------
    (fmt, tensors)
        ``tensors`` maps the key suffixes of :data:`SUPPORT_KEYS` ``[fmt]`` to CPU integer tensors.
    """
    if mask.dim() < 1:
        raise ValueError(f"encode_support: mask must have at least 1 dimension, got shape {tuple(mask.shape)}")
    sup = (mask != 0).detach().reshape(mask.shape[0], -1).cpu()
    rows, cols = sup.shape
    n, k = sup.numel(), int(sup.count_nonzero())
    sizes = _index_bytes(n, rows, k)
    if fmt is None:
        fmt = min(sizes, key=sizes.get)
    elif fmt not in SUPPORT_KEYS:
        raise ValueError(f"encode_support: fmt must be one of {sorted(SUPPORT_KEYS)} or None, got {fmt!r}")
    flat = sup.reshape(-1)
    if fmt == "bitmask":
        pad = (-n) % 8
        bits = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
        return fmt, {"bitmask": (bits * _BITS).sum(1, dtype=torch.uint8)}
    if fmt == "coo":
        return fmt, {"coo": flat.nonzero().flatten().to(_int_dtype(max(n - 1, 0)))}
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = sup.sum(1).cumsum(0)
    col = sup.nonzero()[:, 1]
    return fmt, {"csr_crow": crow.to(_int_dtype(k)), "csr_col": col.to(_int_dtype(max(cols - 1, 0)))}


def decode_support(fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean support of shape ``shape`` encoded by :func:`encode_support` (inverse).

    Raises ``ValueError`` naming the inconsistency when the tensors do not describe a support of
    that shape (a state dict from a layer of another shape).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    rows = shape[0]
    cols = n // max(rows, 1)
    if fmt == "bitmask":
        b = tensors["bitmask"]
        if b.dim() != 1 or b.numel() != math.ceil(n / 8):
            raise ValueError(f"bitmask of {b.numel()} bytes does not fit a weight of shape {shape} "
                             f"(expected {math.ceil(n / 8)})")
        bits = (b.to(torch.uint8).unsqueeze(1) & _BITS.to(b.device)) != 0
        return bits.reshape(-1)[:n].reshape(shape)
    if fmt == "coo":
        idx = tensors["coo"].to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"COO positions outside 0..{n - 1} for a weight of shape {shape}")
        out = torch.zeros(n, dtype=torch.bool, device=idx.device)
        out[idx] = True
        return out.reshape(shape)
    if fmt == "csr":
        crow = tensors["csr_crow"].to(torch.int64)
        col = tensors["csr_col"].to(torch.int64)
        if crow.numel() != rows + 1 or int(crow[-1]) != col.numel():
            raise ValueError(f"CSR with {crow.numel()} row pointers / {col.numel()} columns does not fit "
                             f"a weight of shape {shape} ({rows} rows)")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols):
            raise ValueError(f"CSR columns outside 0..{cols - 1} for a weight of shape {shape}")
        row = torch.repeat_interleave(torch.arange(rows, device=col.device), crow.diff())
        out = torch.zeros(rows, cols, dtype=torch.bool, device=col.device)
        out[row, col] = True
        return out.reshape(shape)
    raise ValueError(f"unknown support encoding {fmt!r}; expected one of {sorted(SUPPORT_KEYS)}")


def _state_dict_of(obj) -> dict:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        return obj
    raise TypeError(f"expected an nn.Module or a state dict, got {type(obj).__name__}")


def storage_bytes(model) -> int:
    """Bytes of the tensors in ``model``'s state dict (``numel * element_size``, shared storages once).

    This is what :func:`torch.save` writes, less its container overhead (zip headers and the
    pickled key names: a few hundred bytes per tensor; :func:`saved_bytes` measures the file).
    """
    seen, total = set(), 0
    for t in _state_dict_of(model).values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def saved_bytes(model) -> int:
    """Size in bytes of ``torch.save(model.state_dict())`` (the file a user ships)."""
    buf = io.BytesIO()
    torch.save(_state_dict_of(model), buf)
    return buf.getbuffer().nbytes


def storage_report(model: nn.Module) -> list[dict]:
    """Per sparse layer: encoding, non-zeros, value bytes, index bytes and the dense weight's bytes.

    Returns a list of dicts with keys ``name, shape, nnz, density, format, value_bytes,
    index_bytes, dense_bytes`` (one per :class:`~admm_compress.layers.SparseLinear` /
    ``SparseConv*``, in module order).
    """
    from .layers import _SparseMixin

    if not isinstance(model, nn.Module):
        raise TypeError(f"storage_report: model must be an nn.Module, got {type(model).__name__}")
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, _SparseMixin):
            continue
        fmt, idx = encode_support(m.mask)
        es = m.weight.element_size()
        rows.append({"name": name, "shape": tuple(m.weight.shape), "nnz": m.nnz,
                     "density": m.nnz / max(m.weight.numel(), 1), "format": fmt,
                     "value_bytes": m.nnz * es,
                     "index_bytes": sum(t.numel() * t.element_size() for t in idx.values()),
                     "dense_bytes": m.weight.numel() * es})
    return rows
