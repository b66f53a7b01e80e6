"""Models and official-format checkpoints with random weights, for an untrained first start,
tests, benchmarks and demos without downloads.

* :func:`random_model`: a SAM2-UNet whose trunk is randomly initialised, reproducibly;
* :func:`write_official_checkpoint`: a SAM2-UNet's trunk written as an official SAM2 or SAM2.1
  checkpoint, with random values for some of the other keys such checkpoints carry;
* :func:`random_sam2_model` / :func:`write_random_sam2_checkpoint`: a whole ``SAM2Base`` built by
  the ``sam2`` package from its shipped configs (the promptable head included), and its
  official-format checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sam2unet.build import build_sam2unet
from sam2unet.checkpoints import LoadedModel, trunk_state_of, write_sam2_checkpoint
from sam2unet.config import HIERA_SPECS, ModelConfig
from sam2unet.modeling.sam2unet import SAM2UNet
from sam2unet.prompt_head import config_name, head_image_size

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


def random_model(config: ModelConfig, seed: int = 0) -> LoadedModel:
    """A model whose trunk is randomly initialised (no SAM2 weights), reproducibly from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2unet(config)
    return LoadedModel(model, config, None, "random", meta={"init_seed": seed})


def write_official_checkpoint(
    path: str | os.PathLike[str], model: SAM2UNet, version: str = "sam2", seed: int = 0
) -> Path:
    """``model``'s trunk written as an official SAM2 ("sam2") or SAM2.1 ("sam2.1") checkpoint,
    with some of the non-trunk keys such checkpoints carry."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(SAM2_EXTRA_SHAPES)
    if version == "sam2.1":
        shapes.update(SAM21_EXTRA_SHAPES)
    extra = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return write_sam2_checkpoint(path, trunk_state_of(model), extra)


def sam2_overrides(size: str) -> list[str]:
    """Hydra overrides of the shipped config for ``size``: none for the four real sizes; the
    small test size gets its own trunk, narrow widths, a 256-pixel input and one
    memory-attention layer."""
    if size != "test":
        return []
    spec = HIERA_SPECS["test"]

    def ints(values) -> str:
        return "[" + ",".join(str(v) for v in values) + "]"

    t, n = "model.image_encoder.trunk", "model.image_encoder.neck"
    return [
        "++model.memory_attention.num_layers=1",
        f"{t}.embed_dim={spec.embed_dim}",
        f"{t}.num_heads={spec.num_heads}",
        f"{t}.stages={ints(spec.stages)}",
        f"{t}.global_att_blocks={ints(spec.global_att_blocks)}",
        f"++{t}.window_spec={ints(spec.window_spec)}",
        f"{n}.d_model=32",
        f"{n}.position_encoding.num_pos_feats=32",
        f"{n}.backbone_channel_list={ints(reversed(spec.stage_channels))}",
        f"model.image_size={head_image_size('test')}",
    ]


def random_sam2_model(size: str, sam21: bool = True, seed: int = 0) -> nn.Module:
    """A whole SAM2Base of ``size`` with random weights, built by ``sam2.build_sam.build_sam2``
    from the shipped config (for tests, benchmarks and demos without downloads). Biases, norms
    and zero-initialised tensors are drawn too, so that no part is at a trivial init."""
    # sam2 initialises hydra globally: imported only when a whole SAM2 model is built
    from sam2.build_sam import build_sam2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2(
            config_name(size, sam21), None, device="cpu", hydra_overrides_extra=sam2_overrides(size)
        )
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if not t.is_floating_point():
                    continue
                if "norm" in name or name.endswith(".bias"):
                    t.add_(torch.randn(t.shape, generator=g) * 0.05)
                elif t.abs().sum() == 0:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def write_random_sam2_checkpoint(
    path: str | os.PathLike[str], size: str, sam21: bool = True, seed: int = 0
) -> nn.Module:
    """Save :func:`random_sam2_model` as the official checkpoints are (``{"model": state}``);
    returns the model."""
    model = random_sam2_model(size, sam21, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return model
