"""Training in several processes on this machine: :func:`sam2unet.training.train` on every rank
of a data-parallel run started by :func:`sam2unet.distributed.launcher.launch`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sam2unet.checkpoints import LoadedModel
from sam2unet.data import SegmentationDataset
from sam2unet.distributed import collectives, launcher
from sam2unet.exceptions import ConfigError
from sam2unet.train_config import EpochRecord, TrainConfig, TrainEvent
from sam2unet.training import TrainResult, train


@dataclass
class ParallelResult:
    """What rank 0 of a data-parallel run hands back: :class:`TrainResult` without the model,
    whose trained weights (adapters, decoder, BatchNorm statistics) are in ``weights``."""

    history: list[EpochRecord]
    weights: dict[str, torch.Tensor]
    best_path: Path | None
    last_path: Path | None
    best_metric: float | None
    best_epoch: int | None
    epochs_done: int
    stopped: bool


def trained_weights(model: Any) -> dict[str, torch.Tensor]:
    """A rank's trained part of ``model`` (adapters, decoder, BatchNorm statistics) on the CPU,
    to hand back to the launching process."""
    return {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()}


def as_parallel_result(result: TrainResult) -> ParallelResult:
    return ParallelResult(
        result.history,
        trained_weights(result.model),
        result.best_path,
        result.last_path,
        result.best_metric,
        result.best_epoch,
        result.epochs_done,
        result.stopped,
    )


def _train_rank(
    device: torch.device,
    relay: launcher.Relay,
    loaded: LoadedModel,
    train_data: SegmentationDataset,
    val_data: SegmentationDataset | None,
    config: TrainConfig,
    out_dir: str | Path | None,
    resume_state: Mapping[str, Any] | None,
) -> ParallelResult | None:
    cfg = TrainConfig.from_dict({**config.to_dict(), "device": str(device)})
    # tensors passed to spawned processes arrive in shared memory, the same for every rank:
    # each rank trains its own copy
    result = train(
        copy.deepcopy(loaded),
        train_data,
        val_data,
        cfg,
        out_dir,
        resume_state,
        relay.progress,
        relay.should_stop,
    )
    return as_parallel_result(result) if collectives.is_main() else None


def train_parallel(
    plan: launcher.DevicePlan,
    loaded: LoadedModel,
    train_data: SegmentationDataset,
    val_data: SegmentationDataset | None,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    resume_state: Mapping[str, Any] | None = None,
    progress: Callable[[TrainEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    threads: int = 0,
) -> ParallelResult:
    """:func:`train` in ``plan.nprocs`` processes on this machine (see
    :func:`sam2unet.distributed.launcher.launch`); ``progress`` and ``should_stop`` are called here.
    Raises :class:`~sam2unet.distributed.launcher.DistributedRunError` when a process fails or dies."""
    if config.batch_size % plan.nprocs:
        raise ConfigError(
            f"batch size {config.batch_size} does not divide among {plan.nprocs} training processes"
        )
    return launcher.launch(
        _train_rank,
        (loaded, train_data, val_data, config, out_dir, resume_state),
        plan,
        threads=threads,
        progress=progress,
        should_stop=should_stop,
    )
