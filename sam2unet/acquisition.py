"""Acquisition: how useful a label for an image would be, and which images to label next.

Four strategies (:data:`STRATEGIES`):

* ``random``: no preference; a task's score is a fixed pseudo-random number of its key.
* ``confidence``: the model's class-balanced confidence in its own mask (the mean probability
  over the predicted foreground and the mean of ``1 - p`` over the background, averaged with
  equal weight), as every prediction has carried so far. Uncertainty ``u = 2 (1 - c)``.
* ``tta``: disagreement between test-time-augmented passes (identity, horizontal flip,
  vertical flip, content shrunk to :data:`SHRINK` of the side and padded), all in one batched
  forward. Per label, ``1 - mean soft IoU`` of each pass with the passes' mean map; a model
  that answers the same whatever the flip or scale scores 0.
* ``diverse``: confidence uncertainty plus pooled trunk features (the coarsest Hiera stage,
  averaged over space, taken from the same forward pass). A batch of K picks the
  :data:`CANDIDATES` x K most uncertain images, then k-center-greedy over their features
  (each next pick is the candidate farthest from every image already picked or labelled), so
  that K suggestions are not K near-duplicates; an image whose features equal an image already
  picked is never picked again. :func:`run_order` ranks a whole pool so, batch after batch.

Every uncertainty lies in [0, 1], higher meaning more useful to label. :func:`sort_score`
turns it into the prediction score written to Label Studio: ``1 - u``, so that sorting by
prediction score ascending lists the tasks to label next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sam2unet.exceptions import ConfigError

if TYPE_CHECKING:
    import torch

STRATEGIES: tuple[str, ...] = ("random", "confidence", "tta", "diverse")
#: Side of the shrunk pass's content, as a share of the network input side.
SHRINK = 0.8125
#: The diversity strategy chooses among this many times K of the most uncertain images.
CANDIDATES = 4
PASSES: tuple[str, ...] = ("identity", "hflip", "vflip", "shrink")


def check_strategy(name: str) -> str:
    """``name`` if it is a known strategy, else ConfigError."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown acquisition strategy {name!r}; known: {list(STRATEGIES)}")
    return name


@dataclass
class Acquired:
    """The prediction of one image (``prob``: K x H x W at the image's size) with its
    acquisition uncertainty in [0, 1] and, for ``diverse``, its pooled trunk feature."""

    prob: np.ndarray
    uncertainty: float
    feature: np.ndarray | None = None


# ------------------------------------------------------------------------------ pure scores


