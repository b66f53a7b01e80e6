"""Masks to and from Label Studio results: brush RLE, polygons, result items.

Conventions:

- A mask is a 2-D ``H x W`` array; any non-zero value is foreground. Functions return ``bool``
  masks.
- Brush RLE is Label Studio's bit-packed format for an ``H x W x 4`` RGBA image flattened in
  row-major order (label-studio-sdk ``converter.brush``), not COCO RLE. Foreground pixels are
  encoded as ``(255, 255, 255, 255)``; on decoding, the alpha channel decides (alpha >= 128),
  so anti-aliased strokes drawn in the Label Studio editor keep their solid part.
- Polygon points are percentages of the image size, ``[[x%, y%], ...]`` with
  ``x% = x / width * 100`` where ``x`` is a pixel column index (and likewise ``y`` with rows).
  Going back, ``x = round(x% * width / 100)`` and the polygon is filled including its boundary
  (``cv2.fillPoly``), so pixel-index vertices survive a round trip exactly.
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from contracts.errors import AnnotationFormatError, LabelConfigError
from labelstudio.labelconfig import Target

logger = logging.getLogger(__name__)

_ID_ALPHABET = string.ascii_letters + string.digits
#: Length of generated result ids: 62**10 (about 8e17) possibilities.
RESULT_ID_LENGTH = 10
#: Alpha value from which a decoded brush pixel counts as foreground.
ALPHA_THRESHOLD = 128
#: Largest image (in pixels) whose brush RLE is decoded: a guard against absurd sizes.
MAX_PIXELS = 10**8
#: Decimal places kept for polygon percentages (1e-4 % of a 10 000 px side is 0.01 px).
PERCENT_DECIMALS = 4


def new_result_id() -> str:
    """A random result id of ``RESULT_ID_LENGTH`` letters and digits, like Label Studio's."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(RESULT_ID_LENGTH))


def _check_mask(mask: np.ndarray) -> np.ndarray:
    """Return ``mask`` as an ``H x W`` bool array, or raise ValueError."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


# --- brush RLE -------------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a mask as Label Studio brush RLE.

    Args:
        mask: ``H x W`` array; non-zero is foreground.

    Returns:
        The RLE bytes as a list of ints in 0..255, for ``value.rle`` of a brushlabels result.
    """
    return _encode_rle(_check_mask(mask).astype(np.uint8) * np.uint8(255), repeat=4)


# (value, bits) after the 32-bit value count: word size - 1, then each run-length field size - 1
_RLE_HEADER = ((7, 5), (2, 4), (3, 4), (7, 4), (15, 4))


