"""Acquisition strategies on inputs whose answer is known: constructed probability maps,
networks whose flip behaviour is known by construction, and the real test-size SAM2-UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sam2unet.acquisition import (
    STRATEGIES,
    acquire,
    check_strategy,
    confidence_uncertainty,
    k_center_greedy,
    prediction_score,
    random_uncertainty,
    select,
    sort_score,
    tta_disagreement,
)
from sam2unet.exceptions import ConfigError
from sam2unet.predictor import Predictor
from sam2unet.synthetic import generate
from tests.support.model_helpers import cpu_config, perturb_trainable, seeded_model


def disc(h: int = 64, w: int = 64, cx: float = 32, cy: float = 32, r: float = 14) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float64)


def test_a_perfectly_segmented_image_scores_as_least_useful():
    perfect = disc()[None]  # probabilities exactly 0 and 1
    soft = 0.15 + 0.7 * disc()[None]  # the right mask, with doubt
    coin = np.full((1, 64, 64), 0.5)
    u = [confidence_uncertainty(m) for m in (soft, perfect, coin)]
    assert u[1] == 0.0 and u[2] == 1.0 and 0 < u[0] < 1
    assert select("confidence", u, 3) == [2, 0, 1]  # most useful first, the perfect one last
    scores = [sort_score(v) for v in u]
    assert sorted(range(3), key=scores.__getitem__) == [2, 0, 1]  # ascending score: same order
    assert scores[1] == 1.0
    # consistent passes of a perfect prediction: no disagreement either
    assert tta_disagreement(np.stack([perfect] * 4)) == 0.0


def test_flip_inconsistent_passes_disagree_more_than_consistent_ones():
    base = disc()
    consistent = np.stack([base, base, base, base])
    slightly = np.stack([base, disc(cx=33), disc(cy=31), disc(r=13)])
    inconsistent = np.stack([base, disc(cx=44), disc(cy=20), disc(r=8)])
    d = [tta_disagreement(p) for p in (consistent, slightly, inconsistent)]
    assert d[0] == 0.0 < d[1] < d[2] <= 1.0
    assert select("tta", d, 1) == [2]
    with pytest.raises(ValueError):
        tta_disagreement(base[None])  # one pass: nothing to compare


class PixelNet(nn.Module):
    """A per-pixel colour rule (flip- and nearly scale-equivariant), optionally plus a
    left-to-right ramp in the logits that a horizontal flip reverses (flip-inconsistent)."""

    def __init__(self, ramp: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[4.0]], [[-4.0]], [[0.0]]]]))
            self.conv.bias.zero_()
        self.ramp = ramp

    def forward(self, x):
        logits = self.conv(x)
        w = x.shape[-1]
        logits = logits + self.ramp * torch.linspace(-1, 1, w).view(1, 1, 1, w)
        return (logits,)


def test_tta_scores_a_flip_inconsistent_network_above_a_consistent_one():
    images = [img for img, _ in generate(3, 64, seed=5)]
    cfg = cpu_config()
    consistent = acquire(Predictor(PixelNet(0.0), cfg, device="cpu"), images, "tta")
    flipping = acquire(Predictor(PixelNet(6.0), cfg, device="cpu"), images, "tta")
    for a, b in zip(consistent, flipping, strict=True):
        assert 0.0 <= a.uncertainty < 0.1  # only the shrunk pass's resampling differs
        assert b.uncertainty > a.uncertainty + 0.1


@pytest.fixture(scope="module")
def predictor():
    cfg = cpu_config()
    model = seeded_model(cfg)
    perturb_trainable(model)
    return Predictor(model, cfg, device="cpu", batch_size=4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_the_plain_prediction_and_a_bounded_score(predictor, strategy):
    images = [img for img, _ in generate(5, (48, 80), seed=2)]
    plain = predictor.predict(images)
    got = acquire(predictor, images, strategy, keys=[f"t{i}" for i in range(5)])
    assert len(got) == 5
    for a, p in zip(got, plain, strict=True):
        assert a.prob.shape == p.shape == (1, 48, 80)
        np.testing.assert_allclose(a.prob, p, atol=1e-5)
        assert 0.0 <= a.uncertainty <= 1.0
        assert (a.feature is not None) == (strategy == "diverse")
    if strategy == "random":  # a fixed number of each key, whatever the model says
        assert [a.uncertainty for a in got] == [random_uncertainty(f"t{i}") for i in range(5)]


def test_the_diverse_strategy_never_picks_two_identical_images(predictor):
    distinct = [img for img, _ in generate(4, 64, seed=9)]
    # the pool: many copies of a few images; the most uncertain are all copies of one image
    pool = [distinct[i % 4] for i in range(16)]
    got = acquire(predictor, pool, "diverse")
    feats = np.stack([a.feature for a in got])
    u = np.zeros(len(pool))
    u[[0, 4, 8, 12]] = 1.0  # copies of distinct[0]: the only uncertain ones
    for k in (2, 4, 6):
        picks = select("diverse", u, k, features=feats)
        assert len(picks) == min(k, 4)
        assert len({i % 4 for i in picks}) == len(picks)  # no image twice
        assert picks[0] % 4 == 0  # the most uncertain image comes first
    # an image already labelled is not suggested again, even as the most uncertain
    picks = select("diverse", u, 3, features=feats, labelled_features=feats[[0]])
    assert all(i % 4 != 0 for i in picks)
    # confidence ranking alone would suggest the copies
    assert {i % 4 for i in select("confidence", u, 4)} == {0}


def test_k_center_greedy_spreads_out():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    assert k_center_greedy(x, 3) == [0, 4, 2] or k_center_greedy(x, 3) == [0, 4, 3]
    assert k_center_greedy(np.zeros((5, 3)), 3) == [0]  # identical rows: one pick


def test_random_selection_and_unknown_strategies():
    picks = select("random", np.zeros(20), 8, rng=np.random.default_rng(0))
    assert len(set(picks)) == 8
    assert random_uncertainty("a") == random_uncertainty("a") != random_uncertainty("b")
    with pytest.raises(ConfigError):
        check_strategy("entropy")
    with pytest.raises(ConfigError):
        select("diverse", [0.5, 0.2], 1)  # no features


def _small_object(p_in: float, p_out: float) -> tuple[np.ndarray, np.ndarray]:
    prob = np.full((100, 100), p_out)
    prob[45:55, 45:55] = p_in
    return prob, prob >= 0.5


@pytest.mark.parametrize(
    ("prob", "mask", "low", "high"),
    [
        (np.full((10, 10), 0.01), np.zeros((10, 10), bool), 0.98, 1.0),  # confidently empty
        (np.full((10, 10), 0.99), np.ones((10, 10), bool), 0.98, 1.0),  # confidently full
        (np.full((10, 10), 0.5), np.ones((10, 10), bool), 0.5, 0.5),  # a coin toss
        (np.full((10, 10), 0.45), np.zeros((10, 10), bool), 0.55, 0.55),  # barely empty
        (*_small_object(0.99, 0.01), 0.98, 1.0),  # confident small object
        (*_small_object(0.55, 0.01), 0.76, 0.79),  # unsure object, sure background
        (*_small_object(0.99, 0.45), 0.76, 0.79),  # sure object, unsure background
        (np.full((4, 4), 1.7), np.ones((4, 4), bool), 1.0, 1.0),  # clipped
    ],
)
def test_prediction_score(prob: np.ndarray, mask: np.ndarray, low: float, high: float) -> None:
    score = prediction_score(prob, mask)
    assert type(score) is float
    assert low - 1e-9 <= score <= high + 1e-9


def test_prediction_score_ranks_uncertainty_and_stays_in_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        prob = rng.random((16, 24))
        mask = prob >= rng.uniform(0.2, 0.8)
        assert 0.0 <= prediction_score(prob, mask) <= 1.0
    sure = prediction_score(*_small_object(0.95, 0.02))
    unsure = prediction_score(*_small_object(0.6, 0.02))
    assert unsure < sure


@pytest.mark.parametrize(
    ("prob", "mask", "reason"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5), bool), "differs"),
        (np.full((4, 4), np.nan), np.zeros((4, 4), bool), "NaN"),
        (np.zeros((0, 4)), np.zeros((0, 4), bool), "non-empty"),
    ],
)
def test_prediction_score_errors(prob: np.ndarray, mask: np.ndarray, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        prediction_score(prob, mask)
