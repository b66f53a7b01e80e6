"""Images in, probability maps at the original size out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sam2unet.config import ModelConfig
from sam2unet.modeling.sam2unet import SAM2UNet
from sam2unet.transforms import preprocess

log = logging.getLogger(__name__)


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


class Predictor:
    """Batched inference for one model. Not shared between threads: one per worker process.

    ``predict`` takes numpy arrays or PIL images of any size and returns, per image, a
    K x H x W float32 probability map (K = number of labels) at that image's size.
    """

    def __init__(
        self,
        model: SAM2UNet,
        config: ModelConfig,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        bf16: bool = False,
        cpu_batch_size: int | None = None,
    ) -> None:
        """``batch_size``: images per forward pass. ``cpu_batch_size``: the most per forward
        pass on a CPU (None: ``batch_size``); there a batch runs no faster than its images one
        by one (docs/benchmarks.md) while holding all their activations at once."""
        self.config = config
        self.device = pick_device(device)
        self.batch_size = max(1, int(batch_size))
        if self.device.type == "cpu" and cpu_batch_size is not None:
            self.batch_size = min(self.batch_size, max(1, int(cpu_batch_size)))
        self.bf16 = bool(bf16) and self.device.type == "cuda"
        if bf16 and not self.bf16:
            log.info("bf16 autocast is only used on CUDA; running fp32 on %s", self.device)
        self.model = model.to(self.device).eval()

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def forward_logits(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S normalised input -> B x K x S x S logits of the final output (on the
        device, fp32)."""
        x = torch.as_tensor(batch).to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.model(x)[0]
        return logits.float()

    @torch.inference_mode()
    def forward_batch(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S normalised input -> B x K x S x S probabilities (on the device, fp32)."""
        return torch.sigmoid(self.forward_logits(batch))

    @torch.inference_mode()
    def predict_logits(self, images: Sequence[np.ndarray | Image.Image]) -> list[torch.Tensor]:
        """Per image, the K x S x S logits at the model's input size (on the CPU, fp32)."""
        size = self.config.image_size
        out: list[torch.Tensor] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            inputs = np.stack([preprocess(im, size) for im in chunk])
            out.extend(self.forward_logits(inputs).cpu())
        return out

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray | Image.Image]) -> list[np.ndarray]:
        """Per image, a K x H x W float32 probability map at the image's original size."""
        size = self.config.image_size
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            shapes = []
            inputs = np.empty((len(chunk), 3, size, size), dtype=np.float32)
            for i, im in enumerate(chunk):
                h, w = (
                    (im.height, im.width)
                    if isinstance(im, Image.Image)
                    else np.asarray(im).shape[:2]
                )
                shapes.append((h, w))
                inputs[i] = preprocess(im, size)
            probs = self.forward_batch(inputs)
            for i, (h, w) in enumerate(shapes):
                p = probs[i : i + 1]
                if (h, w) != (size, size):
                    p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
                out.append(p[0].clamp_(0, 1).cpu().numpy())
        return out

    def predict_one(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """K x H x W probabilities for one image."""
        return self.predict([image])[0]
