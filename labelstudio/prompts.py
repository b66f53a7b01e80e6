"""Smart keypoints and rectangles from Label Studio, parsed into points and boxes in the pixels
of an image, grouped into objects, and answered by SAM2's promptable head: the one place that
turns prompts into masks, for the worker's interactive answers (:mod:`worker.sam2_prompts`) and
for the trainer's masks of annotations that hold prompts but no mask (:mod:`trainer.prompt_masks`).

Prompts come as an interactive call's context (Label Studio's ``params.context``,
``{"result": [...]}``) or as the items of a submitted annotation (:func:`annotation_prompts`):
the same item shapes. The crop-and-segment answer to them is in :mod:`worker.crop_prompts`.

Coordinates in Label Studio are percentages of ``original_width`` / ``original_height``; they are
mapped to the pixels of the image actually fetched, which may have another size.
``image_rotation`` is ignored. Items of other types (choices, brushes, ...) are ignored; a
malformed prompt item raises :class:`contracts.errors.BadRequest` naming it.

Prompts form objects (:func:`prompt_groups`): each rectangle with the keypoints inside it that
carry its label or none, then the keypoints left over, one object per label. An object with no
rectangle and no positive point (a lone negative click) says only what the object is not: it is
dropped with a log line, and the answer holds no mask for it (:attr:`Prompts.dropped`).
For SAM2 (:func:`prompt_objects`, :func:`sam2_masks`) a rotated rectangle is given as its
axis-aligned bounds, and a single click alone uses SAM2's three-mask output, keeping the mask
with the best predicted IoU.

Each object's mask goes to its prompt's label when the project has that label, else to every
label the model predicts for the project (:func:`labels_for`, :func:`label_channels`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from contracts.errors import BadRequest
from labelstudio.labelconfig import Target

if TYPE_CHECKING:
    from sam2unet.prompt_head import ImageFeatures, ObjectMask, PromptableSAM2, PromptObject

log = logging.getLogger(__name__)

#: Result ``type`` -> the ``value`` key listing its labels (None: a tool without labels).
KEYPOINT_TYPES: dict[str, str | None] = {"keypointlabels": "keypointlabels", "keypoint": None}
RECTANGLE_TYPES: dict[str, str | None] = {"rectanglelabels": "rectanglelabels", "rectangle": None}


@dataclass(frozen=True)
class Point:
    """A click, in pixels of the image (x = column, y = row, continuous, 0..W and 0..H)."""

    x: float
    y: float
    positive: bool = True
    label: str | None = None

    def pixel(self, height: int, width: int) -> tuple[int, int]:
        """(row, column) of the pixel under the point."""
        return min(int(self.y), height - 1), min(int(self.x), width - 1)


@dataclass(frozen=True)
class Box:
    """A rectangle given by its four corners ((x, y) in image pixels, continuous coordinates)."""

    corners: tuple[tuple[float, float], ...]
    label: str | None = None
    rotated: bool = False

    def bounds(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the pixels the box touches, clipped to the image (may be empty)."""
        xs = [c[0] for c in self.corners]
        ys = [c[1] for c in self.corners]
        x0 = min(max(math.floor(min(xs)), 0), width)
        x1 = min(max(math.ceil(max(xs)), 0), width)
        y0 = min(max(math.floor(min(ys)), 0), height)
        y1 = min(max(math.ceil(max(ys)), 0), height)
        return x0, y0, x1, y1

    def inside(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """h x w bool: the pixels of ``window`` (x0, y0, x1, y1) inside the box."""
        x0, y0, x1, y1 = window
        if not self.rotated:
            xs = [c[0] for c in self.corners]
            ys = [c[1] for c in self.corners]
            inside = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            bx0, bx1 = math.floor(min(xs)) - x0, math.ceil(max(xs)) - x0
            by0, by1 = math.floor(min(ys)) - y0, math.ceil(max(ys)) - y0
            inside[max(by0, 0) : max(by1, 0), max(bx0, 0) : max(bx1, 0)] = True
            return inside
        shift = 4  # fractional bits of the polygon's vertices
        poly = np.array(
            [[(cx - 0.5 - x0) * 2**shift, (cy - 0.5 - y0) * 2**shift] for cx, cy in self.corners]
        )
        canvas = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.fillPoly(canvas, [np.round(poly).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)
        return canvas.astype(bool)


@dataclass(frozen=True)
class Prompts:
    """The prompts of one interactive call, in pixels of one image."""

    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()
    ignored: int = 0
    #: negative clicks dropped: their objects had no rectangle and no positive point
    dropped: int = 0

    def __bool__(self) -> bool:
        """Whether the call carried prompts (a call whose only prompts were dropped did: its
        answer is empty, not the automatic model's answer for the whole image)."""
        return bool(self.boxes or self.points or self.dropped)


@dataclass(frozen=True)
class PromptGroup:
    """One object of a call: a rectangle (or None) and the keypoints that refine it, and the
    label it carries (None: unlabelled)."""

    box: Box | None
    points: tuple[Point, ...]
    label: str | None


def _inside(point: Point, box: Box) -> bool:
    xs = [c[0] for c in box.corners]
    ys = [c[1] for c in box.corners]
    return min(xs) <= point.x <= max(xs) and min(ys) <= point.y <= max(ys)


def prompt_groups(prompts: Prompts) -> list[PromptGroup]:
    """The objects of a call (see the module docstring), rectangles first, in order. A point
    goes to the first rectangle whose bounds hold it and whose label fits (either has none,
    or both are the same); the points left over form one object per label."""
    taken: set[int] = set()
    out: list[PromptGroup] = []
    for box in prompts.boxes:
        mine = []
        for i, p in enumerate(prompts.points):
            fits = p.label is None or box.label is None or p.label == box.label
            if i not in taken and fits and _inside(p, box):
                taken.add(i)
                mine.append(p)
        out.append(PromptGroup(box, tuple(mine), box.label))
    groups: dict[str | None, list[Point]] = {}
    for i, p in enumerate(prompts.points):
        if i not in taken:
            groups.setdefault(p.label, []).append(p)
    out.extend(PromptGroup(None, tuple(points), label) for label, points in groups.items())
    return out


def drop_lone_negatives(prompts: Prompts) -> Prompts:
    """``prompts`` without the objects that have no rectangle and no positive point (logged)."""
    lone = [
        g for g in prompt_groups(prompts) if g.box is None and not any(p.positive for p in g.points)
    ]
    if not lone:
        return prompts
    gone = {id(p) for g in lone for p in g.points}
    for g in lone:
        log.info(
            "dropped %d negative click(s) (label %s): their object has no positive point and "
            "no rectangle, so no mask is answered for it",
            len(g.points),
            g.label,
        )
    return Prompts(
        prompts.boxes,
        tuple(p for p in prompts.points if id(p) not in gone),
        prompts.ignored,
        prompts.dropped + len(gone),
    )


# --------------------------------------------------------------------------- parsing


def _number(value: Mapping[str, Any], key: str, rid: object) -> float:
    v = value.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"interactive prompt {rid!r}: value.{key} must be a finite number")
    return float(v)


def _original_size(item: Mapping[str, Any], key: str, default: int, rid: object) -> float:
    v = item.get(key)
    if v is None:  # percentages do not depend on it; only a rotation does
        return float(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise BadRequest(f"interactive prompt {rid!r}: {key} must be a positive number")
    return float(v)


def _label(value: Mapping[str, Any], key: str | None, rid: object) -> str | None:
    if key is None or key not in value:
        return None
    labels = value[key]
    if not isinstance(labels, list) or not all(isinstance(lb, str) for lb in labels):
        raise BadRequest(f"interactive prompt {rid!r}: value.{key} must be a list of labels")
    return labels[0] if labels else None


def parse_context(context: Any, height: int, width: int, to_name: str | None = None) -> Prompts:
    """Label Studio's interactive context -> prompts in pixels of an H x W image.

    Args:
        context: ``params.context`` of an interactive ``/predict``: ``{"result": [items]}``.
        height, width: size of the image the prompts apply to.
        to_name: when given, items bound to another object tag are ignored.

    Raises:
        BadRequest: the context or one of its keypoint / rectangle items is malformed, or a
            point or a box lies outside the image.

    Lone negative clicks are dropped (:func:`drop_lone_negatives`).
    """
    if not isinstance(context, Mapping) or not isinstance(context.get("result"), list):
        raise BadRequest("interactive context must be an object with a 'result' list")
    boxes: list[Box] = []
    points: list[Point] = []
    ignored = 0
    for index, item in enumerate(context["result"]):
        if not isinstance(item, Mapping):
            raise BadRequest(f"interactive prompt #{index} is not an object")
        kind = item.get("type")
        if kind not in KEYPOINT_TYPES and kind not in RECTANGLE_TYPES:
            ignored += 1
            continue
        if to_name is not None and item.get("to_name", to_name) != to_name:
            ignored += 1
            continue
        rid = item.get("id", f"#{index}")
        value = item.get("value")
        if not isinstance(value, Mapping):
            raise BadRequest(f"interactive prompt {rid!r}: value must be an object")
        ow = _original_size(item, "original_width", width, rid)
        oh = _original_size(item, "original_height", height, rid)
        sx, sy = width / ow, height / oh  # original pixels -> image pixels
        if kind in KEYPOINT_TYPES:
            x, y = _number(value, "x", rid), _number(value, "y", rid)
            if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
                raise BadRequest(
                    f"interactive prompt {rid!r}: point ({x}%, {y}%) lies outside the image"
                )
            positive = item.get("is_positive")
            if positive is None:
                positive = True
            if not isinstance(positive, bool):
                raise BadRequest(f"interactive prompt {rid!r}: is_positive must be true or false")
            label = _label(value, KEYPOINT_TYPES[kind], rid)
            points.append(Point(x * ow / 100 * sx, y * oh / 100 * sy, positive, label))
            continue
        x, y = _number(value, "x", rid), _number(value, "y", rid)
        w, h = _number(value, "width", rid), _number(value, "height", rid)
        if w <= 0 or h <= 0:
            raise BadRequest(f"interactive prompt {rid!r}: rectangle width and height must be > 0")
        rotation = value.get("rotation")
        if rotation is None:
            rotation = 0.0
        if (
            isinstance(rotation, bool)
            or not isinstance(rotation, (int, float))
            or not math.isfinite(rotation)
        ):
            raise BadRequest(f"interactive prompt {rid!r}: value.rotation must be a finite number")
        x, y, w, h = x * ow / 100, y * oh / 100, w * ow / 100, h * oh / 100
        theta = math.radians(rotation)
        cos, sin = round(math.cos(theta), 12), round(math.sin(theta), 12)
        rotated = cos * sin != 0  # not a multiple of 90 degrees
        local = ((0.0, 0.0), (w, 0.0), (w, h), (0.0, h))
        corners = tuple(
            ((x + u * cos - v * sin) * sx, (y + u * sin + v * cos) * sy) for u, v in local
        )
        if not all(math.isfinite(c) for corner in corners for c in corner):
            raise BadRequest(f"interactive prompt {rid!r}: rectangle is out of range")
        box = Box(corners, _label(value, RECTANGLE_TYPES[kind], rid), rotated)
        x0, y0, x1, y1 = box.bounds(height, width)
        if x1 <= x0 or y1 <= y0:
            raise BadRequest(f"interactive prompt {rid!r}: rectangle lies outside the image")
        boxes.append(box)
    return drop_lone_negatives(Prompts(tuple(boxes), tuple(points), ignored))


# --------------------------------------------------------------------------- labels

#: The label of a model that was never trained on a project's labels (one channel).
GENERIC_LABEL = "object"


def label_channels(model_labels: Sequence[str], target: Target) -> list[tuple[int, str]]:
    """Which model channel feeds which label of the project.

    A one-channel model with the generic label predicts the project's first label; otherwise
    channels are matched by label name, and project labels the model does not know get no
    prediction until a training round adds their channel.
    """
    if tuple(model_labels) == (GENERIC_LABEL,) and GENERIC_LABEL not in target.labels:
        return [(0, target.labels[0])]
    return [(k, name) for k, name in enumerate(model_labels) if name in target.labels]


def labels_for(label: str | None, target: Target, channels: Sequence[tuple[int, str]]) -> list[str]:
    """The project labels an object's mask goes to: its prompt's label when the project has
    it (or the segmentation label a prompt label names, as ``Click: Foreground`` names
    ``Foreground``: the label config's ``prompt_labels``), else every label the model predicts
    (``channels``), else the project's first label."""
    if label is not None:
        label = dict(getattr(target, "prompt_labels", ())).get(label, label)
        if label in target.labels:
            return [label]
    return [name for _, name in channels] or list(target.labels[:1])


# --------------------------------------------------------------------------- SAM2's head


def _box_xyxy(box: Box) -> tuple[float, float, float, float]:
    xs = [c[0] for c in box.corners]
    ys = [c[1] for c in box.corners]
    return min(xs), min(ys), max(xs), max(ys)


def prompt_objects(prompts: Prompts) -> list[tuple[PromptObject, str | None]]:
    """(SAM2 prompt object, label) pairs, one per object of :func:`prompt_groups`."""
    # torch (through sam2unet.prompt_head): loaded only where SAM2's head answers prompts
    from sam2unet.prompt_head import PromptObject

    return [
        (
            PromptObject(
                tuple((p.x, p.y) for p in g.points),
                tuple(int(p.positive) for p in g.points),
                None if g.box is None else _box_xyxy(g.box),
            ),
            g.label,
        )
        for g in prompt_groups(prompts)
    ]


def sam2_masks(
    promptable: PromptableSAM2, features: ImageFeatures, prompts: Prompts
) -> list[tuple[str | None, ObjectMask]]:
    """SAM2's answer to parsed prompts on an image's features: (label, mask) per object, in
    the order of :func:`prompt_groups` (empty masks included)."""
    objects = prompt_objects(prompts)
    answers = promptable.predict(features, [o for o, _ in objects])
    return [(label, answer) for (_, label), answer in zip(objects, answers, strict=True)]


# --------------------------------------------------------------------------- annotations


def annotation_prompts(results: Sequence[Any], target: Target) -> list[Mapping[str, Any]]:
    """The smart keypoints and rectangles of an annotation's ``result``: items of a prompt
    type bound to ``target``'s image (from one of its prompt controls, when the label config
    names them), in order; as an interactive context's items, for :func:`parse_context`."""
    out = []
    for item in results:
        if not isinstance(item, Mapping):
            continue
        if item.get("type") not in KEYPOINT_TYPES and item.get("type") not in RECTANGLE_TYPES:
            continue
        if item.get("to_name", target.to_name) != target.to_name:
            continue
        if target.prompt_controls and item.get("from_name") not in target.prompt_controls:
            continue
        out.append(item)
    return out


def prompt_labels(
    items: Sequence[Mapping[str, Any]], target: Target, channels: Sequence[tuple[int, str]]
) -> set[str]:
    """The project labels that masks answering ``items`` (prompt items) would go to."""
    out: set[str] = set()
    for item in items:
        value = item.get("value")
        key = KEYPOINT_TYPES.get(str(item.get("type"))) or RECTANGLE_TYPES.get(
            str(item.get("type"))
        )
        label = None
        if isinstance(value, Mapping) and key is not None:
            labels = value.get(key)
            if isinstance(labels, list) and labels and isinstance(labels[0], str):
                label = labels[0]
        out.update(labels_for(label, target, channels))
    return out


def mask_labels(results: Sequence[Any], target: Target) -> set[str]:
    """The labels of ``target``'s own regions (brush or polygon) in an annotation's result."""
    out: set[str] = set()
    for item in results:
        if not isinstance(item, Mapping) or item.get("from_name") != target.from_name:
            continue
        value = item.get("value")
        labels = value.get(target.result_type) if isinstance(value, Mapping) else None
        if isinstance(labels, list):
            out.update(lb for lb in labels if isinstance(lb, str))
    return out
