"""Hiera trunk with an adapter in front of every block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class Adapter(nn.Module):
    """Wraps one Hiera block: ``block(x + GELU(W2 GELU(W1 x)))``.

    The bottleneck MLP (d -> ``hidden`` -> d) is the trainable part; the block stays frozen.
    Parameter names (``block``, ``prompt_learn``) follow the released SAM2-UNet layout.
    """

    def __init__(self, block: nn.Module, hidden: int = 32) -> None:
        super().__init__()
        self.block = block
        dim = block.attn.qkv.in_features
        self.prompt_learn = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
            nn.GELU(),
        )
        self.bypassed = False  # True: the block alone, as SAM2 released it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x C (Hiera's channels-last layout)."""
        if self.bypassed:
            return self.block(x)
        return self.block(x + self.prompt_learn(x))


def add_adapters(trunk: nn.Module, adapter_dim: int = 32) -> nn.Module:
    """Freeze a ``sam2`` Hiera trunk and wrap each of its blocks in an :class:`Adapter`.

    The trunk keeps its own forward (patch embedding, windowed positional embedding, stage
    outputs), which returns B x C_i x H/s_i x W/s_i for s = 4, 8, 16, 32, finest first.
    """
    for p in trunk.parameters():
        p.requires_grad = False
    trunk.blocks = nn.Sequential(*(Adapter(b, adapter_dim) for b in trunk.blocks))
    return trunk


@contextmanager
def adapters_bypassed(trunk: nn.Module) -> Iterator[nn.Module]:
    """Run ``trunk`` (as made by :func:`add_adapters`) as SAM2 released it, adapters skipped,
    inside the block: the same module and weights, no second copy. Not for concurrent use of
    the trunk from several threads."""
    adapters = [m for m in trunk.modules() if isinstance(m, Adapter)]
    before = [a.bypassed for a in adapters]
    for a in adapters:
        a.bypassed = True
    try:
        yield trunk
    finally:
        for a, b in zip(adapters, before, strict=True):
            a.bypassed = b
