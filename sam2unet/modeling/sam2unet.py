"""The SAM2-UNet network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam2unet.exceptions import ImageError
from sam2unet.modeling.decoder import Up
from sam2unet.modeling.rfb import RFB


class SAM2UNet(nn.Module):
    """Adapted Hiera encoder, RFB reductions and a three-stage U-Net decoder.

    Input: B x 3 x H x W (ImageNet-normalised, H and W multiples of 32).
    Output: (final, side1, side2), each B x K x H x W logits, K = ``num_classes``.
    side1 comes from the 1/16 decoder stage, side2 from 1/8, final from 1/4.
    """

    def __init__(
        self,
        encoder: nn.Module,
        stage_channels: tuple[int, ...],
        rfb_channels: int = 64,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        if len(stage_channels) != 4:
            raise ValueError(f"expected 4 encoder stages, got {len(stage_channels)}")
        c = rfb_channels
        self.encoder = encoder
        self.rfb1 = RFB(stage_channels[0], c)
        self.rfb2 = RFB(stage_channels[1], c)
        self.rfb3 = RFB(stage_channels[2], c)
        self.rfb4 = RFB(stage_channels[3], c)
        self.up1 = Up(2 * c, c)
        self.up2 = Up(2 * c, c)
        self.up3 = Up(2 * c, c)
        self.side1 = nn.Conv2d(c, num_classes, kernel_size=1)
        self.side2 = nn.Conv2d(c, num_classes, kernel_size=1)
        self.head = nn.Conv2d(c, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % 32 or x.shape[3] % 32 or not x.numel():
            raise ImageError(
                "SAM2UNet takes B x 3 x H x W input with H and W positive multiples of 32 "
                f"(Hiera's total stride), got {tuple(x.shape)}"
            )
        size = x.shape[-2:]
        x1, x2, x3, x4 = self.encoder(x)
        x1, x2, x3, x4 = self.rfb1(x1), self.rfb2(x2), self.rfb3(x3), self.rfb4(x4)
        d = self.up1(x4, x3)
        side1 = F.interpolate(self.side1(d), size=size, mode="bilinear")
        d = self.up2(d, x2)
        side2 = F.interpolate(self.side2(d), size=size, mode="bilinear")
        d = self.up3(d, x1)
        out = F.interpolate(self.head(d), size=size, mode="bilinear")
        return out, side1, side2

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters and decoder: every parameter that trains, plus the decoder's BN statistics.

        The frozen trunk's weights are left out: they come from the base SAM2 checkpoint.
        """
        return {k: v for k, v in self.state_dict().items() if not is_frozen_key(k)}


def is_frozen_key(key: str) -> bool:
    """Whether a SAM2UNet state-dict key belongs to the frozen Hiera trunk."""
    if not key.startswith("encoder."):
        return False
    return ".prompt_learn." not in key
