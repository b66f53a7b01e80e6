"""ToTensor, Resize and Normalize with torchvision's documented tensor semantics (v0.17+):

* ``ToTensor``: a PIL image or an H x W x C uint8 array -> C x H x W float32 in [0, 1];
* ``Resize((h, w))`` on a tensor: bilinear interpolation, ``align_corners=False``, antialiased
  (the default since torchvision 0.17); an image already of that size is returned as is;
* ``Normalize(mean, std)``: ``(x - mean) / std`` per channel.

Resize and Normalize are TorchScript-compatible modules, as ``SAM2Transforms`` scripts them.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ToTensor:
    def __call__(self, pic):
        arr = np.asarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(arr.transpose((2, 0, 1))).contiguous()
        if t.dtype == torch.uint8:
            return t.to(dtype=torch.get_default_dtype()).div(255)
        return t


class Resize(nn.Module):
    def __init__(self, size) -> None:
        super().__init__()
        self.size: list[int] = [int(s) for s in size]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if [img.shape[-2], img.shape[-1]] == self.size:
            return img
        x = img.unsqueeze(0) if img.dim() == 3 else img
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x.squeeze(0) if img.dim() == 3 else x


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean: list[float] = [float(m) for m in mean]
        self.std: list[float] = [float(s) for s in std]

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)
        return tensor.sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))