def balanced_confidence(prob: np.ndarray, fg: np.ndarray) -> float:
    """Class-balanced decision confidence of one H x W map and its mask, in [0, 1]."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    parts = []
    if fg.any():
        parts.append(float(p[fg].mean()))
    if not fg.all():
        parts.append(float(1.0 - p[~fg].mean()))
    return float(np.clip(sum(parts) / len(parts), 0.0, 1.0))


def prediction_score(prob: np.ndarray, mask: np.ndarray) -> float:
    """Confidence of a binary segmentation, in [0, 1].

    The class-balanced mean decision confidence: the mean of ``p`` over the predicted
    foreground and the mean of ``1 - p`` over the predicted background, averaged with equal
    weight (when one side is empty, the other side's mean alone). Balancing keeps a small,
    uncertain object from being hidden by a large, confidently empty background, and an
    empty mask predicted from probabilities near 0 scores near 1 (a confident "nothing
    here"), not 0. With a 0.5 threshold the score lies in [0.5, 1]; lower means more
    uncertain, which is what active learning ranks by.

    Args:
        prob: ``H x W`` foreground probabilities in [0, 1] (values outside are clipped).
        mask: ``H x W`` predicted mask, non-zero is foreground (usually ``prob >= threshold``).

    Raises:
        ValueError: shapes differ, the arrays are empty, or ``prob`` has NaNs.
    """
    p = np.asarray(prob, dtype=np.float64)
    fg = np.asarray(mask)
    if fg.ndim != 2 or fg.shape[0] == 0 or fg.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {fg.shape}")
    fg = fg.astype(bool, copy=False)
    if p.shape != fg.shape:
        raise ValueError(f"prob shape {p.shape} differs from mask shape {fg.shape}")
    if np.isnan(p).any():
        raise ValueError("prob contains NaN")
    return balanced_confidence(p, fg)


def confidence_uncertainty(prob: np.ndarray, threshold: float = 0.5) -> float:
    """``2 (1 - c)`` averaged over labels, ``c`` the balanced confidence of a K x H x W map:
    0 for a map of 0s and 1s, 1 for a map of 0.5s (clipped to [0, 1])."""
    p = np.asarray(prob)
    if p.ndim == 2:
        p = p[None]
    c = [balanced_confidence(p[k], p[k] >= threshold) for k in range(p.shape[0])]
    return float(np.clip(2.0 * (1.0 - np.mean(c)), 0.0, 1.0))


def soft_iou(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """sum(min) / sum(max) of two maps in [0, 1]; 1 when both are (nearly) empty."""
    union = float(np.maximum(a, b).sum())
    return 1.0 if union < eps else float(np.minimum(a, b).sum()) / union


def tta_disagreement(passes: np.ndarray) -> float:
    """Disagreement of T aligned passes (T x K x H x W probabilities): per label,
    ``1 - mean_t softIoU(p_t, mean_t p_t)``, averaged over labels. 0 when all passes agree."""
    p = np.asarray(passes, dtype=np.float64)
    if p.ndim == 3:
        p = p[:, None]
    if p.ndim != 4 or p.shape[0] < 2:
        raise ValueError(f"expected T x K x H x W with T >= 2, got shape {p.shape}")
    mean = p.mean(axis=0)
    per_label = [
        1.0 - float(np.mean([soft_iou(p[t, k], mean[k]) for t in range(p.shape[0])]))
        for k in range(p.shape[1])
    ]
    return float(np.clip(np.mean(per_label), 0.0, 1.0))


def random_uncertainty(key: str) -> float:
    """A fixed pseudo-random number in [0, 1) of ``key`` (e.g. project, version and task)."""
    h = hashlib.sha256(f"acquisition:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def sort_score(uncertainty: float) -> float:
    """The prediction score of an uncertainty: ascending scores list the most useful first."""
    return float(np.clip(1.0 - uncertainty, 0.0, 1.0))


# ------------------------------------------------------------------------------ selection


def k_center_greedy(
    features: np.ndarray,
    k: int,
    first: int | None = 0,
    centres: np.ndarray | None = None,
    eps: float = 1e-9,
) -> list[int]:
    """Up to ``k`` row indices of ``features`` (N x D), each the farthest (Euclidean) from
    every earlier pick and every row of ``centres``; starts at ``first`` when no centre is
    given. A row at distance <= ``eps`` from a pick or centre (a duplicate) is never picked,
    so fewer than ``k`` come back when there are fewer distinct rows."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if n == 0 or k <= 0:
        return []
    dist = np.full(n, np.inf)
    if centres is not None and len(centres):
        c = np.asarray(centres, dtype=np.float64)
        dist = np.min(np.linalg.norm(x[:, None, :] - c[None, :, :], axis=2), axis=1)
    picks: list[int] = []
    while len(picks) < min(k, n):
        if not picks and np.isinf(dist).all():
            i = int(first or 0)
        else:
            i = int(np.argmax(dist))
            if dist[i] <= eps:
                break
        picks.append(i)
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
        dist[i] = -1.0
    return picks


def select(
    strategy: str,
    uncertainty: Sequence[float],
    k: int,
    *,
    features: np.ndarray | None = None,
    labelled_features: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Indices of the ``k`` images to label next, most useful first."""
    check_strategy(strategy)
    u = np.asarray(uncertainty, dtype=np.float64)
    n = len(u)
    k = min(int(k), n)
    if strategy == "random":
        rng = rng if rng is not None else np.random.default_rng()
        return [int(i) for i in rng.permutation(n)[:k]]
    order = np.argsort(-u, kind="stable")
    if strategy != "diverse":
        return [int(i) for i in order[:k]]
    if features is None or len(features) != n:
        raise ConfigError("the diverse strategy needs one feature vector per image")
    feats = np.asarray(features, dtype=np.float64)
    cand = order[: max(k, CANDIDATES * k)]
    picks = [int(cand[i]) for i in k_center_greedy(feats[cand], k, 0, labelled_features)]
    if len(picks) < k:  # too few distinct candidates: the next most uncertain distinct ones
        for i in order[len(cand) :]:
            if len(picks) == k:
                break
            if not picks or np.min(np.linalg.norm(feats[picks] - feats[i], axis=1)) > 1e-9:
                picks.append(int(i))
    return picks


def run_order(
    uncertainty: Sequence[float],
    features: np.ndarray,
    batch: int,
    *,
    labelled_features: np.ndarray | None = None,
    depth: int | None = None,
    eps: float = 1e-9,
) -> list[int]:
    """A permutation of a whole pool (N images), most useful first, for ``diverse``: batch
    after batch of ``batch`` images, each chosen as :func:`select` chooses (k-center-greedy
    among the ``CANDIDATES x batch`` most uncertain images not yet ranked, then the next most
    uncertain distinct ones) with the labelled images and every image ranked before as centres,
    so that any window of ``batch`` consecutive ranks is uncertain and spread out. The first
    ``depth`` ranks (default: all) are ranked so; the rest follow by uncertainty. Only the
    ``depth + CANDIDATES x batch`` most uncertain images can ever be candidates, and each pick
    updates their distance to the centres once: O((depth + CANDIDATES x batch) x depth x D)
    work and one such float32 matrix of memory, whatever N."""
    u = np.asarray(uncertainty, dtype=np.float64)
    n = len(u)
    if features is None or len(features) != n:
        raise ConfigError("the diverse strategy needs one feature vector per image")
    batch = max(1, int(batch))
    depth = n if depth is None else max(0, min(int(depth), n))
    by_u = [int(i) for i in np.argsort(-u, kind="stable")]
    pool = by_u[: min(n, depth + CANDIDATES * batch)]  # by uncertainty
    x = np.asarray(np.asarray(features)[pool], dtype=np.float32)
    mind = np.full(len(pool), np.inf, dtype=np.float64)  # distance to the nearest centre
    if labelled_features is not None and len(labelled_features):
        for c in np.asarray(labelled_features, dtype=np.float32).reshape(-1, x.shape[1]):
            mind = np.minimum(mind, np.linalg.norm(x - c, axis=1))
    free = np.ones(len(pool), dtype=bool)
    ranked: list[int] = []

    def take(j: int) -> None:
        nonlocal mind
        ranked.append(j)
        free[j] = False
        mind = np.minimum(mind, np.linalg.norm(x - x[j], axis=1))

    while len(ranked) < min(depth, len(pool)):
        k = min(batch, depth - len(ranked))
        rest = np.flatnonzero(free)
        cand = rest[: max(k, CANDIDATES * k)]
        picked = 0
        while picked < k:  # k-center-greedy over the candidates
            d = np.where(free[cand], mind[cand], -1.0)
            j = int(cand[0]) if np.isinf(d).all() else int(cand[int(np.argmax(d))])
            if not np.isinf(d).all() and mind[j] <= eps:
                break  # only duplicates of centres or picks are left among the candidates
            take(j)
            picked += 1
        start = len(ranked) - picked
        for j in rest[len(cand) :]:  # too few distinct candidates: the next distinct ones
            if picked == k:
                break
            if picked == 0 or np.min(np.linalg.norm(x[ranked[start:]] - x[j], axis=1)) > eps:
                take(int(j))
                picked += 1
        if picked == 0:  # everything left duplicates a centre: uncertainty decides
            for j in np.flatnonzero(free)[:k]:
                take(int(j))
    order = [pool[j] for j in ranked]
    seen = set(order)
    return order + [i for i in by_u if i not in seen]


# ------------------------------------------------------------------------------ model passes


def _pooled_hook(model: torch.nn.Module, store: list[torch.Tensor]):
    """Keep the coarsest encoder stage, averaged over space, of each forward."""

    def hook(_module, _inputs, output):
        store.append(output[-1].float().mean(dim=(2, 3)))

    return model.encoder.register_forward_hook(hook)


def _augment(x: torch.Tensor, side: int) -> torch.Tensor:
    """B x 3 x S x S -> 4B x 3 x S x S: identity, hflip, vflip, shrunk-and-padded."""
    # torch: only when predicting; the settings and the backend read this module's names
    import torch
    import torch.nn.functional as F

    s = x.shape[-1]
    small = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    o = (s - side) // 2
    shrunk = torch.zeros_like(x)  # 0 is the mean colour after normalisation
    shrunk[:, :, o : o + side, o : o + side] = small
    return torch.cat([x, x.flip(-1), x.flip(-2), shrunk])


def _unaugment(p: torch.Tensor, b: int, side: int) -> torch.Tensor:
    """4B x K x S x S pass outputs -> 4 x B x K x S x S aligned with the identity pass."""
    # torch: only when predicting; the settings and the backend read this module's names
    import torch
    import torch.nn.functional as F

    s = p.shape[-1]
    ident, hf, vf, sh = p[:b], p[b : 2 * b].flip(-1), p[2 * b : 3 * b].flip(-2), p[3 * b :]
    o = (s - side) // 2
    sh = F.interpolate(sh[:, :, o : o + side, o : o + side], size=(s, s), mode="bilinear")
    return torch.stack([ident, hf, vf, sh])


def acquire(
    predictor,
    images: Sequence[np.ndarray],
    strategy: str,
    *,
    threshold: float = 0.5,
    keys: Sequence[str] | None = None,
) -> list[Acquired]:
    """Predict ``images`` with ``predictor`` (a :class:`sam2unet.predictor.Predictor`) and score
    each for ``strategy``. The identity pass is the prediction (the same numbers as
    ``predictor.predict``); ``tta`` adds its augmented passes to the same forward batch;
    ``diverse`` keeps the pooled trunk feature of that pass. ``keys`` seed the ``random``
    scores (default: the image's position)."""
    # torch: only when predicting; the settings and the backend read this module's names
    import torch

    check_strategy(strategy)
    with torch.inference_mode():
        return _acquire(predictor, images, strategy, threshold, keys)


def _acquire(predictor, images, strategy, threshold, keys) -> list[Acquired]:
    # torch, Pillow (through transforms): only when predicting; the settings and the backend
    # read this module's names
    import torch
    import torch.nn.functional as F

    from sam2unet.transforms import preprocess

    if strategy in ("random", "confidence"):
        probs = predictor.predict(images)
        out = []
        for i, p in enumerate(probs):
            if strategy == "random":
                u = random_uncertainty(keys[i] if keys is not None else str(i))
            else:
                u = confidence_uncertainty(p, threshold)
            out.append(Acquired(p, u))
        return out
    size = predictor.config.image_size
    side = max(32, round(size * SHRINK))
    store: list[torch.Tensor] = []
    handle = _pooled_hook(predictor.model, store) if strategy == "diverse" else None
    out = []
    try:
        for start in range(0, len(images), predictor.batch_size):
            chunk = images[start : start + predictor.batch_size]
            shapes = [np.asarray(im).shape[:2] for im in chunk]
            x = torch.from_numpy(np.stack([preprocess(im, size) for im in chunk]))
            b = len(chunk)
            if strategy == "tta":
                passes = _unaugment(predictor.forward_batch(_augment(x, side)), b, side)
                ident = passes[0]
            else:
                store.clear()
                ident = predictor.forward_batch(x)
            for i, (h, w) in enumerate(shapes):
                p = ident[i : i + 1]
                if (h, w) != (size, size):
                    p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
                prob = p[0].clamp_(0, 1).cpu().numpy()
                if strategy == "tta":
                    u = tta_disagreement(passes[:, i].cpu().numpy())
                    out.append(Acquired(prob, u))
                else:
                    feat = store[-1][i].cpu().numpy().astype(np.float32)
                    out.append(Acquired(prob, confidence_uncertainty(prob, threshold), feat))
    finally:
        if handle is not None:
            handle.remove()
    return out
