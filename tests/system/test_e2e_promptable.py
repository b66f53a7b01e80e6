"""End to end with a real Label Studio 1.23.2: a smart keypoint and a smart rectangle on a task,
sent the way Label Studio's editor sends them (``/api/ml/{id}/interactive-annotating``), come
back as brush results from SAM2's promptable head: the masks SAM2's own predictor gives on the
same weights, image and prompts.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

from labelstudio.codecs import rle_to_mask
from sam2unet.random_weights import write_random_sam2_checkpoint
from tests.support.lstudio import running_label_studio
from tests.support.sam2_helpers import reference_predictor
from tests.support.services import (
    connected_stack,
    fresh_redis_db,
    png_bytes,
)
from tests.worker.test_pipeline import LABEL_CONFIG, image, kp, make_runtime, rect, reference

pytestmark = pytest.mark.e2e
AUTH = ("ls-backend", "b4ckend-pass")


def test_smart_keypoint_and_rectangle_answered_by_sam2s_head(tmp_path, redis_server):
    model_dir = tmp_path / "models"
    sam2_model = write_random_sam2_checkpoint(model_dir / "base" / "sam2.1_hiera_test.pt", "test")
    version = make_runtime(model_dir, "test").version  # first version, on the official base
    redis_url, conn = fresh_redis_db(redis_server, 13)
    h, w = 75, 101
    img = image(h, w, seed=21)
    ref = reference_predictor(sam2_model, "test")
    ref.set_image(img)
    with (
        running_label_studio(tmp_path / "ls") as ls,
        connected_stack(ls, redis_url, model_dir, AUTH, tmp_path / "logs", "e2e-prompts") as (
            url,
            _,
            worker,
        ),
    ):
        assert "prompts: sam2 head" in worker.log()
        health = requests.get(f"{url}/health", auth=AUTH, timeout=5)
        assert health.json()["prompt_head"] == "sam2"
        project = ls.create_project(LABEL_CONFIG, title="smart tools")
        (task,) = ls.import_images(project, [("smart.png", png_bytes(img))])
        ml = ls.add_ml_backend(project, url, AUTH, "sam2unet-assist", True)

        def interactive(items: list[dict]) -> dict:
            for it in items:  # as the editor sends them
                it.update(original_width=w, original_height=h, image_rotation=0)
            r = ls.api(
                "POST",
                f"/api/ml/{ml['id']}/interactive-annotating",
                json={"task": task, "context": {"result": items}},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert "errors" not in body, body
            return body["data"]

        for objects in ([([kp(40.0, 45.0)], None)], [([], rect(30.0, 20.0, 45.5, 50.25))]):
            points, box = objects[0]
            data = interactive([*([box] if box else []), *points])
            assert data["model_version"] == version
            ((logits, iou),) = reference(ref, objects, h, w)
            (item,) = data["result"]
            assert item["type"] == "brushlabels" and item["from_name"] == "tag"
            assert item["value"]["brushlabels"] == ["Foreground"]
            mask = rle_to_mask(item["value"]["rle"], h, w)
            assert np.array_equal(mask, logits > 0)
            assert item["score"] == pytest.approx(iou, abs=1e-5)
        assert worker.log().count("image features computed") == 1
        assert worker.log().count("image features from the cache") == 1
        # the interactive answers were not stored as predictions
        assert not ls.predictions(task)
    conn.close()
