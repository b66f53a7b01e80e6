"""Masks to and from Label Studio results: RLE, polygons, result items."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from contracts.errors import AnnotationFormatError, LabelConfigError
from labelstudio.codecs import (
    brush_result,
    mask_to_polygons,
    mask_to_rle,
    new_result_id,
    percent_to_pixels,
    pixels_to_percent,
    polygon_results,
    polygons_to_mask,
    results_to_masks,
    rle_to_mask,
)
from labelstudio.labelconfig import Target, parse_label_config
from tests.support.protocol import FIXTURES

BRUSH = Target("tag", "image", "brush", ("Foreground", "Background"), "image", ("kp", "rect"))
POLYGON = Target("poly", "image", "polygon", ("Foreground", "Background"), "image")


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())["json"]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# --- masks used across tests -----------------------------------------------------------------


def _zeros(h: int, w: int) -> np.ndarray:
    return np.zeros((h, w), dtype=bool)


def _ones(h: int, w: int) -> np.ndarray:
    return np.ones((h, w), dtype=bool)


def _random(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(h * 1000 + w).random((h, w)) > 0.5


def _checker(h: int, w: int) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) % 2).astype(bool)


def _disk(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (w // 2, h // 2), max(1, min(h, w) // 3), 1, -1)
    return m.astype(bool)


def _last_pixel(h: int, w: int) -> np.ndarray:
    m = _zeros(h, w)
    m[-1, -1] = True
    return m


MASKS = {
    "zeros": _zeros,
    "ones": _ones,
    "random": _random,
    "checker": _checker,
    "disk": _disk,
    "last_pixel": _last_pixel,
}
SIZES = [(1, 1), (7, 13), (13, 7), (64, 96), (480, 640)]
RLE_CASES = [
    (name, h, w)
    for name in MASKS
    for h, w in SIZES
    # Pixel noise at 480x640 takes seconds in the pure-Python codec; smaller sizes cover it.
    if not (name in ("random", "checker") and h * w > 100_000)
] + [("random", 120, 160), ("checker", 120, 160)]


# --- brush RLE -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "h", "w"), RLE_CASES)
def test_rle_round_trip(name: str, h: int, w: int) -> None:
    mask = MASKS[name](h, w)
    rle = mask_to_rle(mask)
    assert all(type(b) is int and 0 <= b <= 255 for b in rle)
    # The header holds the number of RGBA values, big-endian.
    assert int.from_bytes(bytes(rle[:4]), "big") == h * w * 4
    decoded = rle_to_mask(rle, h, w)
    assert decoded.dtype == bool
    assert decoded.shape == (h, w)
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_rle_accepts_any_numeric_mask(dtype: type) -> None:
    mask = _disk(20, 30)
    values = mask.astype(dtype) * (7 if dtype is not bool else 1)
    assert mask_to_rle(values) == mask_to_rle(mask)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (0, 4), (4, 0)])
def test_rle_rejects_non_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros(shape, dtype=bool))


def _webhook_results() -> list[tuple[str, dict]]:
    cases = []
    for file in sorted(FIXTURES.glob("*.json")):
        body = _load(file.name) or {}
        results = []
        if isinstance(body.get("annotation"), dict):
            results += body["annotation"]["result"]
        for task in body.get("tasks", []):
            for prediction in task.get("predictions", []):
                results += prediction["result"]
        cases += [(file.name, r) for r in results if r["type"] in ("brushlabels", "polygonlabels")]
    return cases


WEBHOOK_RESULTS = _webhook_results()


def test_fixtures_hold_both_kinds_of_result() -> None:
    assert {r["type"] for _, r in WEBHOOK_RESULTS} == {"brushlabels", "polygonlabels"}


@pytest.mark.parametrize(
    ("name", "item"), WEBHOOK_RESULTS, ids=[f"{n}:{r['id']}" for n, r in WEBHOOK_RESULTS]
)
def test_captured_results_decode_to_non_empty_masks(name: str, item: dict) -> None:
    h, w = item["original_height"], item["original_width"]
    body = _load(name)
    xml = body.get("label_config") or body["project"]["label_config"]
    target = parse_label_config(xml)
    masks = results_to_masks([item], target)
    label = item["value"][target.result_type][0]
    assert set(masks) == {label}
    assert masks[label].shape == (h, w)
    assert 0 < masks[label].sum() < h * w
    if item["type"] == "brushlabels":
        # Our encoder reproduces the bytes Label Studio stored.
        assert mask_to_rle(masks[label]) == item["value"]["rle"]
    else:
        # The captured square [25%, 75%] of a 96 x 64 image, boundary included.
        ys, xs = np.nonzero(masks[label])
        assert (xs.min(), xs.max(), ys.min(), ys.max()) == (24, 72, 16, 48)


def _header(count: int) -> list[int]:
    return list(count.to_bytes(4, "big"))


@pytest.mark.parametrize(
    ("rle", "h", "w", "reason"),
    [
        (mask_to_rle(_disk(8, 8)), 8, 9, "expected 288"),
        (mask_to_rle(_disk(8, 8))[:6], 8, 8, "at least 7"),
        ([*_header(8 * 8 * 4), 0, 0, 0], 8, 8, "truncated or corrupt"),
        ([0, 0, 1, 256, 0, 0, 0], 8, 8, "0..255"),
        ([0, 0, 1, -1, 0, 0, 0], 8, 8, "0..255"),
        (["a", "b", "c", "d", "e", "f", "g"], 8, 8, "list of integers"),
        ("0001", 8, 8, "list of integers"),
        (None, 8, 8, "list of integers"),
        (mask_to_rle(_disk(8, 8)), 0, 8, "positive"),
        (_header(4 * 10**9 // 4), 20_000, 50_000, "exceeds"),
    ],
)
def test_rle_to_mask_errors(rle: object, h: int, w: int, reason: str) -> None:
    with pytest.raises(AnnotationFormatError, match=reason):
        rle_to_mask(rle, h, w)  # type: ignore[arg-type]


def test_mask_to_rle_timing_1024() -> None:
    mask = np.zeros((1024, 1024), np.uint8)
    cv2.circle(mask, (512, 512), 300, 1, -1)
    cv2.rectangle(mask, (20, 40), (200, 900), 1, -1)
    start = time.perf_counter()
    rle = mask_to_rle(mask)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = rle_to_mask(rle, 1024, 1024)
    decode_s = time.perf_counter() - start
    print(
        f"\n1024x1024 disk+rectangle: mask_to_rle {encode_s * 1000:.1f} ms "
        f"({len(rle)} bytes), rle_to_mask {decode_s * 1000:.1f} ms"
    )
    np.testing.assert_array_equal(decoded, mask.astype(bool))


# --- polygons --------------------------------------------------------------------------------


def _convex(shape: str, h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if shape == "rectangle":
        cv2.rectangle(m, (w // 5, h // 4), (w * 3 // 4, h * 4 // 5), 1, -1)
    elif shape == "disk":
        cv2.circle(m, (w // 2, h // 2), min(h, w) // 3, 1, -1)
    elif shape == "ellipse":
        cv2.ellipse(m, (w // 2, h // 2), (w // 3, h // 5), 30, 0, 360, 1, -1)
    elif shape == "triangle":
        pts = np.array([[w // 10, h - h // 10], [w // 2, h // 10], [w - w // 10, h - h // 8]])
        cv2.fillPoly(m, [pts.astype(np.int32)], 1)
    elif shape == "full":
        m[:] = 1
    return m.astype(bool)


@pytest.mark.parametrize("shape", ["rectangle", "disk", "ellipse", "triangle", "full"])
@pytest.mark.parametrize(("h", "w"), [(64, 96), (480, 640), (37, 23)])
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.0])
def test_convex_mask_polygon_round_trip(shape: str, h: int, w: int, tolerance: float) -> None:
    mask = _convex(shape, h, w)
    polygons = mask_to_polygons(mask, tolerance=tolerance)
    assert len(polygons) == 1
    for x, y in polygons[0]:
        assert 0.0 <= x <= 100.0
        assert 0.0 <= y <= 100.0
    back = polygons_to_mask(polygons, h, w)
    assert back.shape == (h, w)
    # Simplification replaces boundary runs by inner chords at most `tolerance` pixels away,
    # so at most about `tolerance` pixels per boundary pixel are lost.
    assert _iou(mask, back) >= 1.0 - tolerance * _boundary(mask) / mask.sum()
    # polygon -> mask -> polygon -> mask stays close.
    again = polygons_to_mask(mask_to_polygons(back, tolerance=tolerance), h, w)
    assert _iou(back, again) >= 1.0 - tolerance * _boundary(back) / back.sum()


def _boundary(mask: np.ndarray) -> int:
    """Number of foreground pixels with a background (or outside) pixel among their 8 neighbours."""
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0)
    return int(mask.sum() - inner.sum())


@pytest.mark.parametrize(
    "points",
    [
        [[25.0, 25.0], [75.0, 25.0], [75.0, 75.0], [25.0, 75.0]],
        [[10.0, 90.0], [50.0, 5.0], [90.0, 90.0]],
        [[0.0, 0.0], [100.0, 0.0], [100.0, 100.0], [0.0, 100.0]],
    ],
)
def test_percent_polygon_round_trip(points: list[list[float]]) -> None:
    h, w = 64, 96
    mask = polygons_to_mask([points], h, w)
    again = polygons_to_mask(mask_to_polygons(mask), h, w)
    assert _iou(mask, again) >= 0.99


def test_percent_conversion() -> None:
    mask = np.zeros((64, 96), bool)
    mask[16:48, 24:72] = True  # columns 24..71, rows 16..47
    (polygon,) = mask_to_polygons(mask)
    right, bottom = round(71 / 96 * 100, 4), round(47 / 64 * 100, 4)
    expected = [(25.0, 25.0), (right, 25.0), (25.0, bottom), (right, bottom)]
    assert sorted(map(tuple, polygon)) == sorted(expected)
    np.testing.assert_array_equal(polygons_to_mask([polygon], 64, 96), mask)
    pixels = np.array([[0.0, 0.0], [95.0, 63.0], [48.0, 32.0]])
    np.testing.assert_allclose(
        percent_to_pixels(pixels_to_percent(pixels, 64, 96), 64, 96), pixels, atol=1e-3
    )


def test_holes_are_filled_and_components_split() -> None:
    mask = np.zeros((100, 200), np.uint8)
    cv2.circle(mask, (50, 50), 40, 1, -1)
    cv2.circle(mask, (50, 50), 20, 0, -1)  # a ring: outer contour only
    cv2.rectangle(mask, (120, 20), (180, 60), 1, -1)  # a second, smaller component
    mask[90, 190] = 1  # a speck
    polygons = mask_to_polygons(mask.astype(bool))
    assert len(polygons) == 2
    ring = polygons_to_mask(polygons[:1], 100, 200)  # largest first
    assert ring[50, 50]  # the hole is filled
    assert ring[50, 15] and not ring[50, 150]
    assert not polygons_to_mask(polygons, 100, 200)[90, 190]


@pytest.mark.parametrize(
    ("mask", "min_area", "count"),
    [
        (_zeros(7, 13), 16, 0),
        (_ones(1, 1), 16, 0),
        (_ones(1, 1), 1, 0),  # a single pixel has no area as a polygon
        (_ones(7, 13), 16, 1),
        (_checker(20, 20), 1, 1),  # 8-connected: one diagonal lattice
        (np.eye(30, dtype=bool), 1, 0),  # a 1-pixel line has no area
        (np.pad(_ones(3, 3), 5), 9, 1),
        (np.pad(_ones(3, 3), 5), 10, 0),
    ],
)
def test_polygon_edge_cases(mask: np.ndarray, min_area: int, count: int) -> None:
    assert len(mask_to_polygons(mask, min_area=min_area)) == count


def test_overlapping_polygons_give_their_union() -> None:
    a = [[10.0, 10.0], [60.0, 10.0], [60.0, 60.0], [10.0, 60.0]]
    b = [[40.0, 40.0], [90.0, 40.0], [90.0, 90.0], [40.0, 90.0]]
    both = polygons_to_mask([a, b], 50, 50)
    np.testing.assert_array_equal(
        both, polygons_to_mask([a], 50, 50) | polygons_to_mask([b], 50, 50)
    )
    assert both[25, 25]  # the overlap stays filled


# --- result items ----------------------------------------------------------------------------

ITEM_KEYS = {
    "id",
    "from_name",
    "to_name",
    "type",
    "original_width",
    "original_height",
    "image_rotation",
    "value",
    "score",
}


def test_brush_result_shape() -> None:
    mask = _disk(64, 96)
    item = brush_result(mask, BRUSH, "Foreground", np.float32(0.875))
    assert json.loads(json.dumps(item)) == item
    assert set(item) == ITEM_KEYS
    assert item["from_name"] == "tag" and item["to_name"] == "image"
    assert item["type"] == "brushlabels"
    assert (item["original_width"], item["original_height"]) == (96, 64)
    assert item["image_rotation"] == 0
    assert set(item["value"]) == {"format", "rle", "brushlabels"}
    assert item["value"]["format"] == "rle"
    assert item["value"]["brushlabels"] == ["Foreground"]
    assert type(item["score"]) is float and item["score"] == 0.875
    np.testing.assert_array_equal(rle_to_mask(item["value"]["rle"], 64, 96), mask)
    assert brush_result(mask, BRUSH, "Foreground", 0.5, result_id="fixed")["id"] == "fixed"


def test_polygon_results_shape() -> None:
    mask = np.zeros((64, 96), bool)
    mask[5:20, 5:30] = True
    mask[30:60, 40:90] = True
    items = polygon_results(mask, POLYGON, "Background", 0.6)
    assert len(items) == 2
    assert len({i["id"] for i in items}) == 2
    for item in items:
        assert json.loads(json.dumps(item)) == item
        assert set(item) == ITEM_KEYS
        assert item["type"] == "polygonlabels"
        assert (item["from_name"], item["to_name"]) == ("poly", "image")
        assert set(item["value"]) == {"points", "closed", "polygonlabels"}
        assert item["value"]["closed"] is True
        assert item["value"]["polygonlabels"] == ["Background"]
        assert all(
            len(p) == 2 and all(type(c) is float for c in p) for p in item["value"]["points"]
        )
        assert item["score"] == 0.6
    assert polygon_results(_zeros(64, 96), POLYGON, "Background", 0.9) == []


@pytest.mark.parametrize(
    ("build", "target", "label", "reason"),
    [
        (brush_result, POLYGON, "Foreground", "takes polygon results"),
        (polygon_results, BRUSH, "Foreground", "takes brush results"),
        (brush_result, BRUSH, "Cat", "not in control 'tag'"),
        (polygon_results, POLYGON, "foreground", "not in control 'poly'"),
    ],
)
def test_builders_check_target(build, target: Target, label: str, reason: str) -> None:
    with pytest.raises(LabelConfigError, match=reason):
        build(_disk(10, 10), target, label, 0.5)


def test_result_ids_are_unique_and_short() -> None:
    ids = [new_result_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 10 and i.isalnum() for i in ids)


# --- results to masks ------------------------------------------------------------------------


def test_results_to_masks_union_and_skips_other_controls() -> None:
    a = np.zeros((40, 50), bool)
    a[0:10, 0:10] = True
    b = np.zeros((40, 50), bool)
    b[20:30, 20:40] = True
    c = np.zeros((40, 50), bool)
    c[35:40, 0:5] = True
    context = _load("post_predict_interactive.json")["params"]["context"]["result"]
    results = [
        brush_result(a, BRUSH, "Foreground", 0.9),
        brush_result(b, BRUSH, "Foreground", 0.9),
        brush_result(c, BRUSH, "Background", 0.9),
        *context,  # keypoint prompt of control "kp": skipped
        {"id": "x", "from_name": "rect", "type": "rectanglelabels", "value": {}},
        {"id": "y", "from_name": "other", "type": "brushlabels", "value": None},
    ]
    masks = results_to_masks(results, BRUSH)
    assert set(masks) == {"Foreground", "Background"}
    np.testing.assert_array_equal(masks["Foreground"], a | b)
    np.testing.assert_array_equal(masks["Background"], c)
    assert results_to_masks(context, BRUSH) == {}
    assert results_to_masks([], BRUSH, 4, 5) == {}


def test_results_to_masks_polygons_and_multi_label() -> None:
    mask = _convex("disk", 64, 96)
    items = polygon_results(mask, POLYGON, "Foreground", 0.7)
    items[0]["value"]["polygonlabels"] = ["Foreground", "Background"]
    masks = results_to_masks(items, POLYGON)
    assert set(masks) == {"Foreground", "Background"}
    assert _iou(masks["Foreground"], mask) > 0.95
    np.testing.assert_array_equal(masks["Foreground"], masks["Background"])
    # Labels are kept as they appear even when the config no longer lists them.
    items[0]["value"]["polygonlabels"] = ["Retired"]
    assert set(results_to_masks(items, POLYGON)) == {"Retired"}


def test_results_to_masks_resizes_to_requested_size() -> None:
    small = np.zeros((32, 48), bool)
    small[8:24, 12:36] = True
    brush = brush_result(small, BRUSH, "Foreground", 1.0)
    out = results_to_masks([brush], BRUSH, height=64, width=96)["Foreground"]
    assert out.shape == (64, 96)
    np.testing.assert_array_equal(out, np.kron(small, np.ones((2, 2), bool)))
    poly = polygon_results(small, POLYGON, "Foreground", 1.0)
    big = results_to_masks(poly, POLYGON, height=64, width=96)["Foreground"]
    assert big.shape == (64, 96)
    assert _iou(big, out) > 0.9
    # Without a size, the first item's size is used and later items are resized to it.
    other = brush_result(np.ones((64, 96), bool), BRUSH, "Foreground", 1.0)
    assert results_to_masks([brush, other], BRUSH)["Foreground"].shape == (32, 48)
    with pytest.raises(ValueError, match="both"):
        results_to_masks([brush], BRUSH, height=10)


def _brush_item(**changes: object) -> dict:
    item = brush_result(_disk(8, 8), BRUSH, "Foreground", 0.5, result_id="r1")
    item["value"] = dict(item["value"])
    for key, new in changes.items():
        if key.startswith("value_"):
            item["value"][key[6:]] = new
        else:
            item[key] = new
    return item


def _polygon_item(points: object) -> dict:
    return {
        "id": "p1",
        "from_name": "poly",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": 10,
        "original_height": 10,
        "value": {"points": points, "polygonlabels": ["Foreground"]},
    }


@pytest.mark.parametrize(
    ("target", "item", "reason"),
    [
        (BRUSH, "not a dict", "not an object"),
        (BRUSH, _brush_item(type="polygonlabels"), "expected 'brushlabels'"),
        (BRUSH, _brush_item(value=None), "value must be an object"),
        (BRUSH, _brush_item(value_brushlabels=[]), "must list labels"),
        (BRUSH, _brush_item(value_brushlabels="Foreground"), "must list labels"),
        (BRUSH, _brush_item(original_width=None), "original_width must be a positive"),
        (BRUSH, _brush_item(original_height=-3), "original_height must be a positive"),
        (BRUSH, _brush_item(original_height=8.5), "whole number"),
        (BRUSH, _brush_item(original_width=9), "r1.*expected 288"),
        (BRUSH, _brush_item(value_format="png"), "format 'rle'"),
        (BRUSH, _brush_item(value_rle=[1, 2, 3]), "r1.*at least 7"),
        (POLYGON, _polygon_item([[1, 1], [2, 2]]), "at least 3 points"),
        (POLYGON, _polygon_item(None), "at least 3 points"),
        (POLYGON, _polygon_item([[1, 1], [2, 2], [3]]), r"\[x, y\] pairs"),
        (POLYGON, _polygon_item([[1, 1], [2, 2], [3, float("nan")]]), r"\[x, y\] pairs"),
        (POLYGON, _polygon_item([[1, 1], [2, "a"], [3, 3]]), r"\[x, y\] pairs"),
    ],
)
def test_results_to_masks_rejects_malformed_items(
    target: Target, item: object, reason: str
) -> None:
    with pytest.raises(AnnotationFormatError, match=reason):
        results_to_masks([item], target)  # type: ignore[list-item]


@pytest.mark.parametrize(("h", "w"), [(1, 1), (7, 13), (480, 640)])
@pytest.mark.parametrize("name", ["zeros", "ones", "disk"])
def test_brush_result_round_trips_through_results_to_masks(name: str, h: int, w: int) -> None:
    mask = MASKS[name](h, w)
    item = json.loads(json.dumps(brush_result(mask, BRUSH, "Background", 0.5)))
    np.testing.assert_array_equal(results_to_masks([item], BRUSH)["Background"], mask)
