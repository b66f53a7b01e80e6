"""Held-out evaluation: a model's metrics on a dataset, compared at each sample's own size, in
one process or sharded over the processes of a data-parallel run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sam2unet.config import ModelConfig
from sam2unet.data import SegmentationDataset
from sam2unet.distributed import collectives
from sam2unet.metrics import MetricSuite, dice, iou, to_uint8_map
from sam2unet.modeling.sam2unet import SAM2UNet
from sam2unet.predictor import Predictor

EXTRA_VAL_METRICS = ("iou", "dice")


@torch.no_grad()
def validate(
    model: SAM2UNet,
    config: ModelConfig,
    dataset: SegmentationDataset,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    bf16: bool = False,
    per_image: list[dict[str, float]] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``'s raw samples, compared at each sample's own size
    (as the released test script does): the :class:`~sam2unet.metrics.MetricSuite` keys plus
    ``iou`` / ``dice`` of the map thresholded at 0.5, averaged over samples and labels.
    With several labels, ``<metric>/<label>`` keys give each label's value. ``per_image``, when
    given, receives one dict per sample in dataset order: every metric of that sample alone,
    averaged over labels (for paired comparisons of two models on the same samples).

    In a data-parallel run every rank predicts its share (sample ``i`` on rank ``i % N``),
    rank 0 scores the gathered per-sample maps in dataset order (the same numbers as one
    process) and every rank returns rank 0's result; ``per_image`` is filled on rank 0."""
    was_training = model.training
    predictor = Predictor(model, config, device=device, batch_size=batch_size, bf16=bf16)
    labels = dataset.labels
    rank, world = collectives.rank_and_world() if collectives.is_active() else (0, 1)
    suites = [MetricSuite() for _ in labels]
    bin_scores: list[list[tuple[float, float]]] = [[] for _ in labels]

    def score(maps: list[np.ndarray], gts: list[np.ndarray], bins: list[tuple[float, float]]):
        alone = []
        for k in range(len(labels)):
            suites[k].step(maps[k], gts[k])
            bin_scores[k].append(bins[k])
            if per_image is not None:
                one = MetricSuite()
                one.step(maps[k], gts[k])
                alone.append({**one.results(), "iou": bins[k][0], "dice": bins[k][1]})
        if per_image is not None:
            per_image.append(
                {m: float(np.mean([a[m] for a in alone])) for m in alone[0] if m != "count"}
            )

    mine = list(range(rank, len(dataset), world))
    shard: list[tuple[int, list[np.ndarray], list[np.ndarray], list[tuple[float, float]]]] = []
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            raws = [dataset.raw(i) for i in idx]
            probs = predictor.predict([rgb for rgb, _ in raws])
            for i, (_, mask), prob in zip(idx, raws, probs, strict=True):
                gts = [mask[k] > 128 for k in range(len(labels))]
                maps = [to_uint8_map(prob[k]) for k in range(len(labels))]
                bins = [
                    (iou(prob[k] > 0.5, gts[k]), dice(prob[k] > 0.5, gts[k]))
                    for k in range(len(labels))
                ]
                if world == 1:
                    score(maps, gts, bins)
                else:
                    shard.append((i, maps, gts, bins))
    finally:
        model.train(was_training)
    if world > 1:
        gathered = collectives.gather_to_main(shard)
        if gathered is not None:
            for _, maps, gts, bins in sorted((r for part in gathered for r in part), key=_first):
                score(maps, gts, bins)
            out = _summarise(suites, bin_scores, labels)
        else:
            out = None
        return collectives.broadcast_from_main(out)
    return _summarise(suites, bin_scores, labels)


def _first(record: tuple[Any, ...]) -> Any:
    return record[0]


def _summarise(
    suites: list[MetricSuite],
    bin_scores: list[list[tuple[float, float]]],
    labels: Sequence[str],
) -> dict[str, float]:
    per_label = []
    for suite, scores in zip(suites, bin_scores, strict=True):
        r = suite.results()
        r.pop("count")
        r["iou"] = float(np.mean([s[0] for s in scores]))
        r["dice"] = float(np.mean([s[1] for s in scores]))
        per_label.append(r)
    out = {k: float(np.mean([r[k] for r in per_label])) for k in per_label[0]}
    if len(labels) > 1:
        for label, r in zip(labels, per_label, strict=True):
            out.update({f"{k}/{label}": v for k, v in r.items()})
    return out


# --------------------------------------------------------------------------- state
