"""Evaluation: saved prediction maps against ground-truth masks, or a model on an image/mask
folder pair. Files are paired by stem; unpaired files are a :class:`DatasetError`.

Results are the :class:`~sam2unet.metrics.MetricSuite` dict (see :mod:`sam2unet.metrics`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from sam2unet.checkpoints import LoadedModel
from sam2unet.data import FolderSource, pair_by_stem, read_mask
from sam2unet.exceptions import ConfigError, DatasetError
from sam2unet.metrics import MetricSuite
from sam2unet.predictor import Predictor

log = logging.getLogger(__name__)


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
) -> dict[str, float]:
    """Run a model (through :class:`~sam2unet.predictor.Predictor`) on ``images_dir`` and
    compare each probability map, at its image's size, with the mask of the same stem in
    ``masks_dir``. ``save_dir`` also receives the maps as ``<stem>.png`` (uint8 0..255), which
    :func:`evaluate_dirs` scores identically."""
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
        probs = predictor.predict([rgb for rgb, _ in raws])
        for i, (_, mask), prob in zip(idx, raws, probs, strict=True):
            pred = np.round(prob[channel] * 255.0).astype(np.uint8)
            suite.step(pred, mask[0])
            if out is not None:
                Image.fromarray(pred).save(out / f"{source.name(i)}.png")
        log.debug("evaluated %d/%d images", idx.stop, len(source))
    return suite.results()
