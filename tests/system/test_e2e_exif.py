"""Phone photos through the real stack (the Flask app, worker processes, Redis): a JPEG whose
EXIF Orientation tag turns it on screen gets predictions and answers to prompts (given, as Label
Studio gives them, in percent of the displayed image) in the displayed frame: the same size and
masks as the same displayed pixels sent without the tag.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from contextlib import ExitStack

import numpy as np
import pytest
import redis

from backend.app import create_app
from contracts.settings import Settings
from labelstudio.client import LabelStudioClient
from labelstudio.codecs import brush_result, rle_to_mask
from labelstudio.fetch import FetchPolicy, ImageFetcher
from labelstudio.labelconfig import parse_label_config
from launcher.redis_server import EmbeddedRedis
from sam2unet.random_weights import write_random_sam2_checkpoint
from sam2unet.transforms import decode_image
from tests.labelstudio.test_exif import displayed, jpeg
from tests.support.lstudio import running_label_studio
from tests.support.services import (
    LabelStudioLikeFiles,
    connected_stack,
    label_studio_env,
    png_bytes,
    service_env,
    workers,
)
from tests.worker.test_pipeline import LABEL_CONFIG, kp, make_runtime, rect
from trainer.dataset import DatasetCache

ORIENTATIONS = range(2, 9)


def phone_photo(seed: int, h: int = 57, w: int = 83) -> np.ndarray:
    """Stored pixels: a red disc off the centre (towards the stored top-left) on texture, so
    that every turn or flip moves it."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h * 0.38) ** 2 + (xx - w * 0.32) ** 2 < (min(h, w) / 4) ** 2] = (220, 30, 30)
    return img


def disc_centre(shown: np.ndarray) -> tuple[float, float]:
    """(x, y) percent of the red disc's centre in a displayed image."""
    red = (shown[..., 0] > 180) & (shown[..., 1] < 90)
    ys, xs = np.nonzero(red)
    h, w = red.shape
    return (xs.mean() + 0.5) * 100 / w, (ys.mean() + 0.5) * 100 / h


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


class Stack:
    """One model directory served by one worker process and the Flask app, on a Redis of its
    own; images served from loopback."""

    def __init__(self, model_dir, files: LabelStudioLikeFiles, conn, url) -> None:
        self.files, self.conn = files, conn
        self.app = create_app(Settings.from_env(service_env(url, model_dir)), conn).test_client()
        self.ids = itertools.count(1)

    def add(self, name: str, data: bytes) -> dict:
        rel = self.files.add(f"upload/1/{name}", data)
        return {"id": next(self.ids), "data": {"image": f"{self.files.url}/{rel}"}}

    def predict(self, tasks: list[dict], context: dict | None = None) -> list[dict]:
        body = {"tasks": tasks, "label_config": LABEL_CONFIG, "project": "1.1"}
        if context is not None:
            body["params"] = {"context": context}
        r = self.app.post("/predict", json=body)
        assert r.status_code == 200, r.get_json()
        return r.get_json()["results"]


@pytest.fixture(scope="module")
def stacks(model_dir, tmp_path_factory):
    """name -> Stack: ``trained`` (the session's trained test-size model: automatic predictions,
    prompts answered by crop-and-segment) and ``sam2`` (an official-format SAM2.1 checkpoint:
    prompts answered by SAM2's promptable head)."""
    sam2_dir = tmp_path_factory.mktemp("sam2-models")
    write_random_sam2_checkpoint(sam2_dir / "base" / "sam2.1_hiera_test.pt", "test")
    make_runtime(sam2_dir, "test")  # its first version, on the official base
    files = LabelStudioLikeFiles(tmp_path_factory.mktemp("photos"))
    logs = tmp_path_factory.mktemp("exif-logs")
    with EmbeddedRedis() as server, ExitStack() as stack:
        stack.callback(files.close)
        out = {}
        for db, (name, d) in enumerate((("trained", model_dir), ("sam2", sam2_dir)), 1):
            url = f"redis://127.0.0.1:{server.port}/{db}"
            conn = redis.Redis.from_url(url)
            stack.callback(conn.close)
            stack.enter_context(workers(service_env(url, d), conn, 1, logs))
            out[name] = Stack(d, files, conn, url)
        yield out


def tagged_and_plain(orientation: int, seed: int) -> tuple[bytes, bytes, np.ndarray]:
    """(tagged phone JPEG, PNG of the same displayed pixels without a tag, those pixels)."""
    stored = phone_photo(seed)
    shown = displayed(decode_image(jpeg(stored)), orientation)
    return jpeg(stored, orientation), png_bytes(shown), shown


def masks_of(result: dict) -> tuple[tuple[int, int], np.ndarray]:
    """((height, width) of the result, union of its brush masks)."""
    items = result["result"]
    assert items, result
    h, w = items[0]["original_height"], items[0]["original_width"]
    out = np.zeros((h, w), bool)
    for item in items:
        assert item["type"] == "brushlabels"
        assert (item["original_height"], item["original_width"]) == (h, w)
        out |= rle_to_mask(item["value"]["rle"], h, w)
    return (h, w), out


