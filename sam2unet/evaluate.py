"""Evaluation: saved prediction maps against ground-truth masks, or a model on an image/mask
folder pair. Files are paired by stem; unpaired files are a :class:`DatasetError`.

Results are the :class:`~sam2unet.metrics.MetricSuite` dict (see :mod:`sam2unet.metrics`).

Two post-processings turn a model's output into the uint8 map that is scored:

* ``"default"`` (what the service serves): sigmoid at the model's input size, bilinear resize
  of the probabilities to the image's size, ``round(p * 255)``;
* ``"released"`` (the authors' ``test.py``): bilinear resize of the final output's *logits* to
  the ground truth's size, sigmoid, per-image min-max normalisation, ``* 255`` truncated to
  uint8 (:func:`released_postprocess`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sam2unet.checkpoints import LoadedModel
from sam2unet.data import FolderSource, pair_by_stem, read_mask
from sam2unet.exceptions import ConfigError, DatasetError
from sam2unet.metrics import MetricSuite
from sam2unet.predictor import Predictor

log = logging.getLogger(__name__)

POSTPROCESS = ("default", "released")


def released_postprocess(logits: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """One output channel's ``S x S`` logits -> the ``shape`` uint8 map the released
    ``test.py`` saves: bilinear resize (``align_corners=False``) of the logits, sigmoid,
    ``(x - min) / (max - min + 1e-8)``, ``* 255`` truncated to uint8."""
    x = F.interpolate(
        logits.float().reshape(1, 1, *logits.shape[-2:]),
        size=tuple(shape),
        mode="bilinear",
        align_corners=False,
    )
    res = x.sigmoid().cpu().numpy().squeeze()
    res = (res - res.min()) / (res.max() - res.min() + 1e-8)
    return (res * 255).astype(np.uint8)


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path) -> dict[str, float]:
    """Metrics of grey prediction maps (``pred_dir``, uint8 0..255 images) against grey
    ground-truth masks (``gt_dir``, foreground > 128), paired by file stem; each prediction
    must have its mask's size."""
    pairs = pair_by_stem(pred_dir, gt_dir, what=("prediction", "ground-truth mask"))
    suite = MetricSuite()
    for pred_path, gt_path in pairs:
        pred, gt = read_mask(pred_path), read_mask(gt_path)
        if pred.shape != gt.shape:
            raise DatasetError(
                f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} but its mask "
                f"{gt_path} is {gt.shape[1]}x{gt.shape[0]}"
            )
        suite.step(pred, gt)
    return suite.results()


def label_channel(labels: tuple[str, ...], label: str | None) -> int:
    """The output channel to evaluate: the only one, or the one named ``label``."""
    if label is None:
        if len(labels) != 1:
            raise ConfigError(f"the model has labels {list(labels)}: name the one to evaluate")
        return 0
    if label not in labels:
        raise ConfigError(f"label {label!r} is not one of the model's labels {list(labels)}")
    return labels.index(label)


def evaluate_model(
    loaded: LoadedModel,
    images_dir: str | Path,
    masks_dir: str | Path,
    device: str = "auto",
    batch_size: int = 8,
    bf16: bool = False,
    label: str | None = None,
    save_dir: str | Path | None = None,
    postprocess: str = "default",
) -> dict[str, float]:
    """Run a model (through :class:`~sam2unet.predictor.Predictor`) on ``images_dir`` and
    compare each map, at its mask's size, with the mask of the same stem in ``masks_dir``.
    ``postprocess``: ``"default"`` or ``"released"`` (see the module's docstring).
    ``save_dir`` also receives the maps as ``<stem>.png`` (uint8 0..255), which
    :func:`evaluate_dirs` scores identically."""
    if postprocess not in POSTPROCESS:
        raise ConfigError(f"postprocess must be one of {list(POSTPROCESS)}, got {postprocess!r}")
    channel = label_channel(loaded.config.labels, label)
    source = FolderSource(images_dir, masks_dir)
    predictor = Predictor(
        loaded.model, loaded.config, device=device, batch_size=batch_size, bf16=bf16
    )
    out = Path(save_dir) if save_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    suite = MetricSuite()
    for start in range(0, len(source), batch_size):
        idx = range(start, min(start + batch_size, len(source)))
        raws = [source.raw(i) for i in idx]
        if postprocess == "released":
            logits = predictor.predict_logits([rgb for rgb, _ in raws])
            preds = [
                released_postprocess(lg[channel], mask.shape[1:])
                for lg, (_, mask) in zip(logits, raws, strict=True)
            ]
        else:
            probs = predictor.predict([rgb for rgb, _ in raws])
            preds = [np.round(p[channel] * 255.0).astype(np.uint8) for p in probs]
        for i, (_, mask), pred in zip(idx, raws, preds, strict=True):
            suite.step(pred, mask[0])
            if out is not None:
                Image.fromarray(pred).save(out / f"{source.name(i)}.png")
        log.debug("evaluated %d/%d images", idx.stop, len(source))
    return suite.results()