def _bit_array(codes: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """The low ``lengths[i]`` bits of each ``codes[i]``, most significant first, concatenated
    (a 1-D uint8 array of 0/1); every length is at most ``width``."""
    aligned = codes.astype(np.int64) << (width - lengths.astype(np.int64))
    bits = (aligned[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return bits[np.arange(width) < lengths[:, None]].astype(np.uint8)


def _encode_rle(values: np.ndarray, repeat: int) -> list[int]:
    """Label Studio brush RLE of ``values`` (uint8, flattened) with each value repeated
    ``repeat`` times, byte for byte what label-studio-sdk's ``converter.brush.encode_rle``
    writes (8-bit words; run-length fields of 3, 4, 8 and 16 bits; runs longer than 256
    values in chunks of 65536; zero padding of 1 to 8 bits), computed with numpy per run
    instead of per bit in Python."""
    flat = np.asarray(values, dtype=np.uint8).ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    runs = np.diff(np.append(starts, flat.size)) * repeat
    chunks = np.where(runs > 256, (runs - 1) // 65536 + 1, 1)
    run = np.repeat(np.arange(runs.size), chunks)
    k = np.arange(run.size) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    r = runs[run]
    count = np.where(k == chunks[run] - 1, r - 65536 * k, 65536) - 1
    v = flat[starts].astype(np.int64)[run]
    codes = np.select(
        [r == 1, r <= 8, r <= 16, r <= 256],
        [
            v,
            (4 << 11) | (count << 8) | v,
            (5 << 12) | (count << 8) | v,
            (6 << 16) | (count << 8) | v,
        ],
        (7 << 24) | (count << 8) | v,
    )
    lengths = np.select([r <= 8, r <= 16, r <= 256], [14, 15, 19], 27)
    header = _bit_array(
        np.array([flat.size * repeat, *(c for c, _ in _RLE_HEADER)]),
        np.array([32, *(b for _, b in _RLE_HEADER)]),
        32,
    )
    bits = np.concatenate((header, _bit_array(codes, lengths, 27)))
    bits = np.concatenate((bits, np.zeros(8 - bits.size % 8, dtype=np.uint8)))
    return np.packbits(bits).tolist()


def rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE to a ``height x width`` bool mask.

    Args:
        rle: RLE bytes (``value.rle`` of a brushlabels result).
        height, width: image size (``original_height``, ``original_width`` of the result).

    Raises:
        AnnotationFormatError: the RLE is malformed or does not hold ``height x width x 4`` values.
    """
    if height <= 0 or width <= 0:
        raise AnnotationFormatError(f"brush image size must be positive, got {width}x{height}")
    if height * width > MAX_PIXELS:
        raise AnnotationFormatError(f"brush image {width}x{height} exceeds {MAX_PIXELS} pixels")
    if isinstance(rle, (str, bytes)) or not isinstance(rle, Sequence | np.ndarray):
        raise AnnotationFormatError("brush RLE must be a list of integers")
    try:
        data = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError):
        raise AnnotationFormatError("brush RLE must be a list of integers") from None
    if data.ndim != 1 or data.size < 7 or data.min() < 0 or data.max() > 255:
        raise AnnotationFormatError("brush RLE must be a list of at least 7 integers in 0..255")
    expected = height * width * 4
    count = int.from_bytes(bytes(data[:4].astype(np.uint8)), "big")
    if count != expected:
        raise AnnotationFormatError(
            f"brush RLE holds {count} values, expected {expected} for a {width}x{height} image"
        )
    # imported here: the converter package pulls in nltk and scipy (seconds, ~130 MB), which
    # the prediction path, encoding only, does not need
    from label_studio_sdk.converter.brush import decode_rle

    try:
        flat = decode_rle(data.tolist())
    except (ValueError, IndexError):
        raise AnnotationFormatError("brush RLE is truncated or corrupt") from None
    return flat.reshape(height, width, 4)[:, :, 3] >= ALPHA_THRESHOLD


# --- polygons --------------------------------------------------------------------------------


def pixels_to_percent(points: np.ndarray, height: int, width: int) -> list[list[float]]:
    """Convert ``N x 2`` pixel ``(x, y)`` points to Label Studio percent points ``[[x%, y%], ...]``."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    pct = np.round(pts / np.array([width, height], dtype=np.float64) * 100.0, PERCENT_DECIMALS)
    return pct.tolist()


def percent_to_pixels(points: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Convert percent points ``[[x%, y%], ...]`` to an ``N x 2`` float array of pixel ``(x, y)``."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.array([width, height], dtype=np.float64) / 100.0


def mask_to_polygons(
    mask: np.ndarray, tolerance: float = 1.0, min_area: int = 16
) -> list[list[list[float]]]:
    """Trace a mask as simplified polygons in Label Studio percent points.

    One polygon per 8-connected component, from its outer contour only: Label Studio polygons
    have no holes, so holes inside a component are filled. Components with fewer than
    ``min_area`` pixels are dropped. Each contour is simplified with ``cv2.approxPolyDP`` at
    ``tolerance`` pixels (0 keeps every contour pixel); when simplification leaves fewer than
    3 vertices the unsimplified contour is used, and zero-area outlines (1-pixel-wide lines)
    are dropped. Polygons are ordered by decreasing area.

    Args:
        mask: ``H x W`` array; non-zero is foreground.
        tolerance: maximum distance in pixels between the contour and its simplification.
        min_area: minimum component size in pixels.

    Returns:
        ``[[[x%, y%], ...], ...]``, one list of points per polygon.
    """
    fg = _check_mask(mask).astype(np.uint8)
    height, width = fg.shape
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    kept = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_area) + 1
    if kept.size == 0:
        return []
    if kept.size < count - 1:
        fg = np.isin(labels, kept).astype(np.uint8)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polygons: list[tuple[float, list[list[float]]]] = []
    for contour in contours:
        simplified = cv2.approxPolyDP(contour, tolerance, True) if tolerance > 0 else contour
        if len(simplified) < 3:
            simplified = contour
        area = cv2.contourArea(simplified)
        if len(simplified) < 3 or area <= 0:
            continue
        polygons.append((area, pixels_to_percent(simplified.reshape(-1, 2), height, width)))
    polygons.sort(key=lambda item: -item[0])
    return [points for _, points in polygons]


def polygons_to_mask(
    polygons_percent: Sequence[Sequence[Sequence[float]]], height: int, width: int
) -> np.ndarray:
    """Fill percent polygons into a ``height x width`` bool mask (union of the polygons).

    Raises:
        ValueError: a polygon is not a list of ``[x%, y%]`` pairs.
    """
    canvas = np.zeros((height, width), dtype=np.uint8)
    for polygon in polygons_percent:
        pts = percent_to_pixels(polygon, height, width)
        if len(pts) == 0:
            continue
        # One fillPoly call per polygon: overlapping polygons add up to their union.
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    return canvas.astype(bool)


# --- result items ----------------------------------------------------------------------------


def _check_target(target: Target, kind: str, label: str) -> None:
    if target.kind != kind:
        raise LabelConfigError(
            f"control {target.from_name!r} takes {target.kind} results, not {kind} results"
        )
    if label not in target.labels:
        raise LabelConfigError(
            f"label {label!r} is not in control {target.from_name!r} "
            f"(labels: {', '.join(target.labels)})"
        )


def _base_item(
    target: Target, height: int, width: int, score: float, result_id: str | None
) -> dict[str, Any]:
    return {
        "id": result_id or new_result_id(),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": target.result_type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {},
        "score": float(score),
    }


def brush_result(
    mask: np.ndarray,
    target: Target,
    label: str,
    score: float,
    result_id: str | None = None,
) -> dict[str, Any]:
    """One brushlabels result item for ``mask``, as Label Studio stores it in a prediction.

    Args:
        mask: ``H x W`` array at the original image size; non-zero is foreground. An empty mask
            still gives an item (an empty region); callers that do not want one skip it.
        target: the parsed label config; must be a BrushLabels target.
        label: one of ``target.labels``.
        score: the region's confidence in [0, 1].
        result_id: item id; a fresh random one when None.

    Raises:
        LabelConfigError: ``target`` is not a brush control or ``label`` is not one of its labels.
    """
    _check_target(target, "brush", label)
    fg = _check_mask(mask)
    item = _base_item(target, fg.shape[0], fg.shape[1], score, result_id)
    item["value"] = {"format": "rle", "rle": mask_to_rle(fg), "brushlabels": [label]}
    return item


def polygon_results(
    mask: np.ndarray,
    target: Target,
    label: str,
    score: float,
    tolerance: float = 1.0,
    min_area: int = 16,
) -> list[dict[str, Any]]:
    """polygonlabels result items for ``mask``, one per component (see ``mask_to_polygons``).

    Args:
        mask: ``H x W`` array at the original image size; non-zero is foreground.
        target: the parsed label config; must be a PolygonLabels target.
        label: one of ``target.labels``.
        score: confidence in [0, 1], given to every item.
        tolerance, min_area: passed to ``mask_to_polygons``.

    Returns:
        A list of items, empty when the mask has no component of ``min_area`` pixels.

    Raises:
        LabelConfigError: ``target`` is not a polygon control or ``label`` is not one of its labels.
    """
    _check_target(target, "polygon", label)
    fg = _check_mask(mask)
    items = []
    for points in mask_to_polygons(fg, tolerance=tolerance, min_area=min_area):
        item = _base_item(target, fg.shape[0], fg.shape[1], score, None)
        item["value"] = {"points": points, "closed": True, "polygonlabels": [label]}
        items.append(item)
    return items


def _positive_int(item: Mapping[str, Any], key: str, rid: object) -> int:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise AnnotationFormatError(f"result {rid!r}: {key} must be a positive number")
    if value != int(value):
        raise AnnotationFormatError(f"result {rid!r}: {key} must be a whole number")
    return int(value)


def results_to_masks(
    results: Sequence[Mapping[str, Any]],
    target: Target,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, np.ndarray]:
    """Union per label of the regions of ``target``'s control in an annotation's result.

    Items of other controls (``from_name`` differs: prompts, choices, other tools) are skipped.
    Items of the target control must be well formed; otherwise the whole call fails with
    ``AnnotationFormatError`` naming the item, so that a trainer skips the annotation rather
    than learning from part of it. A region with several labels counts for each of them.
    Label names are taken as they appear, even when no longer in ``target.labels``.
    Open polygons (``closed: false``) are filled as if closed. ``image_rotation`` is ignored.

    Args:
        results: the ``result`` list of an annotation or prediction.
        target: the parsed label config.
        height, width: output size; by default the ``original_height``/``original_width`` of
            the first item of the target control. Brush regions recorded at another size are
            resized (nearest neighbour); polygons are drawn at the output size.

    Returns:
        ``{label: H x W bool mask}`` for each label with at least one region; labels without a
        region are absent (callers treat them as empty). Empty when no item matches and no
        size is given.

    Raises:
        AnnotationFormatError: a target item is malformed (missing or wrong ``type``, labels,
            sizes, RLE or points).
        ValueError: only one of ``height``/``width`` is given.
    """
    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither")
    result_type = target.result_type
    masks: dict[str, np.ndarray] = {}
    for index, item in enumerate(results):
        if not isinstance(item, Mapping):
            raise AnnotationFormatError(f"result #{index} is not an object")
        if item.get("from_name") != target.from_name:
            continue
        rid = item.get("id", f"#{index}")
        if item.get("type") != result_type:
            raise AnnotationFormatError(
                f"result {rid!r}: type {item.get('type')!r}, expected {result_type!r}"
            )
        value = item.get("value")
        if not isinstance(value, Mapping):
            raise AnnotationFormatError(f"result {rid!r}: value must be an object")
        labels = value.get(result_type)
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(lb, str) for lb in labels)
        ):
            raise AnnotationFormatError(f"result {rid!r}: value.{result_type} must list labels")
        item_h = _positive_int(item, "original_height", rid)
        item_w = _positive_int(item, "original_width", rid)
        if height is None or width is None:
            height, width = item_h, item_w
        region = _decode_region(value, target.kind, item_h, item_w, height, width, rid)
        for label in labels:
            if label in masks:
                masks[label] |= region
            else:
                masks[label] = region.copy()
    return masks


def _decode_region(
    value: Mapping[str, Any],
    kind: str,
    item_h: int,
    item_w: int,
    height: int,
    width: int,
    rid: object,
) -> np.ndarray:
    """Rasterise one result value to a ``height x width`` bool mask."""
    if kind == "brush":
        fmt = value.get("format", "rle")
        if fmt != "rle" or "rle" not in value:
            raise AnnotationFormatError(f"result {rid!r}: brush value must have format 'rle'")
        try:
            region = rle_to_mask(value["rle"], item_h, item_w)
        except AnnotationFormatError as exc:
            raise AnnotationFormatError(f"result {rid!r}: {exc.message}") from None
        if region.shape != (height, width):
            region = cv2.resize(
                region.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST
            ).astype(bool)
        return region
    points = value.get("points")
    if not isinstance(points, list) or len(points) < 3:
        raise AnnotationFormatError(f"result {rid!r}: polygon needs at least 3 points")
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationFormatError(
            f"result {rid!r}: polygon points must be [x, y] pairs"
        ) from None
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise AnnotationFormatError(f"result {rid!r}: polygon points must be [x, y] pairs")
    return polygons_to_mask([pts], height, width)
