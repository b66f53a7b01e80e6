"""Official-format SAM2 / SAM2.1 checkpoints with random weights, built by the ``sam2``
package's own configs (the whole SAM2Base: trunk, neck, prompt encoder, mask decoder, memory
modules), and the reference ``SAM2ImagePredictor`` on the same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sam2unet.config import HIERA_SPECS
from sam2unet.promptable import config_name, head_image_size

STUB = Path(__file__).parent / "torchvision_stub"


def overrides(size: str) -> list[str]:
    """Hydra overrides of the shipped config for ``size`` (the small test size: its own trunk,
    narrow widths, a 256-pixel input, one memory-attention layer)."""
    out = ["++model.memory_attention.num_layers=1"] if size == "test" else []
    if size == "test":
        spec = HIERA_SPECS["test"]
        chans = list(reversed(spec.stage_channels))
        t = "model.image_encoder.trunk"
        out += [
            f"{t}.embed_dim={spec.embed_dim}",
            f"{t}.num_heads={spec.num_heads}",
            f"{t}.stages=[{','.join(map(str, spec.stages))}]",
            f"{t}.global_att_blocks=[{','.join(map(str, spec.global_att_blocks))}]",
            f"++{t}.window_spec=[{','.join(map(str, spec.window_spec))}]",
            "model.image_encoder.neck.d_model=32",
            "model.image_encoder.neck.position_encoding.num_pos_feats=32",
            f"model.image_encoder.neck.backbone_channel_list=[{','.join(map(str, chans))}]",
            f"model.image_size={head_image_size('test')}",
        ]
    return out


def build_sam2_model(size: str, sam21: bool = True, seed: int = 0):
    """A SAM2Base of ``size`` with random weights (every parameter and buffer drawn, so that
    nothing is left at a trivial init), through ``sam2.build_sam.build_sam2``."""
    from sam2.build_sam import build_sam2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2(
            config_name(size, sam21), None, device="cpu", hydra_overrides_extra=overrides(size)
        )
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if t.is_floating_point() and ("norm" in name or name.endswith(".bias")):
                    t.add_(torch.randn(t.shape, generator=g) * 0.05)
                elif t.is_floating_point() and t.abs().sum() == 0:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def write_official(path: Path, size: str, sam21: bool = True, seed: int = 0):
    """Save ``{"model": state_dict}`` as the official checkpoints are; returns the model."""
    model = build_sam2_model(size, sam21, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return model


def reference_predictor(model, size: str):
    """sam2's own SAM2ImagePredictor on ``model``, its torchvision transforms from the stub."""
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    s = head_image_size(size)
    # the predictor hard-codes the feature sizes of a 1024 input
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor
