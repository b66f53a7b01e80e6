"""Promotion decisions that hold up on small held-out sets.

* :func:`assign_sides`: which annotated tasks are held out. A task's side is decided once, the
  first time a round sees it, and kept in every later round (the trainer stores the sides
  next to the project's training data), so no held-out label is ever trained on and no label
  a version was trained on is ever used to evaluate it. A new task is held out when a stable
  hash of its id falls below the held-out share (``SAM2UNET_TRAIN_HOLDOUT``); while fewer than
  ``SAM2UNET_HOLDOUT_MIN`` tasks are held out, new tasks are held out first (never more than
  half of the tasks, so that something is left to train on).
* :func:`paired_bootstrap`: the candidate and the current version are scored on the same
  held-out images; the per-image differences are resampled (paired bootstrap) and the
  candidate is promoted when the lower bound of the one-sided ``SAM2UNET_PROMOTE_CONFIDENCE``
  interval of the mean difference is at least ``-SAM2UNET_PROMOTE_TOLERANCE``: "not worse by
  more than the tolerance, with that confidence".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

TRAIN, VAL = "train", "val"
BOOTSTRAP_SAMPLES = 4000


def bucket(task: int, salt: str = "sam2unet") -> float:
    """A stable number in [0, 1) of a task id."""
    h = hashlib.sha256(f"{salt}:{task}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_sides(
    task_ids: Sequence[int],
    fraction: float,
    minimum: int = 0,
    previous: Mapping[int, str] | None = None,
    salt: str = "sam2unet",
) -> dict[int, str]:
    """Each task's side (``"train"`` or ``"val"``): sides in ``previous`` are kept; new tasks
    are held out by hash below ``fraction``, then the new tasks with the lowest hashes are
    moved to the held-out side until ``min(minimum, len(task_ids) // 2)`` are held out. With no
    previous sides and two or more tasks, at least one task goes each way."""
    previous = previous or {}
    ids = [int(t) for t in task_ids]
    sides = {t: previous[t] for t in ids if previous.get(t) in (TRAIN, VAL)}
    new = sorted((t for t in ids if t not in sides), key=lambda t: bucket(t, salt))
    for t in new:
        sides[t] = VAL if bucket(t, salt) < fraction else TRAIN
    want = min(int(minimum), len(ids) // 2)
    held = sum(1 for t in ids if sides[t] == VAL)
    for t in new:
        if held >= want:
            break
        if sides[t] == TRAIN:
            sides[t], held = VAL, held + 1
    if not previous and len(ids) >= 2:
        if held == 0:
            sides[new[0]] = VAL
        elif held == len(ids):
            sides[new[-1]] = TRAIN
    return sides


@dataclass
class PairedDecision:
    """The paired comparison of candidate and current version on the same held-out images.
    ``mean``, ``low`` and ``high`` are differences candidate - current, signed so that
    positive is better; [low, high] is the two-sided interval at ``2 * confidence - 1``,
    ``low`` the one-sided bound at ``confidence`` that the rule uses."""

    metric: str
    n: int
    mean: float
    low: float
    high: float
    confidence: float
    tolerance: float
    promote: bool

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}  # fmt: skip

    def describe(self) -> str:
        return (
            f"{self.metric} difference {self.mean:+.4f} "
            f"({self.confidence:.0%} lower bound {self.low:+.4f}, tolerance {self.tolerance:.4f},"
            f" {self.n} image(s))"
        )


def paired_bootstrap(
    candidate: Sequence[float],
    current: Sequence[float],
    *,
    metric: str = "miou",
    confidence: float = 0.9,
    tolerance: float = 0.0,
    lower_is_better: bool = False,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> PairedDecision:
    """Decide promotion from per-image metric values of both models on the same images.

    The candidate is promoted when the ``confidence`` lower bound of the mean per-image
    difference (bootstrap percentile) is ``>= -tolerance``. A candidate with a NaN value is
    never promoted; no images at all decides nothing and does not promote."""
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(current, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two equal-length 1-D sequences, got {a.shape} and {b.shape}")
    d = (b - a) if lower_is_better else (a - b)
    nan = float("nan")
    if len(d) == 0 or np.isnan(a).any():
        return PairedDecision(metric, len(d), nan, nan, nan, confidence, tolerance, False)
    if np.isnan(b).any():  # the current version has no valid score: anything valid is better
        return PairedDecision(metric, len(d), nan, nan, nan, confidence, tolerance, True)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    low = float(np.quantile(means, 1.0 - confidence))
    high = float(np.quantile(means, confidence))
    promote = low >= -tolerance - 1e-12
    return PairedDecision(
        metric, len(d), float(d.mean()), low, high, confidence, tolerance, bool(promote)
    )
