"""The crop-and-segment answer to interactive prompts (parsed by :mod:`worker.prompt_parsing`) around a
promptless model.

SAM2-UNet takes no prompts, so an interactive call's context (Label Studio's ``params.context``,
``{"result": [...]}``) is applied around the model:

* **Rectangles** (``rectanglelabels`` / ``rectangle``): the model runs on a crop of each box
  widened by a margin (``BOX_MARGIN`` of the box side, at least ``MIN_MARGIN_PX``, clipped to the
  image), so that the object fills the model's input. The crop's prediction is pasted back into
  a full-size zero map and kept only inside the box. Several boxes are united (maximum).
  ``value.rotation`` (degrees, clockwise about the box's top-left corner, as Label Studio draws
  it) is honoured: the crop covers the rotated box's bounds and only its inside is kept.
* **Keypoints** (``keypointlabels`` / ``keypoint``; ``is_positive`` defaults to true) refine the
  prediction: of the whole image, or of the boxes when there are boxes (then nothing outside the
  boxes is ever returned). The prediction is thresholded and split into 8-connected components.
  Positive points select the components containing them; negative points remove theirs (from the
  selection, or, with only negative points, from the box's mask; negative points with no box
  and no positive point of their object were dropped when parsed, see
  :func:`worker.prompt_parsing.drop_lone_negatives`: no mask for them). A component holding both a
  positive and a negative point is split: its pixels nearer to a negative point are removed. A
  positive point on background falls back to a square crop around it (``FALLBACK_FRACTION`` of the
  image's shorter side, at least ``MIN_FALLBACK_PX``): the model runs on that crop and the crop's
  component containing the point, or failing that the one nearest to it, is added.
* **Channels**: the output keeps the model's K channels. A prompt whose label names a channel
  (``channels``, as from :func:`labelstudio.prompts.label_channels`) acts on that channel only; a
  prompt without a label, or with a label no channel has, acts on every channel. Channels that
  no prompt acts on are zeroed. Removed areas are zero, kept areas keep the model's
  probabilities, so the result encodes like any prediction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from worker.prompt_parsing import Box, Point, Prompts, parse_context

log = logging.getLogger(__name__)

#: Images in, per image a K x h x w float32 probability map at that image's size.
PredictFn = Callable[[list[np.ndarray]], list[np.ndarray]]

BOX_MARGIN = 0.10
MIN_MARGIN_PX = 8
FALLBACK_FRACTION = 0.25
MIN_FALLBACK_PX = 32


def _crop_window(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box.bounds(height, width)
    mx = max(MIN_MARGIN_PX, math.ceil(BOX_MARGIN * (x1 - x0)))
    my = max(MIN_MARGIN_PX, math.ceil(BOX_MARGIN * (y1 - y0)))
    return max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, width), min(y1 + my, height)


def _point_window(point: Point, height: int, width: int) -> tuple[int, int, int, int]:
    side = max(MIN_FALLBACK_PX, round(FALLBACK_FRACTION * min(height, width)))
    sw, sh = min(side, width), min(side, height)
    x0 = min(max(round(point.x - sw / 2), 0), width - sw)
    y0 = min(max(round(point.y - sh / 2), 0), height - sh)
    return x0, y0, x0 + sw, y0 + sh


def _split(
    component: np.ndarray,
    positives: Sequence[tuple[int, int]],
    negatives: Sequence[tuple[int, int]],
) -> np.ndarray:
    """The pixels of ``component`` (H x W bool) nearer to a positive than to a negative point."""
    ys, xs = np.nonzero(component)
    coords = np.stack([ys, xs], axis=1).astype(np.float32)

    def nearest(pts: Sequence[tuple[int, int]]) -> np.ndarray:
        d = coords[:, None, :] - np.asarray(pts, dtype=np.float32)[None, :, :]
        return (d**2).sum(axis=2).min(axis=1)

    keep = nearest(positives) < nearest(negatives)
    out = np.zeros_like(component)
    out[ys[keep], xs[keep]] = True
    return out


def _apply_negatives(
    keep: np.ndarray,
    labels: np.ndarray,
    positives: list[tuple[int, int]],
    negatives: list[tuple[int, int]],
) -> None:
    """Remove (in place) from ``keep`` the parts of the components holding negative points."""
    for c in {labels[p] for p in negatives} - {0}:
        component = labels == c
        pos_here = [p for p in positives if labels[p] == c]
        neg_here = [p for p in negatives if labels[p] == c]
        keep &= ~component
        if pos_here:
            keep |= _split(component, pos_here, neg_here)


@dataclass
class _Stats:
    fallbacks: int = 0
    fallback_empty: int = 0
    calls: int = 0
    crops: dict[tuple[float, float], tuple[tuple[int, int, int, int], np.ndarray]] = field(
        default_factory=dict
    )


def _fallback(
    image: np.ndarray, point: Point, k: int, threshold: float, predict_fn: PredictFn, stats: _Stats
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Segment a crop around ``point``; (window, h x w probabilities of the chosen component)."""
    height, width = image.shape[:2]
    key = (point.x, point.y)
    if key not in stats.crops:  # one model call per point, shared by the channels
        window = _point_window(point, height, width)
        x0, y0, x1, y1 = window
        stats.crops[key] = (window, predict_fn([image[y0:y1, x0:x1]])[0])
        stats.calls += 1
    window, prob = stats.crops[key]
    x0, y0, x1, y1 = window
    mask = prob[k] >= threshold
    if not mask.any():
        return None
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    row, col = point.pixel(height, width)
    row, col = row - y0, col - x0
    chosen = labels[row, col]
    if chosen == 0:  # the nearest component to the point
        ys, xs = np.nonzero(mask)
        i = int(np.argmin((ys - row) ** 2 + (xs - col) ** 2))
        chosen = labels[ys[i], xs[i]]
    return window, np.where(labels == chosen, prob[k], 0.0).astype(np.float32)


