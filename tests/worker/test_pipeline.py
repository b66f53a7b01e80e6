"""SAM2's own promptable head: parity with ``sam2``'s SAM2ImagePredictor through the whole
worker path, the embedding cache, and the interactive call's routing to the worker holding an
image's features.

Checkpoints are official-format files with random weights, made by the ``sam2`` package's own
configs (tests/support/sam2_helpers.py). The reference predictor's three torchvision transforms come
from the test-only stand-in in tests/support/torchvision_stub.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.jobs import PredictItem, PredictPayload
from contracts.settings import Settings
from labelstudio.codecs import rle_to_mask
from labelstudio.labelconfig import parse_label_config, target_to_json
from modelstore.bootstrap import ensure_current_version
from modelstore.registry import ModelRegistry
from sam2unet.prompt_head import PromptObject, preprocess_image
from sam2unet.random_weights import write_random_sam2_checkpoint
from tests.support.sam2_helpers import reference_predictor
from tests.support.services import png_bytes
from worker.embeddings import EmbeddingCache
from worker.pipeline import run_predict
from worker.runtime import ModelRuntime

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Foreground"/><Label value="Background"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Foreground"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true">
    <Label value="Foreground"/>
  </RectangleLabels>
</View>"""
TARGET = parse_label_config(LABEL_CONFIG)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A textured image with a bright disc (odd sizes in the tests)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 90 + 60).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2 < (min(h, w) / 4) ** 2] = (230, 200, 40)
    return img


# --------------------------------------------------------------------------- Label Studio items


def kp(x: float, y: float, positive: bool = True) -> dict:
    """A smart keypoint at (x, y) percent."""
    return {
        "id": f"kp{x}-{y}",
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "image",
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Foreground"]},
    }


def rect(x: float, y: float, w: float, h: float) -> dict:
    """A smart rectangle, percent of the image."""
    return {
        "id": f"r{x}-{y}",
        "type": "rectanglelabels",
        "from_name": "rect",
        "to_name": "image",
        "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": ["Foreground"]},
    }


def px(item: dict, h: int, w: int) -> tuple[float, ...]:
    """The pixel coordinates of an item, as the worker computes them from percents."""
    v = item["value"]
    if item["type"] == "keypointlabels":
        return (v["x"] * w / 100, v["y"] * h / 100)
    x0, y0 = v["x"] * w / 100, v["y"] * h / 100
    return (x0, y0, x0 + v["width"] * w / 100, y0 + v["height"] * h / 100)


#: name -> objects, each (keypoints, rectangle or None): one result per object.
CASES = {
    "click": [([kp(40.0, 45.0)], None)],
    "clicks+negative": [([kp(55.0, 45.0), kp(47.5, 30.0), kp(20.0, 80.0, False)], None)],
    "box": [([], rect(30.0, 20.0, 45.5, 50.25))],
    "box+points": [([kp(52.0, 44.0), kp(35.0, 25.0, False)], rect(25.0, 15.0, 55.0, 60.0))],
    "two boxes": [([], rect(5.0, 5.0, 30.0, 40.0)), ([], rect(50.0, 40.0, 45.0, 55.0))],
}


def context(objects) -> dict:
    items = []
    for points, box in objects:
        if box is not None:
            items.append(box)
        items.extend(points)
    return {"result": items}


def reference(predictor, objects, h: int, w: int) -> list[tuple[np.ndarray, float]]:
    """(logits, predicted IoU) per object from sam2's own predictor, as documented for it:
    one click -> three masks, the best IoU kept; otherwise one mask."""
    out = []
    for points, box in objects:
        kwargs = {}
        if points:
            kwargs["point_coords"] = np.array([px(p, h, w) for p in points])
            kwargs["point_labels"] = np.array([int(p["is_positive"]) for p in points])
        if box is not None:
            kwargs["box"] = np.array(px(box, h, w))
        single = box is None and len(points) == 1
        logits, ious, _ = predictor.predict(multimask_output=single, return_logits=True, **kwargs)
        best = int(np.argmax(ious))
        out.append((logits[best], float(ious[best])))
    return out


def prompt_objects(objects, h: int, w: int) -> list[PromptObject]:
    return [
        PromptObject(
            tuple(px(p, h, w) for p in points),
            tuple(int(p["is_positive"]) for p in points),
            px(box, h, w) if box is not None else None,
        )
        for points, box in objects
    ]


# --------------------------------------------------------------------------- fixtures


