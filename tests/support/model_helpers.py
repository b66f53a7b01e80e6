"""Shared builders for the model package's tests: small configs, seeded models, released-format
state dicts, image/mask folders (random official checkpoints: :mod:`sam2unet.random_weights`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam2unet.config import ModelConfig
from sam2unet.modeling.decoder import Up
from sam2unet.modeling.sam2unet import SAM2UNet
from sam2unet.random_weights import random_model


def cpu_config(**changes) -> ModelConfig:
    """The "test" size at a 64-pixel input (fast on a CPU)."""
    return ModelConfig(**{"size": "test", "image_size": 64, **changes})


def seeded_model(config: ModelConfig, seed: int = 0) -> SAM2UNet:
    """A randomly initialised model, reproducible from ``seed``."""
    return random_model(config, seed).model


def perturb_trainable(model: SAM2UNet, seed: int = 1) -> None:
    """Randomise every trainable parameter and the decoder's BN statistics, so that outputs
    depend on them (a fresh decoder's BN buffers are all 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.trainable_state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.05
                if name.endswith("running_var"):
                    t.copy_(1.0 + noise.abs())
                else:
                    t.add_(noise)


def released_state(model: SAM2UNet) -> dict[str, torch.Tensor]:
    """The layout the SAM2-UNet authors released: our keys plus the unused ``up4`` stage."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    up4 = Up(128, 64)
    state.update({f"up4.{k}": v for k, v in up4.state_dict().items()})
    return state


def write_pngs(folder: Path, names: Iterable[str], size: tuple[int, int] = (24, 32)) -> None:
    """Small images (or masks) named ``names`` (file names with extensions) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        if "mask" in folder.name:
            arr = (arr[:, :, 0] > 127).astype(np.uint8) * 255
        Image.fromarray(arr).save(folder / name)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads: on a busy shared CPU, fewer threads than cores avoids
    the slowdown of spinning worker threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
