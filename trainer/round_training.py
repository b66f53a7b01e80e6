"""The training part of a round, the same in every process and on every machine that takes
part: the round's plan, its datasets, and :func:`train_and_evaluate` (evaluate the current
version, fine-tune a copy, evaluate the copy). :mod:`trainer.round` decides what to do with
the outcome; :mod:`trainer.cluster` runs it on other machines."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from contracts.settings import Settings


def machine_plan(settings: Settings) -> Any:
    """This machine's processes in a round over several machines: ``SAM2UNET_TRAIN_DEVICES``,
    else one process on ``SAM2UNET_DEVICE`` (a :class:`~sam2unet.distributed.launcher.DevicePlan`)."""
    from sam2unet.distributed.launcher import DevicePlan, parse_devices  # imports torch
    from sam2unet.predictor import pick_device  # imports torch

    plan = parse_devices(settings.train_devices)
    return plan or DevicePlan((str(pick_device(settings.device)),))


@dataclass
class RoundPlan:
    """What every machine of a round needs besides the shared model and dataset directories:
    the parent version, the labels, which tasks train and which are held out (in order), and
    the training configuration (``TrainConfig.to_dict()``)."""

    parent: str
    project: int | None
    labels: list[str]
    train_ids: list[int]
    val_ids: list[int]
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RoundPlan:
        return cls(
            str(d["parent"]),
            None if d.get("project") is None else int(d["project"]),
            [str(x) for x in d["labels"]],
            [int(t) for t in d["train_ids"]],
            [int(t) for t in d["val_ids"]],
            dict(d["config"]),
        )


def round_datasets(
    by_id: dict[int, tuple[np.ndarray, np.ndarray]],
    train_ids: Sequence[int],
    val_ids: Sequence[int],
    labels: Sequence[str],
    size: int,
    seed: int,
) -> tuple[Any, Any]:
    """The training (augmented, seeded) and held-out datasets of a round, in the given task
    order: the same on every machine given the same arguments."""
    from sam2unet.data import ArraySource, SegmentationDataset  # imports torch

    labels = tuple(labels)
    val_data = SegmentationDataset(ArraySource([by_id[t] for t in val_ids], labels=labels), size)
    train_data = SegmentationDataset(
        ArraySource([by_id[t] for t in train_ids], labels=labels), size, train=True, seed=seed
    )
    return train_data, val_data


@dataclass
class RoundOutcome:
    """What the training part of a round produced: ``model`` in one process, the trained
    ``weights`` (adapters, decoder, BatchNorm statistics) from several."""

    current_metrics: dict[str, float]
    candidate_metrics: dict[str, float]
    history: list[dict[str, Any]]
    current_images: list[dict[str, float]] = field(default_factory=list)
    candidate_images: list[dict[str, float]] = field(default_factory=list)
    model: Any = None
    weights: dict[str, Any] | None = None


def train_and_evaluate(
    device: Any,
    relay: Any,
    current: Any,
    train_data: Any,
    val_data: Any,
    cfg: Any,
    parallel: bool = True,
) -> RoundOutcome | None:
    """Evaluate the current version, fine-tune a copy of it, evaluate the copy: in this
    process, or as one rank of several (see :func:`sam2unet.distributed.launcher.launch`: ``relay``
    carries progress and stop requests, evaluation is sharded, rank 0 returns the outcome)."""
    from sam2unet.distributed import collectives  # imports torch
    from sam2unet.parallel_training import trained_weights  # imports torch
    from sam2unet.train_config import TrainConfig  # imports torch
    from sam2unet.training import train  # imports torch
    from sam2unet.validation import validate  # imports torch

    if parallel:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": str(device)})
    current_images: list[dict[str, float]] = []
    current_metrics = validate(
        current.model, current.config, val_data, device=device, per_image=current_images
    )
    candidate = copy.deepcopy(current)
    result = train(
        candidate,
        train_data,
        None,
        cfg,
        progress=relay.progress,
        should_stop=relay.should_stop,
    )
    candidate_images: list[dict[str, float]] = []
    candidate_metrics = validate(
        result.model, candidate.config, val_data, device=device, per_image=candidate_images
    )
    history = [asdict(r) for r in result.history]
    metrics = (current_metrics, candidate_metrics, history, current_images, candidate_images)
    if not parallel:
        return RoundOutcome(*metrics, model=result.model)
    outcome = None
    if collectives.is_main():
        outcome = RoundOutcome(*metrics, weights=trained_weights(result.model))
    if collectives.machines() > 1:
        # rank 0 may run on another machine than the trainer: every machine gets the outcome
        outcome = collectives.broadcast_from_main(outcome)
        return outcome if collectives.local_rank() == 0 else None
    return outcome
