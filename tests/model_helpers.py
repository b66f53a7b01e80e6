"""Shared builders for the model package's tests: small configs, fake official checkpoints,
image/mask folders."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam2unet.build import build_sam2unet
from sam2unet.checkpoints import trunk_state_of, write_sam2_checkpoint
from sam2unet.config import ModelConfig
from sam2unet.modeling.decoder import Up
from sam2unet.modeling.sam2unet import SAM2UNet

# Extra non-trunk keys of an official checkpoint (a few of each family), and those that only
# SAM2.1 checkpoints have.
SAM2_EXTRA_SHAPES = {
    "image_encoder.neck.convs.0.conv.weight": (32, 128, 1, 1),
    "image_encoder.neck.convs.0.conv.bias": (32,),
    "sam_mask_decoder.iou_token.weight": (1, 32),
    "sam_prompt_encoder.point_embeddings.0.weight": (1, 32),
    "memory_encoder.out_proj.weight": (8, 32, 1, 1),
    "maskmem_tpos_enc": (7, 1, 1, 8),
}
SAM21_EXTRA_SHAPES = {
    "no_obj_embed_spatial": (1, 8),
    "obj_ptr_tpos_proj.weight": (8, 32),
    "obj_ptr_tpos_proj.bias": (8,),
}


def cpu_config(**changes) -> ModelConfig:
    """The "test" size at a 64-pixel input (fast on a CPU)."""
    return ModelConfig(**{"size": "test", "image_size": 64, **changes})


def seeded_model(config: ModelConfig, seed: int = 0) -> SAM2UNet:
    """A randomly initialised model, reproducible from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam2unet(config)


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


def write_official_checkpoint(
    path: Path, model: SAM2UNet, version: str = "sam2", seed: int = 0
) -> Path:
    """``model``'s trunk written as an official SAM2 ("sam2") or SAM2.1 ("sam2.1") checkpoint,
    with some of the non-trunk keys such checkpoints carry."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(SAM2_EXTRA_SHAPES)
    if version == "sam2.1":
        shapes.update(SAM21_EXTRA_SHAPES)
    extra = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return write_sam2_checkpoint(path, trunk_state_of(model), extra)


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
