"""A small Vision Transformer for 32x32 images (LoRITa Tables 1a/1b: hidden size 256).

Follows the "simple ViT" of Beyer et al. (2022), cited by LoRITa: a strided convolution embeds
``patch_size x patch_size`` patches into ``hidden`` channels, fixed 2-D sine-cosine position
embeddings are added (a buffer, no parameters), ``num_layers`` pre-norm transformer blocks
follow, then LayerNorm, global average pooling over tokens and a linear head.

The attention projections are plain :class:`torch.nn.Linear` modules named ``q``, ``k``,
``v`` and ``out`` (not :class:`torch.nn.MultiheadAttention`), so constraint specs can select
them by name (``"blocks.*.attn.[qkv]"``), weight decay / factorizations apply to them, and
ptflops counts them.  Names: ``patch_embed``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.{q,k,v,out}``,
``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``norm``, ``head``.

Attention is ``softmax(q k^T / sqrt(d)) v`` per head with ``torch.matmul`` (counted by both
ptflops backends).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_float, check_int

__all__ = ["Attention", "MLP", "Block", "ViT", "vit", "sincos_2d"]


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of shape ``(h * w, dim)``; ``dim % 4 == 0``."""
    if dim % 4:
        raise ValueError(f"hidden={dim} must be a multiple of 4 for 2-D sin-cos embeddings")
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                          torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = torch.arange(dim // 4, dtype=torch.float32) / (dim // 4 - 1 if dim > 4 else 1)
    omega = 1.0 / temperature ** omega
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1)


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v``, ``out`` linear layers."""

    def __init__(self, hidden: int, num_heads: int, bias: bool = True):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden={hidden} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(hidden, hidden, bias=bias)
        self.k = nn.Linear(hidden, hidden, bias=bias)
        self.v = nn.Linear(hidden, hidden, bias=bias)
        self.out = nn.Linear(hidden, hidden, bias=bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self._heads(self.q(x))
        k = self._heads(self.k(x))
        v = self._heads(self.v(x))
        attn = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c)
        return self.out(y)


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, hidden: int, mlp_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, hidden: int, num_heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden, mlp_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Vision Transformer with GAP head (see module docstring for the layout and names).

    Parameters
    ----------
    image_size, patch_size : int
        Square input size and patch size; ``image_size % patch_size == 0``.
    num_layers, num_heads : int
        Transformer blocks and attention heads (``hidden % num_heads == 0``).
    hidden, mlp_dim : int
        Token width (multiple of 4) and MLP hidden width.
    num_classes, in_channels : int
        Outputs and input image channels.
    dropout : float
        Dropout on the residual branches, in ``[0, 1)``.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, num_layers: int = 8,
                 num_heads: int = 8, hidden: int = 256, mlp_dim: int = 512,
                 num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        image_size = check_int("image_size", image_size, low=1)
        patch_size = check_int("patch_size", patch_size, low=1, high=image_size)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        num_layers = check_int("num_layers", num_layers, low=1)
        num_heads = check_int("num_heads", num_heads, low=1)
        hidden = check_int("hidden", hidden, low=4)
        if hidden % 4:
            raise ValueError(f"hidden={hidden} must be a multiple of 4 (2-D sin-cos embedding)")
        if hidden % num_heads:
            raise ValueError(f"hidden={hidden} must be divisible by num_heads={num_heads}")
        mlp_dim = check_int("mlp_dim", mlp_dim, low=1)
        num_classes = check_int("num_classes", num_classes, low=1)
        in_channels = check_int("in_channels", in_channels, low=1)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.image_size = image_size
        self.patch_size = patch_size
        grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos_embedding", sincos_2d(grid, grid, hidden), persistent=False)
        self.blocks = nn.ModuleList(Block(hidden, num_heads, mlp_dim, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linear weights with zero bias, LeCun-normal patch embedding,
        LayerNorm ``(1, 0)``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        fan_in = self.patch_embed.in_channels * self.patch_size ** 2
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)      # (B, tokens, hidden)
        x = x + self.pos_embedding.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).mean(dim=1)
        return self.head(x)


def vit(image_size: int = 32, patch_size: int = 4, num_layers: int = 8, num_heads: int = 8,
        hidden: int = 256, mlp_dim: int = 512, num_classes: int = 10, in_channels: int = 3,
        dropout: float = 0.0) -> ViT:
    """Small ViT (defaults: LoRITa's ViT-L8-H8, hidden 256, patch 4 on 32x32 images)."""
    return ViT(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
               num_heads=num_heads, hidden=hidden, mlp_dim=mlp_dim, num_classes=num_classes,
               in_channels=in_channels, dropout=dropout)
