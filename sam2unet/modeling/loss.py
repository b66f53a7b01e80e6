"""Structure loss (weighted BCE + weighted IoU) with deep supervision."""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class BCEMode(str, Enum):
    """How the BCE term of the structure loss is reduced.

    ``AS_RELEASED``: the released SAM2-UNet code calls BCE with ``reduce='none'``; torch reads
    that legacy argument as a truthy flag and returns the *mean*, so the boundary weights then
    cancel out: (w * mean_bce).sum / w.sum == mean_bce. The published numbers used this.
    ``WEIGHTED``: the intended per-pixel BCE weighted by the boundary map.
    """

    AS_RELEASED = "as_released"
    WEIGHTED = "weighted"


def structure_loss(
    pred: torch.Tensor, mask: torch.Tensor, bce_mode: BCEMode | str = BCEMode.AS_RELEASED
) -> torch.Tensor:
    """pred: B x K x H x W logits, mask: B x K x H x W in [0, 1]. Returns a scalar.

    Each channel is one independent (sigmoid) label; the loss is averaged over B and K.
    """
    bce_mode = BCEMode(bce_mode)
    weit = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    if bce_mode is BCEMode.AS_RELEASED:
        bce = F.binary_cross_entropy_with_logits(pred, mask, reduction="mean")
    else:
        bce = F.binary_cross_entropy_with_logits(pred, mask, reduction="none")
    wbce = (weit * bce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    prob = torch.sigmoid(pred)
    inter = (prob * mask * weit).sum(dim=(2, 3))
    union = ((prob + mask) * weit).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def deep_supervision_loss(
    outputs: tuple[torch.Tensor, ...] | list[torch.Tensor],
    mask: torch.Tensor,
    bce_mode: BCEMode | str = BCEMode.AS_RELEASED,
) -> torch.Tensor:
    """Sum of :func:`structure_loss` over the deep-supervision outputs (final, side1, side2)."""
    return sum(
        (structure_loss(o, mask, bce_mode) for o in outputs), torch.zeros((), device=mask.device)
    )
