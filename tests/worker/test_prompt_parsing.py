"""Interactive prompts around a promptless segmenter.

Most tests use a real, deterministic segmenter: the probability of a pixel is how close its colour
is to a known object colour. Like the real model it can work at a fixed input resolution, which
blurs away objects that are small in the whole image but not in a crop around them.
"""

from __future__ import annotations

import io
import json
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from contracts.errors import BadRequest
from tests.support.protocol import FIXTURES
from worker.answer_without_head import apply_prompts
from worker.prompt_parsing import parse_context

BG = (40, 40, 40)
RED = (220, 30, 30)
GREEN = (30, 200, 40)


class ColourSegmenter:
    """Per image, K x H x W probabilities ``clip(1 - |rgb - colour_k| / scale, 0, 1)``.

    With ``work_size``, the image is first reduced to ``work_size`` x ``work_size`` (area
    averaging) and the probabilities brought back to the image's size (bilinear), as a model with
    a fixed input size does. ``inputs`` records the size of every image it segmented.
    """

    def __init__(self, colours=(RED,), scale: float = 100.0, work_size: int | None = None):
        self.colours = np.asarray(colours, dtype=np.float32)
        self.scale = scale
        self.work_size = work_size
        self.inputs: list[tuple[int, int]] = []

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for im in images:
            h, w = im.shape[:2]
            self.inputs.append((h, w))
            x = im.astype(np.float32)
            if self.work_size:
                x = cv2.resize(x, (self.work_size, self.work_size), interpolation=cv2.INTER_AREA)
            dist = np.linalg.norm(x[None] - self.colours[:, None, None, :], axis=3)
            prob = np.clip(1.0 - dist / self.scale, 0.0, 1.0)
            if self.work_size:
                prob = np.stack(
                    [cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in prob]
                )
            out.append(prob.astype(np.float32))
        return out


def canvas(h: int, w: int) -> np.ndarray:
    im = np.empty((h, w, 3), dtype=np.uint8)
    im[:] = BG
    return im


def paint(im: np.ndarray, rows: slice, cols: slice, colour=RED) -> np.ndarray:
    """Paint a rectangle; return its H x W bool mask."""
    im[rows, cols] = colour
    mask = np.zeros(im.shape[:2], dtype=bool)
    mask[rows, cols] = True
    return mask


def rect(x, y, w, h, ow, oh, label="Foreground", **extra):
    """A rectanglelabels item from pixel values of an ``ow`` x ``oh`` original."""
    value = {"x": 100 * x / ow, "y": 100 * y / oh, "width": 100 * w / ow, "height": 100 * h / oh}
    value["rectanglelabels"] = [label]
    value.update(extra)
    return {
        "id": "r",
        "type": "rectanglelabels",
        "from_name": "rect",
        "to_name": "image",
        "original_width": ow,
        "original_height": oh,
        "value": value,
    }


def point(x, y, ow, oh, positive=True, label="Foreground"):
    """A keypointlabels item at pixel (x, y) of an ``ow`` x ``oh`` original."""
    return {
        "id": "kp",
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "image",
        "is_positive": positive,
        "original_width": ow,
        "original_height": oh,
        "value": {"x": 100 * x / ow, "y": 100 * y / oh, "width": 0.6, "keypointlabels": [label]},
    }