def make_runtime(model_dir: Path, size: str, **settings) -> ModelRuntime:
    """A worker's model runtime whose current version was made from the official checkpoint
    in ``model_dir/base`` (fresh adapters and decoder)."""
    s = Settings(model_size=size, image_size=64, model_dir=model_dir, device="cpu", **settings)
    registry = ModelRegistry(model_dir, None)
    ensure_current_version(registry, s)
    rt = ModelRuntime(s, registry)
    rt.ensure_current()
    return rt


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """size -> (model dir with its official checkpoint, the SAM2Base built from it)."""
    made: dict[str, tuple[Path, object]] = {}

    def get(size: str):
        if size not in made:
            d = tmp_path_factory.mktemp(f"sam2-{size}")
            model = write_random_sam2_checkpoint(d / "base" / f"sam2.1_hiera_{size}.pt", size)
            made[size] = (d, model)
        return made[size]

    return get


def count_trunk_runs(rt: ModelRuntime) -> list[int]:
    """A forward hook on the runtime's real trunk module: the list's one item counts its runs."""
    runs = [0]

    def hook(*_):
        runs[0] += 1

    rt.predictor.model.encoder.register_forward_hook(hook)
    return runs


def predict(rt: ModelRuntime, img: np.ndarray, ctx: dict, url: str = "img.png", conn=None):
    data = png_bytes(img)
    payload = PredictPayload(
        items=(PredictItem(0, url, 1),),
        target=target_to_json(TARGET),
        reply_key=None,
        context=ctx,
    )
    (res,) = run_predict(payload, rt, lambda u, b, t=None: data, conn, threshold=0.5)
    assert res.error is None, res.error
    return res


# --------------------------------------------------------------------------- parity

SIZES = [
    "test",
    "tiny",
    pytest.param("small", marks=pytest.mark.slow),
    pytest.param("base_plus", marks=pytest.mark.slow),
    pytest.param("large", marks=pytest.mark.slow),
]
SHAPES = {"test": (37, 53), "tiny": (123, 97)}


@pytest.mark.parametrize("size", SIZES)
def test_worker_path_gives_sam2_image_predictors_masks(size, official):
    """Label Studio percent coordinates in, brush RLE at the image's size out: the masks are
    SAM2ImagePredictor's on the same weights, image and prompts; logits within 1e-4."""
    model_dir, sam2_model = official(size)
    rt = make_runtime(model_dir, size)
    assert rt.prompt_head == "sam2"
    h, w = SHAPES.get(size, (71, 89))
    img = image(h, w)
    ref = reference_predictor(sam2_model, size)
    ref.set_image(img)
    # the features the worker path caches for this image (one trunk run for all cases)
    features, _ = rt.image_features(img, hashlib.sha256(png_bytes(img)).hexdigest())
    for name, objects in CASES.items():
        expected = reference(ref, objects, h, w)
        # logits and scores of our head, object by object
        ours = rt.promptable.predict(features, prompt_objects(objects, h, w))
        for (logits, iou), answer in zip(expected, ours, strict=True):
            assert np.abs(answer.logits - logits).max() <= 1e-4, name
            assert answer.score == pytest.approx(iou, abs=1e-5), name
        # the whole worker path: one brush result per non-empty object, decoded back
        res = predict(rt, img, context(objects))
        kept = [(lg, iou) for lg, iou in expected if (lg > 0).any()]
        assert len(res.result) == len(kept), name
        for item, (logits, iou) in zip(res.result, kept, strict=True):
            assert item["type"] == "brushlabels"
            assert item["value"]["brushlabels"] == ["Foreground"]
            assert (item["original_height"], item["original_width"]) == (h, w)
            mask = rle_to_mask(item["value"]["rle"], h, w)
            assert np.array_equal(mask, logits > 0), name
            assert item["score"] == pytest.approx(iou, abs=1e-5)
        assert res.score == pytest.approx(np.mean([iou for _, iou in expected]), abs=1e-5)
        assert 0 < sum(int((lg > 0).sum()) for lg, _ in expected) < len(expected) * h * w


