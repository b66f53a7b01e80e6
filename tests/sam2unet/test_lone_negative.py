"""A lone negative click (no positive point, no rectangle for its object) says only what the
object is not: it is dropped with a log line, and the answer holds no mask for it, with SAM2's
head and with crop-and-segment alike."""

from __future__ import annotations

import numpy as np

from tests.worker.test_pipeline import TARGET, image, kp, make_runtime, official, predict, rect

__all__ = ["official"]  # the module fixture, used here


def test_sam2_head_answers_a_lone_negative_click_with_no_mask(official, caplog):
    model_dir, _ = official("test")
    rt = make_runtime(model_dir, "test")
    assert rt.prompt_head == "sam2"
    img = image(67, 91, seed=4)
    with caplog.at_level("INFO"):
        res = predict(rt, img, {"result": [kp(20.0, 80.0, False)]})
    assert res.result == [], [r["type"] for r in res.result]
    assert "no positive point and no rectangle" in caplog.text

    # beside an object with a rectangle, only that object is answered
    box = rect(25.0, 15.0, 55.0, 60.0)
    alone = predict(rt, img, {"result": [box]}).result
    both = predict(rt, img, {"result": [box, kp(5.0, 95.0, False)]}).result
    assert len(alone) >= 1
    assert [r["value"] for r in both] == [r["value"] for r in alone]


def test_crop_head_answers_a_lone_negative_click_with_no_mask(model_dir, caplog):
    from contracts.settings import Settings
    from modelstore.registry import ModelRegistry
    from worker.runtime import ModelRuntime

    settings = Settings(model_size="test", image_size=64, model_dir=model_dir, device="cpu")
    rt = ModelRuntime(settings, ModelRegistry(model_dir, None))
    rt.ensure_current()
    assert rt.prompt_head == "crop"
    from tests.support.protocol import red_circle

    img = red_circle(seed=1)
    whole = predict(rt, img, {"result": []}).result
    assert whole, "the trained fixture model finds the circle"
    with caplog.at_level("INFO"):
        res = predict(rt, img, {"result": [kp(3.0, 3.0, False)]})
    assert res.result == [], "a lone negative click answered with a mask"
    assert "no positive point and no rectangle" in caplog.text
    assert TARGET.kind == "brush" and np.asarray(img).ndim == 3
