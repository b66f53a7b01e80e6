"""One training round: split the corrections, fine-tune the current version's adapters and
decoder, evaluate candidate and current version on the same held-out corrections, and promote the
candidate only if it is not worse.

Promotion rule (``SAM2UNET_PROMOTE_METRIC``, ``SAM2UNET_PROMOTE_TOLERANCE``,
``SAM2UNET_PROMOTE_CONFIDENCE``): both are scored image by image on the same held-out set, and
the candidate is promoted when a paired bootstrap of the per-image differences says it is not
worse by more than the tolerance with that confidence (:mod:`trainer.promotion`). The held-out
set has at least ``SAM2UNET_HOLDOUT_MIN`` tasks and each task keeps its side across rounds
(kept in the project's ``sides.json``, see :func:`run_round`; the report returns the new
assignment). Every candidate is kept as a version with its metrics, promoted or not; only the
pointer flip makes it current, after the evaluation, so a crash at any point never leaves an
unevaluated model current.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from contracts.settings import Settings
from modelstore.registry import ModelRegistry, VersionInfo
from sam2unet.metrics import LOWER_IS_BETTER
from trainer.plots import TRAINING_PNG, safe_training_png
from trainer.promotion import VAL, assign_sides, paired_bootstrap
from trainer.round_training import (
    RoundOutcome,
    RoundPlan,
    machine_plan,
    round_datasets,
    train_and_evaluate,
)

log = logging.getLogger(__name__)

SIDES_NAME = "sides.json"


@dataclass
class RoundReport:
    """What a round did. ``status``: promoted, rejected, skipped, or superseded (the candidate
    would have been promoted, but the current version changed during the round, by a rollback
    or another promotion: it is kept on disk, listed as superseded, and nothing moves)."""

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
    decision: dict[str, Any] = field(default_factory=dict)
    sides: dict[int, str] = field(default_factory=dict)
    #: annotations holding smart keypoints/rectangles but no mask, from the round's sync
    #: (:attr:`trainer.dataset.SyncReport.prompts`): ``derived`` samples trained on masks
    #: derived from them, ``skipped`` annotations not used
    prompt_masks: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Round:
    """What the stages of one round share: its split, the current version and its data."""

    settings: Settings
    project: int | None
    reason: str
    parent: str
    labels: tuple[str, ...]
    ids: list[int]
    train_ids: list[int]
    val_ids: list[int]
    current: Any = None
    train_data: Any = None
    val_data: Any = None
    cfg: Any = None

    @property
    def metric(self) -> str:
        return self.settings.promote_metric


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
    sides: dict[int, str] | None = None,
    sides_dir: str | os.PathLike[str] | None = None,
    cluster: Callable[[RoundPlan], Any] | None = None,
    prompt_masks: dict[str, Any] | None = None,
) -> RoundReport:
    """Train a candidate from the current version on ``samples`` ((task id, H x W x 3 image,
    K x H x W mask) with channels in ``labels`` order) and promote it if it is not worse.

    ``sides_dir``: the folder whose ``sides.json`` keeps each task's held-out side across
    rounds; the round reads it before the split and writes the new assignment once it is
    done (not when it fails). Without it, ``sides`` gives the previous assignment.

    ``cluster``: when the round spans several machines (``SAM2UNET_TRAIN_NODES`` > 1), called
    with the round's :class:`RoundPlan` before training; it tells the other machines (see
    :mod:`trainer.cluster`) and returns the :class:`~sam2unet.distributed.launcher.Cluster` to
    launch.

    ``prompt_masks``: the sync's count of annotations holding prompts but no mask
    (:attr:`trainer.dataset.SyncReport.prompts`), carried into the report and its log line.
    """
    held = load_sides(sides_dir, project) if sides_dir is not None else dict(sides or {})
    report = _round(
        registry,
        settings,
        samples,
        labels,
        held,
        project=project,
        reason=reason,
        progress=progress,
        should_stop=should_stop,
        cluster=cluster,
        prompt_masks=prompt_masks,
    )
    if sides_dir is not None and report.sides:
        save_sides(sides_dir, {**held, **report.sides})
    return report


def load_sides(sides_dir: str | os.PathLike[str], project: int | None = None) -> dict[int, str]:
    """Each task's held-out side from earlier rounds (``{task: "train" | "val"}``); an
    unreadable file is logged and the sides start afresh."""
    path = Path(sides_dir) / SIDES_NAME
    try:
        return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError) as e:
        log.error("project %s: unreadable %s (%s); sides start afresh", project, path, e)
        return {}


def save_sides(sides_dir: str | os.PathLike[str], sides: dict[int, str]) -> None:
    d = Path(sides_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (SIDES_NAME + ".tmp")
    tmp.write_text(json.dumps({str(k): v for k, v in sorted(sides.items())}))
    os.replace(tmp, d / SIDES_NAME)


def _round(
    registry: ModelRegistry,
    settings: Settings,
    samples: Sequence[tuple[int, np.ndarray, np.ndarray]],
    labels: Sequence[str],
    sides: dict[int, str],
    *,
    project: int | None,
    reason: str,
    progress: Callable[[Any], None] | None,
    should_stop: Callable[[], bool] | None,
    cluster: Callable[[RoundPlan], Any] | None,
    prompt_masks: dict[str, Any] | None,
) -> RoundReport:
    """The round's stages; ``sides``: the previous rounds' assignment."""
    t0 = time.monotonic()
    start = registry.pointer()  # promotion is a compare-and-set against it
    report = RoundReport("skipped", "", project, start.version, metric=settings.promote_metric)
    report.prompt_masks = dict(prompt_masks or {})
    if start.version is None:
        report.reason = "no current version"
        return report
    rnd = _split(report, settings, samples, labels, reason, sides)
    if rnd is None:
        return report
    _prepare(registry, rnd, samples)
    outcome, model = _train(rnd, progress, should_stop, cluster)
    decision = _decide(rnd, report, outcome)
    info = _keep_candidate(registry, rnd, report, model, decision.promote)
    _promote(registry, rnd, report, info, start, decision)
    report.seconds = time.monotonic() - t0
    log.info(
        "round for project %s: %s %s (%s) in %.1fs%s",
        project,
        report.status,
        info.name,
        report.reason,
        report.seconds,
        _prompts_note(report.prompt_masks),
    )
    return report


def _split(
    report: RoundReport,
    settings: Settings,
    samples: Sequence[tuple[int, np.ndarray, np.ndarray]],
    labels: Sequence[str],
    reason: str,
    sides: dict[int, str] | None,
) -> _Round | None:
    """Each task's side (kept from ``sides``, new ones assigned); None, with the report's
    reason, when there are too few tasks for a round."""
    ids = [int(t) for t, _, _ in samples]
    report.sides = assign_sides(ids, settings.train_holdout, settings.holdout_min, sides)
    val_ids = [t for t in ids if report.sides[t] == VAL]
    train_ids = [t for t in ids if report.sides[t] != VAL]
    report.train_size, report.val_size = len(train_ids), len(val_ids)
    if len(samples) < max(2, settings.train_min_samples) or not val_ids or not train_ids:
        report.reason = f"{len(samples)} annotated task(s): too few for a round"
        log.info(
            "round skipped for project %s: %s%s",
            report.project,
            report.reason,
            _prompts_note(report.prompt_masks),
        )
        return None
    return _Round(
        settings, report.project, reason, report.parent, tuple(labels), ids, train_ids, val_ids
    )


def _prepare(
    registry: ModelRegistry, rnd: _Round, samples: Sequence[tuple[int, np.ndarray, np.ndarray]]
) -> None:
    """Load the current version (with the round's labels), build the datasets and the
    training configuration."""
    from sam2unet.relabel import relabel  # imports torch
    from sam2unet.train_config import TrainConfig  # imports torch

    settings = rnd.settings
    by_id = {int(t): (img, m) for t, img, m in samples}
    rnd.current = relabel(registry.load(rnd.parent), rnd.labels)
    rnd.train_data, rnd.val_data = round_datasets(
        by_id,
        rnd.train_ids,
        rnd.val_ids,
        rnd.labels,
        rnd.current.config.image_size,
        seed=len(rnd.ids),
    )
    rnd.cfg = TrainConfig(
        epochs=settings.train_epochs,
        batch_size=settings.train_batch_size,
        lr=settings.train_lr,
        device=settings.device,
        bf16=settings.bf16,
        select_metric=rnd.metric,
        progress_bar=False,
        seed=len(rnd.ids),
    )
    log.info(
        "round for project %s (%s): fine-tuning %s on %d task(s), %d held out, %d epoch(s)",
        rnd.project,
        rnd.reason or "scheduled",
        rnd.parent,
        len(rnd.train_ids),
        len(rnd.val_ids),
        rnd.cfg.epochs,
    )


def _train(
    rnd: _Round,
    progress: Callable[[Any], None] | None,
    should_stop: Callable[[], bool] | None,
    cluster: Callable[[RoundPlan], Any] | None,
) -> tuple[RoundOutcome, Any]:
    """Train and evaluate in this process, or in the processes of ``SAM2UNET_TRAIN_DEVICES``
    (over several machines with ``cluster``); returns the outcome and the trained model."""
    from sam2unet.distributed import launcher  # imports torch

    settings, current = rnd.settings, rnd.current
    data = (current, rnd.train_data, rnd.val_data, rnd.cfg)
    plan = launcher.parse_devices(settings.train_devices)
    spread = None
    if cluster is not None and settings.train_nodes > 1:
        spread = cluster(
            RoundPlan(
                rnd.parent,
                rnd.project,
                list(rnd.labels),
                rnd.train_ids,
                rnd.val_ids,
                rnd.cfg.to_dict(),
            )
        )
        plan = machine_plan(settings)
    if plan is None:
        local = SimpleNamespace(progress=progress, should_stop=should_stop)
        outcome = train_and_evaluate(settings.device, local, *data, False)
        return outcome, outcome.model
    outcome = launcher.launch(
        train_and_evaluate,
        data,
        plan,
        threads=settings.torch_threads,
        progress=progress,
        should_stop=should_stop,
        cluster=spread,
    )
    model = copy.deepcopy(current.model)
    bad = model.load_state_dict(outcome.weights, strict=False).unexpected_keys
    if bad:
        raise RuntimeError(f"the trained weights do not fit the model: {bad[:5]}")
    return outcome, model


def _decide(rnd: _Round, report: RoundReport, outcome: RoundOutcome) -> Any:
    """The paired bootstrap of candidate against current on the held-out images; the report
    takes both versions' metrics, the training history and the decision."""
    metric, settings = rnd.metric, rnd.settings
    report.current_metrics = outcome.current_metrics
    report.history = outcome.history
    report.candidate_metrics = outcome.candidate_metrics
    decision = paired_bootstrap(
        [m[metric] for m in outcome.candidate_images],
        [m[metric] for m in outcome.current_images],
        metric=metric,
        confidence=settings.promote_confidence,
        tolerance=settings.promote_tolerance,
        lower_is_better=metric in LOWER_IS_BETTER,
        seed=len(rnd.ids),
    )
    report.decision = decision.to_json()
    return decision


def _keep_candidate(
    registry: ModelRegistry, rnd: _Round, report: RoundReport, model: Any, promote: bool
) -> VersionInfo:
    """Keep the candidate as a version with its metrics and training plot, promoted or not."""
    png = safe_training_png(report, promote)
    info = registry.create_version(
        model,
        rnd.current.config,
        rnd.current.base,
        parent=rnd.parent,
        source=f"round:project-{rnd.project}" if rnd.project is not None else "round",
        metrics={
            "val": report.candidate_metrics,
            "parent_val": report.current_metrics,
            "val_size": len(rnd.val_ids),
            "promoted": promote,
            "decision": report.decision,
        },
        train_size=len(rnd.train_ids),
        note=rnd.reason or "",
        extra_files={TRAINING_PNG: png} if png else None,
    )
    report.candidate = info.name
    return info


def _promote(
    registry: ModelRegistry,
    rnd: _Round,
    report: RoundReport,
    info: VersionInfo,
    start: Any,
    decision: Any,
) -> None:
    """Flip the pointer to the candidate when the decision says so and the current version
    is still the round's parent (else the candidate is superseded)."""
    metric = rnd.metric
    cand, cur = report.candidate_metrics[metric], report.current_metrics[metric]
    report.reason = f"{metric}: candidate {cand:.4f}, current {cur:.4f}; {decision.describe()}"
    if not decision.promote:
        report.status = "rejected"
    elif registry.promote_from(
        info.name, start, reason=f"{metric} {cand:.4f} vs {cur:.4f}", metrics={metric: cand}
    ):
        report.status = "promoted"
    else:
        report.status = "superseded"
        report.reason = (
            f"trained from {rnd.parent}, but the current version became {registry.current()} "
            f"during the round: not promoted; {report.reason}"
        )


def _prompts_note(counts: dict[str, Any]) -> str:
    """``; 2 sample(s) with masks derived from prompts, 1 annotation(s) ...`` or ""."""
    parts = []
    if counts.get("derived"):
        parts.append(f"{counts['derived']} sample(s) with masks derived from smart prompts")
    if counts.get("skipped"):
        parts.append(
            f"{counts['skipped']} annotation(s) holding smart prompts but no mask not used"
        )
    return "; " + ", ".join(parts) if parts else ""