def ctx(*items):
    return {"result": list(items)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def assert_found(kept: np.ndarray, obj: np.ndarray) -> None:
    """``kept`` lies within the object and covers all of it but its 1-pixel rim (a segmenter
    working at a lower resolution blurs the rim)."""
    assert not kept[~obj].any()
    core = cv2.erode(obj.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert core.any() and kept[core].all()


# --------------------------------------------------------------------------- rectangles


def test_box_keeps_the_object_inside_the_box_only():
    im = canvas(120, 160)
    obj = paint(im, slice(30, 80), slice(40, 100))
    other = paint(im, slice(90, 110), slice(120, 150))  # a second object, outside the box
    seg = ColourSegmenter()
    prob, info = apply_prompts(im, ctx(rect(60, 20, 60, 70, 160, 120)), seg)

    assert prob.shape == (1, 120, 160) and prob.dtype == np.float32
    box = np.zeros((120, 160), dtype=bool)
    box[20:90, 60:120] = True
    assert np.all(prob[0][~box] == 0)
    np.testing.assert_array_equal(prob[0] >= 0.5, obj & box)
    assert not (prob[0] >= 0.5)[other].any()
    # the model saw the box widened by its margin (10 % of 60/70 px, at least 8 px)
    assert seg.inputs == [(70 + 2 * 8, 60 + 2 * 8)]
    assert "1 box" in info


def test_box_from_an_original_of_another_size_is_scaled():
    im = canvas(120, 160)
    obj = paint(im, slice(30, 80), slice(40, 100))
    # Label Studio saw the image at 400 x 300: same percentages, other pixel sizes
    prob, _ = apply_prompts(im, ctx(rect(150, 50, 150, 175, 400, 300)), ColourSegmenter())
    box = np.zeros((120, 160), dtype=bool)
    box[20:90, 60:120] = True
    np.testing.assert_array_equal(prob[0] >= 0.5, obj & box)
    assert np.all(prob[0][~box] == 0)


def test_box_beyond_the_border_is_clipped():
    im = canvas(100, 100)
    obj = paint(im, slice(0, 30), slice(80, 100))
    seg = ColourSegmenter()
    # from x = 70 px and y = -10 px, 50 px wide and 30 px tall: past the right and top edges
    prob, _ = apply_prompts(im, ctx(rect(70, -10, 50, 30, 100, 100)), seg)
    box = np.zeros((100, 100), dtype=bool)
    box[0:20, 70:100] = True
    np.testing.assert_array_equal(prob[0] >= 0.5, obj & box)
    assert np.all(prob[0][~box] == 0)
    assert seg.inputs == [(20 + 8, 30 + 8)]  # margins only where the image goes on


def test_tiny_box():
    im = canvas(200, 200)
    obj = paint(im, slice(100, 104), slice(50, 54))
    seg = ColourSegmenter()
    prob, _ = apply_prompts(im, ctx(rect(51, 101, 2, 2, 200, 200)), seg)
    expected = np.zeros((200, 200), dtype=bool)
    expected[101:103, 51:53] = True
    np.testing.assert_array_equal(prob[0] >= 0.5, obj & expected)
    assert seg.inputs == [(2 + 16, 2 + 16)]


def test_box_finds_a_small_object_the_whole_image_misses():
    im = canvas(256, 256)
    obj = paint(im, slice(100, 106), slice(180, 186))
    seg = ColourSegmenter(work_size=32)
    assert not (seg([im])[0] >= 0.5).any()  # too small for the whole-image prediction
    prob, _ = apply_prompts(im, ctx(rect(172, 92, 22, 22, 256, 256)), seg)
    assert_found(prob[0] >= 0.5, obj)


def test_several_boxes_are_united_in_one_model_call():
    im = canvas(120, 160)
    a = paint(im, slice(10, 40), slice(10, 40))
    b = paint(im, slice(70, 100), slice(100, 140))
    c = paint(im, slice(70, 100), slice(10, 40))  # no box on this one
    seg = ColourSegmenter()
    prob, info = apply_prompts(
        im, ctx(rect(5, 5, 40, 40, 160, 120), rect(95, 65, 50, 40, 160, 120)), seg
    )
    np.testing.assert_array_equal(prob[0] >= 0.5, a | b)
    assert not (prob[0] > 0)[c].any()
    assert len(seg.inputs) == 2 and "1 model call" in info


@pytest.mark.parametrize("rotation", [90, 180, -90, 30, 135])
def test_rotated_box_keeps_the_rotated_region(rotation):
    im = np.empty((200, 200, 3), dtype=np.uint8)
    im[:] = RED  # everything is object: the result is the box itself
    x, y, w, h = 100.0, 100.0, 60.0, 30.0  # whichever way it turns, it stays in the image
    prob, _ = apply_prompts(
        im, ctx(rect(x, y, w, h, 200, 200, rotation=rotation)), ColourSegmenter()
    )
    kept = prob[0] >= 0.5
    t = np.radians(rotation)
    # Label Studio rotates clockwise (y points down) about the top-left corner
    u = np.array([np.cos(t), np.sin(t)])
    v = np.array([-np.sin(t), np.cos(t)])
    rows, cols = np.mgrid[0:200, 0:200]
    rel = np.stack([cols + 0.5 - x, rows + 0.5 - y], axis=-1)
    a, b = rel @ u, rel @ v
    inside = (a >= 0) & (a <= w) & (b >= 0) & (b <= h)
    assert abs(int(kept.sum()) - w * h) < 0.1 * w * h
    assert iou(kept, inside) > 0.9
    # far outside the rotated box nothing is kept
    grown = (a >= -2) & (a <= w + 2) & (b >= -2) & (b <= h + 2)
    assert not kept[~grown].any()


# --------------------------------------------------------------------------- keypoints


def two_objects():
    im = canvas(120, 160)
    a = paint(im, slice(20, 60), slice(20, 60))
    b = paint(im, slice(70, 100), slice(90, 140))
    return im, a, b


def test_positive_point_selects_only_its_object():
    im, a, b = two_objects()
    seg = ColourSegmenter()
    prob, info = apply_prompts(im, ctx(point(40, 40, 160, 120)), seg)
    np.testing.assert_array_equal(prob[0] >= 0.5, a)
    assert np.all(prob[0][~a] == 0)
    assert seg.inputs == [(120, 160)] and "points +1/-0" in info

    prob, _ = apply_prompts(im, ctx(point(100, 80, 160, 120), point(30, 30, 160, 120)), seg)
    np.testing.assert_array_equal(prob[0] >= 0.5, a | b)


def test_negative_point_removes_its_object():
    im, _, b = two_objects()
    # alone, a negative click names no object: no mask at all (not the rest of the image)
    seg = ColourSegmenter()
    prob, info = apply_prompts(im, ctx(point(40, 40, 160, 120, positive=False)), seg)
    assert prob.shape == (1, 120, 160) and not prob.any()
    assert "1 lone negative click(s) dropped" in info

    both = ctx(point(40, 40, 160, 120, positive=False), point(100, 80, 160, 120))
    prob, _ = apply_prompts(im, both, ColourSegmenter())
    np.testing.assert_array_equal(prob[0] >= 0.5, b)


def test_positive_and_negative_point_on_one_object_split_it():
    im = canvas(100, 200)
    bar = paint(im, slice(40, 60), slice(20, 180))
    items = ctx(point(40, 50, 200, 100), point(140, 50, 200, 100, positive=False))
    prob, _ = apply_prompts(im, items, ColourSegmenter())
    kept = prob[0] >= 0.5
    left = bar.copy()
    left[:, 90:] = False  # pixels nearer to x = 40 than to x = 140
    np.testing.assert_array_equal(kept, left)


def test_point_on_background_falls_back_to_a_crop_around_it():
    im = canvas(256, 256)
    small = paint(im, slice(100, 106), slice(180, 186))
    big = paint(im, slice(20, 120), slice(20, 120))
    seg = ColourSegmenter(work_size=32)
    full = seg([im])[0][0] >= 0.5
    assert not full[small].any() and full[big].any()  # the whole image misses the small one
    seg.inputs.clear()

    prob, info = apply_prompts(im, ctx(point(183, 103, 256, 256)), seg)
    kept = prob[0] >= 0.5
    assert_found(kept, small)
    assert not kept[big].any()
    assert seg.inputs == [(256, 256), (64, 64)]  # whole image, then a 256/4 crop
    assert "1 crop fallback" in info

    # a click 10 px below it, on background in the crop too: the nearest component is taken
    prob, _ = apply_prompts(im, ctx(point(183, 115, 256, 256)), ColourSegmenter(work_size=32))
    assert_found(prob[0] >= 0.5, small)


def test_fallback_takes_the_component_nearest_to_the_point():
    im = canvas(256, 256)
    near = paint(im, slice(100, 106), slice(150, 156))
    far = paint(im, slice(100, 106), slice(176, 182))
    seg = ColourSegmenter(work_size=32)
    assert not (seg([im])[0] >= 0.5).any()
    prob, _ = apply_prompts(im, ctx(point(160, 112, 256, 256)), seg)
    kept = prob[0] >= 0.5
    assert_found(kept, near)
    assert not kept[far].any()


def test_point_with_nothing_anywhere_gives_an_empty_map():
    im = canvas(128, 128)
    prob, info = apply_prompts(im, ctx(point(64, 64, 128, 128)), ColourSegmenter())
    assert prob.shape == (1, 128, 128) and not prob.any()
    assert "1 empty" in info


def test_points_refine_within_the_box():
    im, _, b = two_objects()
    c = paint(im, slice(5, 15), slice(100, 150))  # outside the box
    box = np.zeros((120, 160), dtype=bool)
    box[10:110, 10:150] = True
    items = ctx(rect(10, 10, 140, 100, 160, 120), point(100, 80, 160, 120))
    seg = ColourSegmenter()
    prob, _ = apply_prompts(im, items, seg)
    np.testing.assert_array_equal(prob[0] >= 0.5, b)
    assert len(seg.inputs) == 1  # the box's crop only; the points reuse it

    # a positive point on the object outside the box adds nothing outside the box
    items = ctx(rect(10, 10, 140, 100, 160, 120), point(120, 10, 160, 120))
    prob, _ = apply_prompts(im, items, ColourSegmenter())
    assert not (prob[0] > 0)[c & ~box].any()
    assert np.all(prob[0][~box] == 0)

    # only a negative point: everything in the box but its object
    items = ctx(rect(10, 10, 140, 100, 160, 120), point(40, 40, 160, 120, positive=False))
    prob, _ = apply_prompts(im, items, ColourSegmenter())
    np.testing.assert_array_equal(prob[0] >= 0.5, (b | (c & box)))


def test_labelled_prompts_act_on_their_channel_others_on_all():
    im = canvas(120, 160)
    red = paint(im, slice(20, 60), slice(20, 60), RED)
    green = paint(im, slice(70, 100), slice(90, 140), GREEN)
    seg = ColourSegmenter(colours=(RED, GREEN))
    channels = [(0, "Red"), (1, "Green")]

    prob, _ = apply_prompts(
        im, ctx(point(100, 80, 160, 120, label="Green")), seg, channels=channels
    )
    assert prob.shape == (2, 120, 160)
    assert not prob[0].any()  # no prompt for this channel
    np.testing.assert_array_equal(prob[1] >= 0.5, green)

    # a label that names no channel acts on every channel: a negative of it on the red object
    # next to a positive of it on the green one keeps the green one in every channel it is in
    items = ctx(
        point(40, 40, 160, 120, positive=False, label="Other"),
        point(100, 80, 160, 120, label="Other"),
    )
    prob, _ = apply_prompts(im, items, seg, channels=channels)
    assert not (prob[0] >= 0.5).any()
    np.testing.assert_array_equal(prob[1] >= 0.5, green)
    assert not (prob > 0)[:, red].any()
    # negatives of that label alone name no object: no mask in any channel
    items = ctx(
        point(40, 40, 160, 120, positive=False, label="Other"),
        point(100, 80, 160, 120, positive=False, label="Other"),
    )
    prob, info = apply_prompts(im, items, seg, channels=channels)
    assert not prob.any() and "2 lone negative click(s) dropped" in info


# --------------------------------------------------------------------------- parsing


def test_captured_interactive_context_parses():
    body = json.loads((FIXTURES / "post_predict_interactive.json").read_text())["json"]
    context = body["params"]["context"]
    prompts = parse_context(context, 64, 96, to_name="image")
    assert prompts.boxes == () and prompts.ignored == 0
    (p,) = prompts.points
    assert (p.x, p.y, p.positive, p.label) == pytest.approx((38.4, 28.8, True, "Foreground"))
    # the same prompt on the fetched image at twice the size lands on the same spot
    (p2,) = parse_context(context, 128, 192).points
    assert (p2.x, p2.y) == pytest.approx((76.8, 57.6))

    im = canvas(64, 96)
    disc = np.zeros((64, 96), dtype=np.uint8)
    cv2.circle(disc, (38, 29), 12, 1, -1)
    im[disc.astype(bool)] = RED
    other = paint(im, slice(5, 15), slice(75, 90))
    prob, _ = apply_prompts(im, context, ColourSegmenter(), to_name="image")
    np.testing.assert_array_equal(prob[0] >= 0.5, disc.astype(bool))
    assert not prob[0][other].any()


def test_unknown_types_and_other_images_are_ignored():
    im, a, b = two_objects()
    choice = {"type": "choices", "value": {"choices": ["x"]}}
    elsewhere = dict(point(40, 40, 160, 120), to_name="other_image")
    seg = ColourSegmenter()
    prob, info = apply_prompts(im, ctx(choice, elsewhere), seg, to_name="image")
    np.testing.assert_array_equal(prob[0] >= 0.5, a | b)  # the plain prediction
    assert "no prompts" in info and "2 items ignored" in info


def test_missing_is_positive_and_original_size_default():
    item = point(40, 40, 160, 120)
    del item["is_positive"], item["original_width"], item["original_height"]
    (p,) = parse_context(ctx(item), 120, 160).points
    assert p.positive and (p.x, p.y) == pytest.approx((40, 40))


def _without(item, key):
    item = json.loads(json.dumps(item))
    del item["value"][key]
    return item


MALFORMED = [
    (None, "'result' list"),
    ({"result": "x"}, "'result' list"),
    ({"result": [7]}, "#0 is not an object"),
    (ctx({"type": "keypointlabels", "id": "k1"}), "'k1': value must be an object"),
    (ctx(_without(point(1, 1, 10, 10), "x")), "value.x must be a finite number"),
    (ctx(dict(point(1, 1, 10, 10), value={"x": "5", "y": 5})), "value.x must be a finite"),
    (ctx(dict(point(1, 1, 10, 10), value={"x": True, "y": 5})), "value.x must be a finite"),
    (ctx(dict(point(1, 1, 10, 10), value={"x": float("nan"), "y": 5})), "value.x must be"),
    (ctx(point(12, 5, 10, 10)), "lies outside the image"),
    (ctx(dict(point(1, 1, 10, 10), is_positive="yes")), "is_positive must be true or false"),
    (ctx(dict(point(1, 1, 10, 10), original_width=0)), "original_width must be a positive"),
    (ctx(dict(point(1, 1, 10, 10), original_height="64")), "original_height must be"),
    (ctx(_without(rect(1, 1, 5, 5, 10, 10), "height")), "value.height must be a finite"),
    (ctx(rect(1, 1, 0, 5, 10, 10)), "width and height must be > 0"),
    (ctx(rect(20, 1, 5, 5, 10, 10)), "rectangle lies outside the image"),
    (ctx(rect(1, 1, 5, 5, 10, 10, rotation="9")), "value.rotation must be a finite number"),
    (ctx(rect(1, 1, 5, 5, 10, 10, rotation=float("inf"))), "rotation must be a finite"),
    (ctx(rect(1, 1, 5, 5, 10, 10, rectanglelabels="A")), "must be a list of labels"),
    (ctx(dict(rect(1, 1, 5, 5, 10, 10), original_width=1e-310)), "rectangle is out of range"),
]


@pytest.mark.parametrize(("context", "message"), MALFORMED)
def test_malformed_context_is_a_bad_request(context, message):
    seg = ColourSegmenter()
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(".", r"\.")):
        apply_prompts(canvas(10, 10), context, seg)
    assert seg.inputs == []  # refused before any model call


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def predictor():
    from sam2unet.config import ModelConfig
    from sam2unet.predictor import Predictor
    from sam2unet.random_weights import random_model

    loaded = random_model(ModelConfig(size="test", image_size=64))
    return Predictor(loaded.model, loaded.config, device="cpu", batch_size=4)


def test_real_model_box_and_points_plumbing(predictor):
    rng = np.random.default_rng(0)
    im = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    items = ctx(rect(30, 20, 50, 40, 128, 96), point(50, 40, 128, 96))
    prob, _ = apply_prompts(im, items, predictor.predict, threshold=0.5)
    assert prob.shape == (1, 96, 128) and prob.dtype == np.float32
    box = np.zeros((96, 128), dtype=bool)
    box[20:60, 30:80] = True
    assert np.all(prob[0][~box] == 0)
    assert prob.min() >= 0.0 and prob.max() <= 1.0

    # with a threshold every model output passes, the box alone keeps exactly the box
    prob, _ = apply_prompts(im, ctx(rect(30, 20, 50, 40, 128, 96)), predictor.predict, 1e-9)
    np.testing.assert_array_equal(prob[0] > 0, box)


def test_real_model_interactive_latency_512(predictor):
    rng = np.random.default_rng(1)
    im = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    cases = {
        "point": ctx(point(256, 256, 512, 512)),
        "box": ctx(rect(100, 120, 200, 160, 512, 512)),
        "box+point": ctx(rect(100, 120, 200, 160, 512, 512), point(200, 200, 512, 512)),
    }
    apply_prompts(im, cases["point"], predictor.predict)  # warm-up
    for name, context in cases.items():
        t0 = time.perf_counter()
        prob, info = apply_prompts(im, context, predictor.predict)
        print(f"  {info}")
        dt = time.perf_counter() - t0
        print(f"interactive {name} on 512x512, test-size model at 64 px (CPU): {dt * 1e3:.1f} ms")
        assert prob.shape == (1, 512, 512)


# --------------------------------------------------------------------------- the worker pipeline


def test_pipeline_runs_prompts_uncached_and_reports_bad_contexts(model_dir, redis_conn):
    from contracts.jobs import PredictItem, PredictPayload
    from contracts.settings import Settings
    from labelstudio.labelconfig import parse_label_config, target_to_json
    from modelstore.registry import ModelRegistry
    from worker.pipeline import run_predict
    from worker.runtime import ModelRuntime

    # a trained version: one whose decoder was never trained makes no automatic prediction
    settings = Settings(model_size="test", image_size=64, model_dir=model_dir, device="cpu")
    runtime = ModelRuntime(settings, ModelRegistry(model_dir, None))
    body = json.loads((FIXTURES / "post_predict_interactive.json").read_text())["json"]
    target = target_to_json(parse_label_config(body["label_config"], "tag"))
    im = np.random.default_rng(2).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    png = buf.getvalue()

    def fetch(url: str, base: str | None, task: int | None) -> bytes:
        return png

    def run(context):
        payload = PredictPayload(
            items=(PredictItem(0, "/data/upload/1/x.png", 1),),
            target=target,
            reply_key="unused",
            context=context,
        )
        (res,) = run_predict(
            payload, runtime, fetch, redis_conn, threshold=1e-9, cache_ttl=60, fetch_threads=1
        )
        return res

    from labelstudio.codecs import rle_to_mask

    plain = run(None)  # fills the cache for this image
    assert plain.error is None and not plain.cached
    boxed = run(ctx(rect(10, 8, 40, 30, 96, 64)))
    assert boxed.error is None and not boxed.cached
    (item,) = boxed.result
    mask = rle_to_mask(item["value"]["rle"], 64, 96)
    box = np.zeros((64, 96), dtype=bool)
    box[8:38, 10:50] = True
    np.testing.assert_array_equal(mask, box)
    assert run(None).cached  # the plain result is still served from the cache

    bad = run(ctx(point(200, 10, 96, 64)))
    assert bad.result == [] and "lies outside the image" in bad.error