def test_parity_needs_the_adapters_bypassed(official, monkeypatch):
    """With the adapters left on, the same path no longer gives SAM2's masks."""
    model_dir, sam2_model = official("test")
    rt = make_runtime(model_dir, "test")
    h, w = SHAPES["test"]
    img = image(h, w, seed=3)
    ref = reference_predictor(sam2_model, "test")
    ref.set_image(img)
    objects = CASES["box+points"]
    ((expected, _),) = reference(ref, objects, h, w)
    monkeypatch.setattr("sam2unet.prompt_head.adapters_bypassed", lambda trunk: nullcontext())
    (answer,) = rt.promptable.predict(rt.promptable.embed(img), prompt_objects(objects, h, w))
    assert np.abs(answer.logits - expected).max() > 1e-2
    monkeypatch.undo()
    (answer,) = rt.promptable.predict(rt.promptable.embed(img), prompt_objects(objects, h, w))
    assert np.abs(answer.logits - expected).max() <= 1e-4


def test_preprocessing_matches_torchvision_semantics():
    """Our preprocessing and the stand-in's ToTensor + Resize + Normalize agree exactly, on
    odd sizes up and down."""
    from tests.support.sam2_helpers import torchvision_stub

    with torchvision_stub():
        from torchvision.transforms import Normalize, Resize, ToTensor
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for h, w in ((37, 53), (300, 1500), (256, 256)):
        img = image(h, w, seed=h)
        expected = Normalize(mean, std)(Resize((256, 256))(ToTensor()(img)))
        assert np.array_equal(preprocess_image(img, 256)[0].numpy(), expected.numpy())


def test_checkpoint_without_the_head_falls_back_to_crop(model_dir):
    """The session fixture's versions have a random trunk (no SAM2 head): prompts are
    answered by crop-and-segment."""
    rt = ModelRuntime(
        Settings(model_size="test", image_size=64, model_dir=model_dir, device="cpu"),
        ModelRegistry(model_dir, None),
    )
    rt.ensure_current()
    assert rt.prompt_head == "crop" and rt.promptable is None
    res = predict(rt, image(64, 96), {"result": [kp(50.0, 45.0)]})
    assert res.error is None


# --------------------------------------------------------------------------- cache


def test_second_prompt_on_an_image_does_not_run_the_trunk(official):
    model_dir, _ = official("test")
    rt = make_runtime(model_dir, "test")
    runs = count_trunk_runs(rt)
    a, b = image(37, 53, seed=1), image(41, 29, seed=2)
    predict(rt, a, {"result": [kp(40.0, 45.0)]})
    assert runs[0] == 1
    second = predict(rt, a, {"result": [rect(20.0, 20.0, 50.0, 50.0), kp(40.0, 45.0)]})
    third = predict(rt, a, {"result": [kp(60.0, 30.0), kp(10.0, 10.0, False)]})
    assert runs[0] == 1 and second.result and third.result
    predict(rt, b, {"result": [kp(40.0, 45.0)]})
    assert runs[0] == 2
    assert rt.embeddings.stats.hits == 2 and rt.embeddings.stats.misses == 2
    # the cached answer is the one computed from scratch
    fresh = make_runtime(model_dir, "test")
    again = predict(fresh, a, {"result": [rect(20.0, 20.0, 50.0, 50.0), kp(40.0, 45.0)]})
    assert again.result[0]["value"]["rle"] == second.result[0]["value"]["rle"]


def test_cache_stays_within_its_bytes_and_evicts_least_recently_used(official):
    model_dir, _ = official("test")
    rt = make_runtime(model_dir, "test", embedding_cache_mb=1)
    runs = count_trunk_runs(rt)
    images = [image(37, 53, seed=10 + i) for i in range(12)]
    for img in images:
        predict(rt, img, {"result": [kp(40.0, 45.0)]})
        assert rt.embeddings.bytes <= 2**20
    per_image = rt.embeddings.bytes // len(rt.embeddings)
    assert len(rt.embeddings) == 2**20 // per_image < len(images)
    assert runs[0] == len(images) and rt.embeddings.stats.evictions == len(images) - len(
        rt.embeddings
    )
    predict(rt, images[-1], {"result": [kp(30.0, 45.0)]})  # still cached
    assert runs[0] == len(images)
    predict(rt, images[0], {"result": [kp(30.0, 45.0)]})  # evicted first
    assert runs[0] == len(images) + 1


def test_cache_bound_unit():
    """LRU order and the byte bound, on tensors of known size."""
    from sam2unet.prompt_head import ImageFeatures

    def feats(n: int) -> ImageFeatures:
        return ImageFeatures(torch.zeros(n), (torch.zeros(n),), (1, 1))  # 8n bytes

    cache = EmbeddingCache(100)
    assert cache.put("a", "base", feats(5)) and cache.put("b", "base", feats(5))
    assert cache.get("a", "base") is not None  # a is now the most recent
    assert cache.put("c", "base", feats(5))  # evicts b
    assert ("b", "base") not in cache and ("a", "base") in cache and cache.bytes == 80
    assert not cache.put("big", "base", feats(13))  # 104 bytes alone exceed the bound
    assert cache.get("a", "other-base") is None  # the key includes the base