def _refine(
    image: np.ndarray,
    prob: np.ndarray,
    points: Sequence[Point],
    k: int,
    threshold: float,
    predict_fn: PredictFn,
    region: np.ndarray | None,
    stats: _Stats,
) -> np.ndarray:
    """One channel (H x W) refined by its points; ``region`` (H x W bool) bounds any addition."""
    height, width = prob.shape
    mask = prob >= threshold
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    pos = [p.pixel(height, width) for p in points if p.positive]
    neg = [p.pixel(height, width) for p in points if not p.positive]
    selected = sorted({labels[p] for p in pos} - {0})
    keep = np.isin(labels, selected) if pos else mask.copy()
    _apply_negatives(keep, labels, pos, neg)
    out = np.where(keep, prob, 0.0).astype(np.float32)
    for point in points:
        if not point.positive or labels[point.pixel(height, width)] != 0:
            continue
        stats.fallbacks += 1
        found = _fallback(image, point, k, threshold, predict_fn, stats)
        if found is None:
            stats.fallback_empty += 1
            continue
        (x0, y0, x1, y1), part = found
        added = np.zeros_like(out)
        added[y0:y1, x0:x1] = part
        if region is not None:
            added[~region] = 0.0
        added_mask = added >= threshold
        _, added_labels = cv2.connectedComponents(added_mask.astype(np.uint8), connectivity=8)
        added_keep = added_mask.copy()
        _apply_negatives(added_keep, added_labels, pos, neg)
        out = np.maximum(out, np.where(added_keep | ~added_mask, added, 0.0))
    return out


def _channels_of(label: str | None, by_label: Mapping[str, int], k_total: int) -> list[int]:
    if label is not None and label in by_label:
        return [by_label[label]]
    return list(range(k_total))


def segment_with_prompts(
    image: np.ndarray,
    prompts: Prompts,
    predict_fn: PredictFn,
    threshold: float = 0.5,
    channels: Sequence[tuple[int, str]] | None = None,
) -> tuple[np.ndarray, str]:
    """Apply parsed prompts (see the module docstring) to one image.

    Args:
        image: H x W x 3 uint8 RGB.
        prompts: from :func:`parse_context` for this image's size.
        predict_fn: images -> per image K x h x w float32 probabilities at its size.
        threshold: probability at or above which a pixel is foreground.
        channels: (channel index, label) pairs routing labelled prompts to channels.

    Returns:
        (K x H x W float32 probabilities, a short description for logging). Without any prompt
        this is the model's plain prediction of the whole image.
    """
    height, width = image.shape[:2]
    by_label = {name: k for k, name in channels or ()}
    stats = _Stats()
    if not prompts:
        prob = predict_fn([image])[0]
        return prob, f"no prompts ({prompts.ignored} items ignored): whole image"

    region: np.ndarray | None = None
    if prompts.boxes:
        windows = [_crop_window(b, height, width) for b in prompts.boxes]
        crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
        preds = predict_fn(crops)
        stats.calls += 1
        k_total = preds[0].shape[0]
        base = np.zeros((k_total, height, width), dtype=np.float32)
        region = np.zeros((k_total, height, width), dtype=bool)
        for box, window, pred in zip(prompts.boxes, windows, preds, strict=True):
            x0, y0, x1, y1 = window
            inside = box.inside(window)
            for k in _channels_of(box.label, by_label, k_total):
                kept = np.where(inside, pred[k], 0.0)
                np.maximum(base[k, y0:y1, x0:x1], kept, out=base[k, y0:y1, x0:x1])
                region[k, y0:y1, x0:x1] |= inside
    else:
        base = np.asarray(predict_fn([image])[0], dtype=np.float32)
        stats.calls += 1
        k_total = base.shape[0]

    out = np.zeros_like(base)
    for k in range(k_total):
        points = [p for p in prompts.points if k in _channels_of(p.label, by_label, k_total)]
        if points:
            bound = region[k] if region is not None else None
            out[k] = _refine(image, base[k], points, k, threshold, predict_fn, bound, stats)
        elif region is not None:
            out[k] = base[k]

    n_pos = sum(p.positive for p in prompts.points)
    parts = [f"{len(prompts.boxes)} box(es)", f"points +{n_pos}/-{len(prompts.points) - n_pos}"]
    if stats.fallbacks:
        parts.append(f"{stats.fallbacks} crop fallback(s), {stats.fallback_empty} empty")
    if prompts.ignored:
        parts.append(f"{prompts.ignored} item(s) ignored")
    if prompts.dropped:
        parts.append(f"{prompts.dropped} lone negative click(s) dropped")
    parts.append(f"{stats.calls} model call(s)")
    parts.append(f"{int((out >= threshold).sum())} foreground px")
    return out, ", ".join(parts)


def apply_prompts(
    image: np.ndarray,
    context: Any,
    predict_fn: PredictFn,
    threshold: float = 0.5,
    *,
    channels: Sequence[tuple[int, str]] | None = None,
    to_name: str | None = None,
) -> tuple[np.ndarray, str]:
    """Label Studio's interactive context applied to one image (H x W x 3 uint8 RGB).

    Returns (K x H x W float32 probabilities, a short description for logging); raises
    :class:`contracts.errors.BadRequest` for a malformed context. See :func:`parse_context`
    and :func:`segment_with_prompts`.
    """
    height, width = image.shape[:2]
    prompts = parse_context(context, height, width, to_name)
    return segment_with_prompts(image, prompts, predict_fn, threshold, channels)
