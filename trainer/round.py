"""One training round: split the corrections, fine-tune the current version's adapters and
decoder, evaluate candidate and current version on the same held-out corrections, and promote the
candidate only if it is not worse.

Promotion rule (``SAM2UNET_PROMOTE_METRIC``, ``SAM2UNET_PROMOTE_TOLERANCE``): the candidate is
promoted when ``candidate[metric] >= current[metric] - tolerance`` (``<=`` and ``+`` for MAE,
where lower is better), with both measured on the same held-out set. Every candidate is kept as
a version with its metrics, promoted or not; only the pointer flip makes it current, after the
evaluation, so a crash at any point never leaves an unevaluated model current.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from contracts.registry import ModelRegistry, VersionInfo
from contracts.settings import Settings
from trainer.plots import TRAINING_PNG, safe_training_png

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What a round did. ``status``: promoted, rejected or skipped."""

    status: str
    reason: str
    project: int | None
    parent: str | None
    candidate: str | None = None
    metric: str = "miou"
    current_metrics: dict[str, float] = field(default_factory=dict)
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    train_size: int = 0
    val_size: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def holdout_split(
    task_ids: Sequence[int], fraction: float, salt: str = "sam2unet"
) -> tuple[list[int], list[int]]:
    """Stable train/held-out split by a hash of the task id: a task never moves between the two
    sets as the project grows, so no held-out label is ever trained on. At least one task goes
    each way when there are two or more."""
    scored = sorted(
        task_ids,
        key=lambda t: hashlib.sha256(f"{salt}:{t}".encode()).hexdigest(),
    )
    val = [t for t in task_ids if _bucket(t, salt) < fraction]
    if len(task_ids) >= 2:
        if not val:
            val = [scored[0]]
        if len(val) == len(task_ids):
            val = val[:-1]
    train = [t for t in task_ids if t not in set(val)]
    return train, val


def _bucket(task: int, salt: str) -> float:
    h = hashlib.sha256(f"{salt}:{task}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_not_worse(metric: str, candidate: float, current: float, tolerance: float) -> bool:
    from sam2unet.metrics import LOWER_IS_BETTER

    if np.isnan(candidate):
        return False
    if np.isnan(current):
        return True
    if metric in LOWER_IS_BETTER:
        return candidate <= current + tolerance
    return candidate >= current - tolerance


def run_round(
    registry: ModelRegistry,
    settings: Settings,
    samples: Sequence[tuple[int, np.ndarray, np.ndarray]],
    labels: Sequence[str],
    *,
    project: int | None = None,
    reason: str = "",
    progress: Callable[[Any], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RoundReport:
    """Train a candidate from the current version on ``samples`` ((task id, H x W x 3 image,
    K x H x W mask) with channels in ``labels`` order) and promote it if it is not worse.
    """
    from sam2unet.checkpoints import relabel
    from sam2unet.data import ArraySource, SegmentationDataset
    from sam2unet.training import TrainConfig, train, validate

    t0 = time.monotonic()
    parent = registry.current()
    metric = settings.promote_metric
    report = RoundReport("skipped", "", project, parent, metric=metric)
    if parent is None:
        report.reason = "no current version"
        return report
    ids = [int(t) for t, _, _ in samples]
    train_ids, val_ids = holdout_split(ids, settings.train_holdout)
    report.train_size, report.val_size = len(train_ids), len(val_ids)
    if len(samples) < max(2, settings.train_min_samples) or not val_ids or not train_ids:
        report.reason = f"{len(samples)} annotated task(s): too few for a round"
        log.info("round skipped for project %s: %s", project, report.reason)
        return report

    by_id = {int(t): (img, m) for t, img, m in samples}
    train_pairs = [by_id[t] for t in train_ids]
    val_pairs = [by_id[t] for t in val_ids]
    labels = tuple(labels)

    current = registry.load(parent)
    current = relabel(current, labels)
    size = current.config.image_size
    val_data = SegmentationDataset(ArraySource(val_pairs, labels=labels), size)
    train_data = SegmentationDataset(
        ArraySource(train_pairs, labels=labels), size, train=True, seed=len(ids)
    )
    device = settings.device
    report.current_metrics = validate(current.model, current.config, val_data, device=device)

    candidate = copy.deepcopy(current)
    cfg = TrainConfig(
        epochs=settings.train_epochs,
        batch_size=settings.train_batch_size,
        lr=settings.train_lr,
        device=device,
        bf16=settings.bf16,
        select_metric=metric,
        progress_bar=False,
        seed=len(ids),
    )
    log.info(
        "round for project %s (%s): fine-tuning %s on %d task(s), %d held out, %d epoch(s)",
        project,
        reason or "scheduled",
        parent,
        len(train_ids),
        len(val_ids),
        cfg.epochs,
    )
    result = train(candidate, train_data, None, cfg, progress=progress, should_stop=should_stop)
    report.history = [asdict(r) for r in result.history]
    report.candidate_metrics = validate(result.model, candidate.config, val_data, device=device)
    cand, cur = report.candidate_metrics[metric], report.current_metrics[metric]
    promote = is_not_worse(metric, cand, cur, settings.promote_tolerance)
    png = safe_training_png(report, promote)
    info: VersionInfo = registry.create_version(
        result.model,
        candidate.config,
        candidate.base,
        parent=parent,
        source=f"round:project-{project}" if project is not None else "round",
        metrics={
            "val": report.candidate_metrics,
            "parent_val": report.current_metrics,
            "val_size": len(val_ids),
            "promoted": promote,
        },
        train_size=len(train_ids),
        note=reason or "",
        extra_files={TRAINING_PNG: png} if png else None,
    )
    report.candidate = info.name
    if promote:
        registry.promote(
            info.name, reason=f"{metric} {cand:.4f} vs {cur:.4f}", metrics={metric: cand}
        )
        report.status = "promoted"
    else:
        report.status = "rejected"
    report.reason = f"{metric}: candidate {cand:.4f}, current {cur:.4f}"
    report.seconds = time.monotonic() - t0
    log.info(
        "round for project %s: %s %s (%s) in %.1fs",
        project,
        report.status,
        info.name,
        report.reason,
        report.seconds,
    )
    return report
