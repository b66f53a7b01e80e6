"""End to end with a real Label Studio 1.23.2: annotations submitted with only smart keypoints
and rectangles (the suggestion never accepted) are stored by Label Studio as such; a trainer
round over them trains on masks derived from those prompts with SAM2's head (the worker's
answer to the same prompts), and says so in its report, the rounds list and /health. With
``SAM2UNET_DERIVE_PROMPT_MASKS=false`` the round skips them and counts them.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis

from backend.app import create_app
from contracts.metrics import ROUNDS_KEY
from contracts.settings import Settings
from labelstudio.client import LabelStudioClient
from labelstudio.codecs import results_to_masks
from labelstudio.fetch import FetchPolicy, ImageFetcher
from sam2unet.random_weights import write_random_sam2_checkpoint
from tests.support.lstudio import running_label_studio
from tests.support.services import label_studio_env, png_bytes
from tests.system.test_untrained_decoder import versions_cli
from tests.worker.test_pipeline import LABEL_CONFIG, TARGET, image, kp, make_runtime, predict, rect
from trainer.service import TrainerService

pytestmark = pytest.mark.e2e
H, W = 48, 64
N = 6


def prompts_of(i: int) -> list[dict]:
    """Task ``i``'s smart prompts: a click, a click and a negative one, or a rectangle."""
    items = [
        [kp(50.0 + i, 45.0)],
        [kp(55.0, 45.0), kp(10.0, 85.0, False)],
        [rect(25.0, 15.0, 55.0, 60.0)],
    ][i % 3]
    for it in items:
        it.update(original_width=W, original_height=H, image_rotation=0)
    return items


def trainer(env: dict[str, str], conn: redis.Redis, ls, **extra: str) -> TrainerService:
    settings = Settings.from_env({**env, **extra})
    client = LabelStudioClient(ls.url, ls.pat)
    fetch = ImageFetcher(client, FetchPolicy.from_settings(settings)).fetch
    return TrainerService(settings, conn, client, fetch, consumer=f"t-{time.time_ns()}")


def test_a_round_over_prompt_only_annotations_trains_on_derived_masks(
    tmp_path, redis_url, monkeypatch, capsys
):
    conn = redis.Redis.from_url(redis_url)
    model_dir = tmp_path / "models"
    write_random_sam2_checkpoint(model_dir / "base" / "sam2.1_hiera_test.pt", "test")
    rt = make_runtime(model_dir, "test")  # the first version, on the official base
    images = [image(H, W, seed=40 + i) for i in range(N)]
    # what the worker answers to each task's prompts: the masks the round must train on
    expected = []
    for i, img in enumerate(images):
        res = predict(rt, img, {"result": [dict(it) for it in prompts_of(i)]})
        expected.append(results_to_masks(res.result, TARGET, H, W)["Foreground"])
        assert expected[-1].any()
    with running_label_studio(tmp_path / "ls") as ls:
        project = ls.create_project(LABEL_CONFIG, title="submitted before accepting")
        ids = ls.import_images(project, [(f"p{i}.png", png_bytes(im)) for i, im in
                                         enumerate(images)])  # fmt: skip
        for i, tid in enumerate(ids):
            ls.annotate(tid, prompts_of(i))
        # Label Studio keeps the prompts as submitted: keypoints (with is_positive), rectangles
        stored = ls.api("GET", f"/api/tasks/{ids[1]}/annotations").json()[0]["result"]
        assert [r["type"] for r in stored] == ["keypointlabels", "keypointlabels"]
        assert [r.get("is_positive", True) for r in stored] == [True, False]

        env = label_studio_env(
            redis_url,
            model_dir,
            ls,
            SAM2UNET_DEVICE="cpu",
            SAM2UNET_DATA_DIR=str(tmp_path / "data"),
            SAM2UNET_TRAIN_EPOCHS="1",
            SAM2UNET_TRAIN_BATCH_SIZE="2",
            SAM2UNET_TRAIN_MIN_SAMPLES="4",
            SAM2UNET_TRAIN_HOLDOUT="0.34",
            SAM2UNET_ACTIVE_LEARNING="false",
        )
        svc = trainer(env, conn, ls)
        report = svc.round(project, "test")
        assert report.status in ("promoted", "rejected"), report.reason
        assert report.train_size + report.val_size == N
        # the round's samples are the derived masks, the worker's answers
        samples = svc.cache.samples(project)
        assert [s.task for s, _, _ in samples] == ids
        for (_, _, masks), want in zip(samples, expected, strict=True):
            assert np.array_equal(masks[0] > 0, want) and not masks[1].any()
        assert all(s.derived == {"version": rt.version, "labels": ["Foreground"]}
                   for s, _, _ in samples)  # fmt: skip
        assert report.prompt_masks == {
            "derived": N, "derived_now": N, "skipped": 0, "enabled": True
        }  # fmt: skip
        last = json.loads(conn.lindex(ROUNDS_KEY, 0))
        assert last["prompt_masks"]["derived"] == N
        assert last["sync"]["prompts"]["derived"] == N
        health = create_app(Settings.from_env(env), conn).test_client().get("/health").get_json()
        assert health["trainer"]["last_round"]["prompt_masks"]["derived"] == N
        assert f"smart prompts but no mask: {N} trained on derived masks, 0 not used" in (
            versions_cli(env, monkeypatch, capsys)
        )

        # the setting off: the same annotations are skipped, and counted
        off = trainer(env, conn, ls, SAM2UNET_DERIVE_PROMPT_MASKS="false")
        report = off.round(project, "test")
        assert report.status == "skipped" and "too few" in report.reason
        assert report.prompt_masks == {
            "derived": 0, "derived_now": 0, "skipped": N, "enabled": False
        }  # fmt: skip
        assert off.cache.samples(project) == []
        health = create_app(Settings.from_env(env), conn).test_client().get("/health").get_json()
        assert health["trainer"]["last_round"]["prompt_masks"]["skipped"] == N
        assert f"smart prompts but no mask: 0 trained on derived masks, {N} not used" in (
            versions_cli(env, monkeypatch, capsys)
        )
    conn.close()
