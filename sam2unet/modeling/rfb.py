"""Receptive-field blocks that reduce each encoder stage to a fixed channel count."""

from __future__ import annotations

import torch
from torch import nn


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm, without activation, as in the released RFB."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int | tuple[int, int],
        padding: int | tuple[int, int] = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_planes, out_planes, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _branch(cin: int, cout: int, k: int) -> nn.Sequential:
    p = k // 2
    return nn.Sequential(
        BasicConv2d(cin, cout, 1),
        BasicConv2d(cout, cout, (1, k), padding=(0, p)),
        BasicConv2d(cout, cout, (k, 1), padding=(p, 0)),
        BasicConv2d(cout, cout, 3, padding=k, dilation=k),
    )


class RFB(nn.Module):
    """Four parallel branches (1x1; 1xk, kx1, dilated 3x3 for k = 3, 5, 7), fused and added
    to a 1x1 residual, then ReLU. B x C_in x H x W -> B x C_out x H x W."""

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        self.relu = nn.ReLU(True)
        self.branch0 = nn.Sequential(BasicConv2d(in_channel, out_channel, 1))
        self.branch1 = _branch(in_channel, out_channel, 3)
        self.branch2 = _branch(in_channel, out_channel, 5)
        self.branch3 = _branch(in_channel, out_channel, 7)
        self.conv_cat = BasicConv2d(4 * out_channel, out_channel, 3, padding=1)
        self.conv_res = BasicConv2d(in_channel, out_channel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cat = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)
        return self.relu(self.conv_cat(cat) + self.conv_res(x))
