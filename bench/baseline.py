"""Section 6: the released SAM2-UNet test script's per-image loop against our batched path.

The released loop, re-created: per image, batch of one; read the file, resize to the network
size, normalise, forward, sigmoid, bilinear upsampling to the ground truth's size (the image's
own size here), a second sigmoid, min-max normalisation, save as an 8-bit PNG.

Ours, on the same files: decode, :meth:`sam2unet.predictor.Predictor.predict` in batches
(resize, normalise, one forward per batch, sigmoid, upsampling), save each probability map as
an 8-bit PNG. The worker path on the same images is the end-to-end section's figure.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.measure import sync

log = logging.getLogger(__name__)


def _png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def released_loop(
    model: torch.nn.Module, paths: list[Path], image_size: int, device: torch.device
) -> list[bytes]:
    """The per-image loop of the released test script; PNG bytes per image."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = []
    for path in paths:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        h, w = rgb.height, rgb.width
        small = rgb.resize((image_size, image_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = ((x - mean) / std).unsqueeze(0).to(device)
        res, _, _ = model(x)
        res = torch.sigmoid(res)
        res = F.interpolate(res, size=(h, w), mode="bilinear", align_corners=False)
        res = res.sigmoid().cpu().numpy().squeeze()
        res = (res - res.min()) / (res.max() - res.min() + 1e-8)
        out.append(_png((res * 255).astype(np.uint8)))
    return out


def batched_predictor(predictor: Any, paths: list[Path]) -> list[bytes]:
    """Our path: decode every file, ``Predictor.predict`` (batched), 8-bit PNG per map."""
    from sam2unet.transforms import decode_image

    images = [decode_image(p.read_bytes()) for p in paths]
    probs = predictor.predict(images)
    return [_png((p[0] * 255.0 + 0.5).astype(np.uint8)) for p in probs]


def run_baseline(
    size: str,
    image_size: int,
    batch: int,
    paths: list[Path],
    device: torch.device,
    warmup_paths: list[Path],
) -> dict[str, Any]:
    """Images/s of both loops on ``paths`` (after one untimed pass over ``warmup_paths``)."""
    from sam2unet.config import ModelConfig
    from sam2unet.predictor import Predictor
    from sam2unet.random_weights import random_model

    config = ModelConfig(size=size, image_size=image_size)
    model = random_model(config, seed=0).model.to(device).eval()
    predictor = Predictor(model, config, device=device, batch_size=batch)
    released_loop(model, warmup_paths, image_size, device)
    batched_predictor(predictor, warmup_paths)
    sync(device)

    t0 = time.perf_counter()
    released_loop(model, paths, image_size, device)
    sync(device)
    released_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched_predictor(predictor, paths)
    sync(device)
    ours_s = time.perf_counter() - t0
    n = len(paths)
    return {
        "size": size,
        "image_size": image_size,
        "batch": batch,
        "images": n,
        "released_images_per_s": n / released_s,
        "predictor_images_per_s": n / ours_s,
        "released_seconds": released_s,
        "predictor_seconds": ours_s,
    }
