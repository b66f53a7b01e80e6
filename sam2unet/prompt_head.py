"""SAM2's own promptable head (FPN neck, prompt encoder, mask decoder) on the SAM2-UNet trunk.

An official SAM2 / SAM2.1 checkpoint carries, besides the Hiera trunk, the weights that turn
its features into masks from clicks and boxes: ``image_encoder.neck.*`` (the FPN neck),
``sam_prompt_encoder.*``, ``sam_mask_decoder.*`` (with ``conv_s0`` / ``conv_s1`` for the
high-resolution features) and ``no_mem_embed`` (added to the lowest-resolution features for a
single image). :func:`load_prompt_head` loads exactly those, strictly, into modules of the
``sam2`` package built from the configs it ships; :class:`PromptableSAM2` runs them on the
trunk of a SAM2-UNet *as released* (its adapters bypassed, see
:func:`sam2unet.modeling.encoder.adapters_bypassed`): one trunk in memory serves both heads.

The computation is that of ``sam2.sam2_image_predictor.SAM2ImagePredictor`` built by
``sam2.build_sam.build_sam2`` (with its default mask post-processing settings): the image is
resized to the model's square input with antialiased bilinear interpolation, normalised with
ImageNet's mean and std, embedded once (:meth:`PromptableSAM2.embed`), and every prompt then
runs only the prompt encoder and mask decoder (:meth:`PromptableSAM2.predict`). Mask logits
are resized bilinearly to the image's size and thresholded at 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sam2unet.build import load_strict
from sam2unet.config import HIERA_SPECS
from sam2unet.exceptions import CheckpointError
from sam2unet.modeling.encoder import adapters_bypassed
from sam2unet.transforms import IMAGENET_MEAN, IMAGENET_STD, to_rgb_array

log = logging.getLogger(__name__)

#: Key prefixes of an official checkpoint's ``model`` that the promptable head uses.
HEAD_PREFIXES = ("image_encoder.neck.", "sam_prompt_encoder.", "sam_mask_decoder.")
NO_MEM_EMBED = "no_mem_embed"
#: The square input side of the promptable head per size (SAM2's 1024; the small test size,
#: for tests and CPU demos only, uses 256).
HEAD_IMAGE_SIZE = {"test": 256}
DEFAULT_HEAD_IMAGE_SIZE = 1024
#: The shipped config per size ("test" builds on tiny's, with its own trunk and widths).
_CONFIG_SUFFIX = {"test": "t", "tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
#: ``build_sam2``'s default mask post-processing (``apply_postprocessing=True``): a single-mask
#: answer falls back to the best multimask output when it is not stable.
DECODER_EXTRA_ARGS = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}
MASK_THRESHOLD = 0.0


def head_image_size(size: str) -> int:
    return HEAD_IMAGE_SIZE.get(size, DEFAULT_HEAD_IMAGE_SIZE)


def config_name(size: str, sam21: bool) -> str:
    """The ``sam2`` package's config for a size (``configs/sam2.1/sam2.1_hiera_t.yaml``, ...)."""
    suffix = _CONFIG_SUFFIX[size]
    return (
        f"configs/sam2.1/sam2.1_hiera_{suffix}.yaml"
        if sam21
        else (f"configs/sam2/sam2_hiera_{suffix}.yaml")
    )


def _model_config(size: str, sam21: bool, d_model: int) -> Any:
    """The ``model`` section of the shipped config, adapted to ``size`` and ``d_model``."""
    # omegaconf (sam2's config library): imported only when a head is built
    from omegaconf import OmegaConf

    text = resources.files("sam2").joinpath(config_name(size, sam21)).read_text()
    cfg = OmegaConf.create(text).model
    spec = HIERA_SPECS[size]
    neck = cfg.image_encoder.neck
    neck.d_model = d_model
    neck.position_encoding.num_pos_feats = d_model
    neck.backbone_channel_list = list(reversed(spec.stage_channels))
    cfg.image_size = head_image_size(size)
    return cfg