def same_answer(tagged: dict, plain: dict, shown: np.ndarray, what: str) -> float:
    size_t, mask_t = masks_of(tagged)
    size_p, mask_p = masks_of(plain)
    assert size_p == shown.shape[:2], what
    assert size_t == size_p, f"{what}: {size_t} for the tagged photo, {size_p} as displayed"
    assert 0 < mask_p.sum() < mask_p.size, f"{what}: the test needs a non-trivial mask"
    score = iou(mask_t, mask_p)
    assert score >= 0.99, f"{what}: IoU {score:.3f}"
    return score


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_predictions_are_in_the_displayed_frame(stacks, orientation):
    s = stacks["trained"]
    tagged, plain, shown = tagged_and_plain(orientation, seed=orientation)
    results = s.predict(
        [s.add(f"p{orientation}.jpg", tagged), s.add(f"p{orientation}-shown.png", plain)]
    )
    same_answer(results[0], results[1], shown, f"/predict, orientation {orientation}")
    # the disc is where the screen shows it
    _, mask = masks_of(results[0])
    x, y = disc_centre(shown)
    assert mask[int(y * shown.shape[0] / 100), int(x * shown.shape[1] / 100)]


def prompt_on_the_disc(kind: str, shown: np.ndarray) -> dict:
    """A smart keypoint on the disc or a smart rectangle around it, in percent of the
    displayed image, as Label Studio's editor sends them."""
    h, w = shown.shape[:2]
    x, y = disc_centre(shown)
    rw, rh = 100 * (min(h, w) / 2 + 4) / w, 100 * (min(h, w) / 2 + 4) / h
    item = kp(x, y) if kind == "keypoint" else rect(max(x - rw / 2, 0), max(y - rh / 2, 0), rw, rh)
    item.update(original_width=w, original_height=h, image_rotation=0)
    return item


@pytest.mark.parametrize("kind", ["keypoint", "rectangle"])
@pytest.mark.parametrize("head", ["trained", "sam2"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_prompt_answers_are_in_the_displayed_frame(stacks, head, orientation, kind):
    s = stacks[head]
    tagged, plain, shown = tagged_and_plain(orientation, seed=10 + orientation)
    ctx = {"result": [prompt_on_the_disc(kind, shown)]}
    (on_tagged,) = s.predict([s.add(f"q{orientation}.jpg", tagged)], ctx)
    (on_plain,) = s.predict([s.add(f"q{orientation}-shown.png", plain)], ctx)
    same_answer(on_tagged, on_plain, shown, f"{head} {kind}, orientation {orientation}")


# --------------------------------------------------------------------------- Label Studio

AUTH = ("ls-backend", "b4ckend-pass")


@pytest.mark.e2e
def test_a_phone_photo_through_label_studio(tmp_path, redis_url, model_dir):
    """A photo taken holding the phone upright (stored sideways, tag 6) uploaded to a real Label
    Studio 1.23.2: its prediction, the answer to a smart keypoint, and the training sample made
    from a brush annotation drawn on it are all in the frame Label Studio shows."""
    target = parse_label_config(LABEL_CONFIG)
    tagged, plain, shown = tagged_and_plain(6, seed=3)
    h, w = shown.shape[:2]
    assert (h, w) == (83, 57)  # taller than wide on screen, wider than tall as stored
    with (
        running_label_studio(tmp_path / "ls") as ls,
        connected_stack(ls, redis_url, model_dir, AUTH, tmp_path / "logs", "exif-worker") as stack,
    ):
        url = stack[0]
        env = label_studio_env(redis_url, model_dir, ls, AUTH)  # the services' settings
        project = ls.create_project(LABEL_CONFIG, title="phone photos")
        photo, twin = ls.import_images(project, [("phone.jpg", tagged), ("shown.png", plain)])
        ml = ls.add_ml_backend(project, url, AUTH, "sam2unet-assist", True)

        # predictions, as Label Studio retrieves and stores them
        ls.retrieve_predictions(project)
        stored = {}
        for tid in (photo, twin):
            deadline = time.monotonic() + 120
            while not (preds := ls.predictions(tid)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert preds, f"no prediction for task {tid}"
            stored[tid] = preds[-1]
        same_answer(stored[photo], stored[twin], shown, "Label Studio's stored prediction")

        # a smart keypoint on the disc, sent the way Label Studio's editor sends it
        answers = {}
        for tid in (photo, twin):
            r = ls.api(
                "POST",
                f"/api/ml/{ml['id']}/interactive-annotating",
                json={
                    "task": tid,
                    "context": {"result": [prompt_on_the_disc("keypoint", shown)]},
                },
            )
            assert r.status_code == 200, r.text
            answers[tid] = r.json()["data"]
        same_answer(answers[photo], answers[twin], shown, "interactive keypoint")

        # the annotator paints the disc as Label Studio shows it
        _, predicted = masks_of(stored[photo])
        drawn = np.zeros((h, w), bool)
        drawn[: h // 2, : w // 2] = predicted[: h // 2, : w // 2]
        drawn[2:6, 2:9] = True
        item = brush_result(drawn, target, "Foreground", 1.0)
        item.pop("score", None)
        ls.annotate(photo, [item])

        # the trainer's training set, read from Label Studio the way the trainer reads it
        settings = Settings.from_env(
            {k: v for k, v in env.items() if k.startswith(("SAM2UNET_", "LABEL_STUDIO"))},
            model_dir=model_dir,
        )
        client = LabelStudioClient(ls.url, ls.pat)
        fetcher = ImageFetcher(client, FetchPolicy.from_settings(settings))
        cache = DatasetCache(tmp_path / "dataset")
        report = cache.sync(client, project, fetcher.fetch)
        fetcher.close()
        assert (report.samples, report.failed) == (1, 0)
        ((sample, rgb, masks),) = cache.samples(project)
        assert sample.task == photo
        assert sample.image == hashlib.sha256(tagged).hexdigest()  # Label Studio kept the tag
        assert (sample.height, sample.width) == (h, w)
        assert np.array_equal(rgb, shown)
        assert masks.shape == (2, h, w)  # Foreground, Background
        assert np.array_equal(masks[0] > 0, drawn) and not masks[1].any()
