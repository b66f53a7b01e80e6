"""Predictor round trip: any image size in, K x H x W probabilities at that size out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sam2unet.predictor import Predictor
from tests.support.model_helpers import cpu_config, seeded_model


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    config = cpu_config(labels=("a", "b"))
    return Predictor(seeded_model(config), config, device="cpu", batch_size=2)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (33, 47), (481, 640), (64, 64), (7, 300)])
def test_any_size_gives_k_x_h_x_w_probabilities(predictor: Predictor, h: int, w: int) -> None:
    img = np.random.default_rng(h * w).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    (prob,) = predictor.predict([img])
    assert prob.shape == (2, h, w)
    assert prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1


def test_mixed_inputs_in_one_call(predictor: Predictor) -> None:
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8),
        Image.fromarray(rng.integers(0, 256, size=(30, 20), dtype=np.uint8)),  # grey PIL
        rng.random((25, 35)),  # float grey
        rng.integers(0, 256, size=(12, 16, 4), dtype=np.uint8),  # RGBA
        rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8),
    ]
    probs = predictor.predict(images)  # batch size 2: three forward passes
    shapes = [(2, 40, 50), (2, 30, 20), (2, 25, 35), (2, 12, 16), (2, 64, 64)]
    assert [p.shape for p in probs] == shapes
    # batching does not change results
    alone = predictor.predict_one(images[4])
    np.testing.assert_allclose(alone, probs[4], atol=1e-5)


def test_known_head_pattern_comes_back_at_full_size() -> None:
    """Force the head to output +10 in the top-left quadrant (label 0) and in the right half
    (label 1), -10 elsewhere; the predictor must return that layout at the image's size."""
    config = cpu_config(labels=("quadrant", "right"))
    model = seeded_model(config)

    def pattern(module, inputs, output):  # B x 2 x S/4 x S/4
        _, _, h, w = output.shape
        logits = torch.full_like(output, -10.0)
        logits[:, 0, : h // 2, : w // 2] = 10.0
        logits[:, 1, :, w // 2 :] = 10.0
        return logits

    model.head.register_forward_hook(pattern)
    predictor = Predictor(model, config, device="cpu")
    h, w = 120, 200
    (prob,) = predictor.predict([np.zeros((h, w, 3), dtype=np.uint8)])
    assert prob.shape == (2, h, w)
    expected = np.zeros((2, h, w), dtype=bool)
    expected[0, : h // 2, : w // 2] = True
    expected[1, :, w // 2 :] = True
    # away from the edges of the pattern (bilinear blending of the 16 x 16 map) it is exact
    margin_h, margin_w = h // 8, w // 8
    far = np.ones((h, w), dtype=bool)
    far[h // 2 - margin_h : h // 2 + margin_h] = False
    far_cols = np.ones((h, w), dtype=bool)
    far_cols[:, w // 2 - margin_w : w // 2 + margin_w] = False
    for k, region in enumerate([far & far_cols, far_cols]):
        got = prob[k][region]
        want = expected[k][region]
        assert np.all(got[want] > 0.99) and np.all(got[~want] < 0.01)
    # and the result is binary up to the blending band
    assert ((prob > 0.5) == expected).mean() > 0.97


def test_a_cpu_batch_limit_changes_how_many_per_pass_not_the_results(predictor: Predictor) -> None:
    """``cpu_batch_size`` caps images per forward pass on a CPU (the workers' default is 1)."""
    limited = Predictor(
        predictor.model, predictor.config, device="cpu", batch_size=8, cpu_batch_size=1
    )
    assert limited.batch_size == 1
    passes = []
    hook = limited.model.head.register_forward_hook(lambda m, i, o: passes.append(o.shape[0]))
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8) for i in range(3)]
    try:
        probs = limited.predict(images)
    finally:
        hook.remove()
    assert passes == [1, 1, 1]
    for got, ref in zip(probs, predictor.predict(images), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    unlimited = Predictor(predictor.model, predictor.config, device="cpu", batch_size=8)
    assert unlimited.batch_size == 8