class PromptHead(nn.Module):
    """The parts of SAM2Base that answer prompts on one image, named as in its state dict
    (``neck`` is SAM2Base's ``image_encoder.neck``)."""

    def __init__(self, size: str, sam21: bool, d_model: int) -> None:
        super().__init__()
        # sam2 initialises hydra globally: imported only when a head is built
        from hydra.utils import instantiate
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer

        cfg = _model_config(size, sam21, d_model)
        self.size = size
        self.image_size = int(cfg.image_size)
        self.scalp = int(cfg.image_encoder.scalp)
        self.directly_add_no_mem_embed = bool(cfg.directly_add_no_mem_embed)
        self.use_high_res_features = bool(cfg.use_high_res_features_in_sam)
        self.neck = instantiate(cfg.image_encoder.neck, _recursive_=True)
        # as SAM2Base._build_sam_heads (backbone stride 16; SAM's fixed hyperparameters)
        embed = self.image_size // 16
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=d_model,
            image_embedding_size=(embed, embed),
            input_image_size=(self.image_size, self.image_size),
            mask_in_chans=16,
        )
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=d_model, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=d_model,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            use_high_res_features=self.use_high_res_features,
            iou_prediction_use_sigmoid=bool(cfg.iou_prediction_use_sigmoid),
            pred_obj_scores=bool(cfg.pred_obj_scores),
            pred_obj_scores_mlp=bool(cfg.pred_obj_scores_mlp),
            use_multimask_token_for_obj_ptr=bool(cfg.use_multimask_token_for_obj_ptr),
            **DECODER_EXTRA_ARGS,
        )
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d_model))


def head_state_of(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The promptable head's keys of an official checkpoint's ``model`` dict, renamed to
    :class:`PromptHead`'s (``image_encoder.neck.`` -> ``neck.``)."""
    out = {}
    for k, v in model_state.items():
        if k.startswith("image_encoder.neck."):
            out[k[len("image_encoder.") :]] = v
        elif k.startswith(HEAD_PREFIXES) or k == NO_MEM_EMBED:
            out[k] = v
    return out


def build_prompt_head(
    size: str, model_state: Mapping[str, torch.Tensor], sam21: bool | None = None
) -> PromptHead:
    """A :class:`PromptHead` with the weights of an official checkpoint's ``model`` dict,
    loaded strictly (every key of the head present with its shape, none unknown).

    Raises:
        CheckpointError: the checkpoint lacks the head's weights or they do not fit ``size``.
    """
    if size not in _CONFIG_SUFFIX:
        raise CheckpointError(f"no promptable head for size {size!r}")
    state = head_state_of(model_state)
    conv = state.get("neck.convs.0.conv.weight")
    if conv is None or NO_MEM_EMBED not in state:
        raise CheckpointError(
            "the checkpoint has no SAM2 prompt encoder / mask decoder weights "
            "(image_encoder.neck.*, sam_prompt_encoder.*, sam_mask_decoder.*, no_mem_embed)"
        )
    if sam21 is None:
        sam21 = "no_obj_embed_spatial" in model_state
    with torch.device("meta"):
        head = PromptHead(size, sam21, int(conv.shape[0]))
    load_strict(head, state, what=f"SAM2 promptable head ({size})")
    # buffers that are not in the state dict (none in sam2 1.1.0) would still be meta
    if any(t.is_meta for t in (*head.parameters(), *head.buffers())):
        raise CheckpointError("the SAM2 promptable head has tensors the checkpoint does not set")
    return head.eval()


def load_prompt_head(path: str | os.PathLike[str], size: str) -> PromptHead:
    """The promptable head of an official SAM2 / SAM2.1 checkpoint file (see
    :func:`build_prompt_head`). The file is memory-mapped: only the head's tensors are read
    (and copied), not the trunk and memory modules."""
    obj = _load_mapped(path)
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict)):
        raise CheckpointError(f"{Path(path).name} is not an official SAM2/SAM2.1 checkpoint")
    model = obj["model"]
    wanted = {
        k: v.clone()
        for k, v in model.items()
        if k.startswith(HEAD_PREFIXES) or k in (NO_MEM_EMBED, "no_obj_embed_spatial")
    }
    return build_prompt_head(size, wanted, sam21="no_obj_embed_spatial" in model)