def test_cache_key_includes_the_base_checkpoint(official, tmp_path):
    """A version on another base checkpoint embeds the image again (and answers as that
    base's SAM2 does)."""
    from sam2unet.checkpoints import build_from_sam2

    model_dir, _ = official("test")
    rt = make_runtime(model_dir, "test")
    img = image(37, 53, seed=5)
    ctx = {"result": [rect(20.0, 20.0, 50.0, 50.0)]}
    predict(rt, img, ctx)
    first_base = rt.base_sha
    other = write_random_sam2_checkpoint(
        model_dir / "base" / "sam2.1_hiera_test-b.pt", "test", seed=7
    )
    loaded = build_from_sam2(model_dir / "base" / "sam2.1_hiera_test-b.pt")
    with torch.no_grad():
        info = rt.registry.create_version(loaded.model, loaded.config, loaded.base)
    rt.registry.promote(info.name)
    rt.ensure_current()
    assert rt.base_sha != first_base
    runs = count_trunk_runs(rt)
    res = predict(rt, img, ctx)
    assert runs[0] == 1
    ref = reference_predictor(other, "test")
    ref.set_image(img)
    ((logits, _),) = reference(ref, [([], ctx["result"][0])], 37, 53)
    assert np.array_equal(rle_to_mask(res.result[0]["value"]["rle"], 37, 53), logits > 0)


# --------------------------------------------------------------------------- routing


def test_routing_falls_back_when_the_worker_is_unregistered(redis_conn):
    """A route to a worker rq does not know gives no queue; a job left in a gone worker's
    queue is moved to the shared interactive queue, once, without running twice."""
    from rq import Queue
    from rq.job import Job

    from contracts.jobs import QUEUE_INTERACTIVE
    from contracts.routing import remember_route, rescue_routed, routed_queue, worker_queue

    remember_route(redis_conn, None, "http://x/a.png", "gone-worker")
    assert routed_queue(redis_conn, None, "http://x/a.png") is None
    q = Queue(worker_queue("gone-worker"), connection=redis_conn)
    job = q.enqueue("builtins.print", "x")
    assert rescue_routed(redis_conn) == [job.id]
    assert rescue_routed(redis_conn) == []
    shared = Queue(QUEUE_INTERACTIVE, connection=redis_conn)
    assert shared.job_ids == [job.id] and q.count == 0
    assert Job.fetch(job.id, connection=redis_conn).origin == QUEUE_INTERACTIVE


def test_status_reports_the_head_workers_serve(official, model_dir, tmp_path):
    """``has_prompt_decoder`` (what /health and `versions show` report) says "sam2" exactly
    when the worker's strict loading of the head succeeds: not for a trunk-only file, nor for
    one whose prompt decoder keys are there but incomplete."""
    from sam2unet.checkpoints import has_prompt_decoder

    sam2_dir, _ = official("test")
    path = sam2_dir / "base" / "sam2.1_hiera_test.pt"
    assert has_prompt_decoder(path)
    (trunk_only,) = (model_dir / "base").glob("trunk-*.pt")
    assert not has_prompt_decoder(trunk_only)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    del raw["model"]["sam_mask_decoder.iou_token.weight"]
    torch.save(raw, tmp_path / "partial.pt")
    assert not has_prompt_decoder(tmp_path / "partial.pt")
    partial_dir = tmp_path / "models"
    (partial_dir / "base").mkdir(parents=True)
    (tmp_path / "partial.pt").rename(partial_dir / "base" / "sam2.1_hiera_test.pt")
    assert make_runtime(partial_dir, "test").prompt_head == "crop"


def test_torchvision_is_absent_after_the_reference_tests():
    """Last in this module, after every test that imported the torchvision stand-in (the
    reference predictor, the preprocessing check): neither its path nor its modules are left,
    so torchvision cannot be imported, as in the product's environment."""
    import importlib.util
    import sys

    from tests.support.sam2_helpers import STUB

    assert str(STUB) not in sys.path
    assert not [m for m in sys.modules if m.split(".")[0] == "torchvision"]
    assert importlib.util.find_spec("torchvision") is None