def _load_mapped(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptObject:
    """One object's prompts in pixels of the original image: clicks (x, y) with labels
    (1 positive, 0 negative) and/or a box (x0, y0, x1, y1)."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.points) != len(self.labels):
            raise ValueError("a PromptObject needs one label per point")
        if not self.points and self.box is None:
            raise ValueError("a PromptObject needs a point or a box")

    @property
    def ambiguous(self) -> bool:
        """A single click and nothing else: SAM2's multimask output picks the mask."""
        return self.box is None and len(self.points) == 1


@dataclass
class ObjectMask:
    """One object's answer at the original size: mask (logits > 0), logits, predicted IoU."""

    mask: np.ndarray
    logits: np.ndarray
    score: float


@dataclass
class ImageFeatures:
    """The embedding of one image: what the prompt encoder and mask decoder need."""

    image_embed: torch.Tensor  # 1 x C x S/16 x S/16, no_mem_embed added
    high_res: tuple[torch.Tensor, ...]  # conv_s0 / conv_s1 outputs, 1 x C' x S/4 and S/8
    orig_hw: tuple[int, int]

    @property
    def nbytes(self) -> int:
        tensors = (self.image_embed, *self.high_res)
        return sum(t.numel() * t.element_size() for t in tensors)


def preprocess_image(image: np.ndarray, size: int) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x size x size float32: /255, antialiased bilinear resize,
    (x - mean) / std; the semantics of torchvision's ToTensor, Resize((size, size)) and
    Normalize on tensors, without torchvision."""
    rgb = to_rgb_array(image)
    x = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).to(torch.float32).div(255)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
    mean = torch.as_tensor(IMAGENET_MEAN.tolist(), dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD.tolist(), dtype=torch.float32).view(-1, 1, 1)
    return x.sub(mean).div(std)[None]


class PromptableSAM2:
    """Prompts answered by SAM2's head on a SAM2-UNet trunk (adapters bypassed).

    ``trunk``: the SAM2-UNet's ``encoder`` (a ``sam2`` Hiera with adapters), shared, not copied.
    ``trunk_runs`` counts the trunk's forward passes (one per :meth:`embed`).
    """

    def __init__(self, trunk: nn.Module, head: PromptHead, bf16: bool = False) -> None:
        self.trunk = trunk
        self.device = next(trunk.parameters()).device
        self.head = head.to(self.device).eval()
        self.bf16 = bool(bf16) and self.device.type == "cuda"
        self.image_size = head.image_size
        self.trunk_runs = 0

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> ImageFeatures:
        """Trunk (as released) + neck on one H x W x 3 uint8 image."""
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        x = preprocess_image(rgb, self.image_size).to(self.device)
        head = self.head
        with self._autocast(), adapters_bypassed(self.trunk):
            self.trunk_runs += 1
            features, _pos = head.neck(self.trunk(x))
            if head.scalp > 0:
                features = features[: -head.scalp]
            features = list(features)
            if head.use_high_res_features:
                features[0] = head.sam_mask_decoder.conv_s0(features[0])
                features[1] = head.sam_mask_decoder.conv_s1(features[1])
        embed = features[-1]
        if head.directly_add_no_mem_embed:
            embed = embed + head.no_mem_embed.view(1, -1, 1, 1)
        return ImageFeatures(embed, tuple(features[:-1]), (h, w))

    @torch.inference_mode()
    def predict(self, features: ImageFeatures, objects: Sequence[PromptObject]) -> list[ObjectMask]:
        """One mask per object: a single click uses the multimask output and keeps the mask
        with the best predicted IoU; other prompts ask for one mask."""
        return [self._predict_one(features, obj) for obj in objects]

    def _predict_one(self, features: ImageFeatures, obj: PromptObject) -> ObjectMask:
        head, dev = self.head, self.device
        h, w = features.orig_hw
        s = self.image_size
        coords: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        if obj.box is not None:  # the box first, as corners labelled 2 and 3
            box = torch.as_tensor(obj.box, dtype=torch.float, device=dev).reshape(1, 2, 2)
            box = box.clone()
            box[..., 0] = box[..., 0] / w
            box[..., 1] = box[..., 1] / h
            coords.append(box * s)
            labels.append(torch.tensor([[2, 3]], dtype=torch.int, device=dev))
        if obj.points:
            pts = torch.as_tensor(obj.points, dtype=torch.float, device=dev).clone()
            pts[..., 0] = pts[..., 0] / w
            pts[..., 1] = pts[..., 1] / h
            coords.append((pts * s)[None])
            labels.append(torch.as_tensor(obj.labels, dtype=torch.int, device=dev)[None])
        points = (torch.cat(coords, dim=1), torch.cat(labels, dim=1))
        multimask = obj.ambiguous
        with self._autocast():
            sparse, dense = head.sam_prompt_encoder(points=points, boxes=None, masks=None)
            low_res, iou, _, _ = head.sam_mask_decoder(
                image_embeddings=features.image_embed,
                image_pe=head.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=False,
                high_res_features=list(features.high_res),
            )
        logits = F.interpolate(low_res.float(), (h, w), mode="bilinear", align_corners=False)
        scores = iou[0].float().cpu().numpy()
        best = int(np.argmax(scores))
        out = logits[0, best].cpu().numpy()
        return ObjectMask(out > MASK_THRESHOLD, out, float(scores[best]))
