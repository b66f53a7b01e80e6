"""Promotion decisions on small held-out sets: the paired bootstrap on constructed per-image
differences, and held-out sides with a minimum size that never change once decided."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from contracts.settings import Settings
from modelstore.bootstrap import ensure_current_version
from modelstore.registry import ModelRegistry
from trainer.promotion import TRAIN, VAL, assign_sides, paired_bootstrap
from trainer.round import load_sides, run_round, save_sides


def test_a_clear_gain_is_promoted_with_its_interval():
    cur = np.linspace(0.4, 0.8, 10)
    d = paired_bootstrap(cur + 0.05, cur, confidence=0.9, tolerance=0.0)
    assert d.promote and d.n == 10
    assert d.mean == pytest.approx(0.05) and d.low == pytest.approx(0.05)  # no spread
    assert d.low <= d.mean <= d.high


def test_a_clear_loss_is_rejected():
    cur = np.linspace(0.4, 0.8, 10)
    d = paired_bootstrap(cur - 0.05, cur, tolerance=0.01)
    assert not d.promote and d.high == pytest.approx(-0.05)


def test_the_same_mean_is_decided_by_its_spread():
    cur = np.full(6, 0.6)
    # mean difference 0 both times: identical results are "not worse"; +-0.3 swings on six
    # images cannot show that the candidate is within the tolerance
    steady = paired_bootstrap(cur, cur, tolerance=0.01)
    noisy = paired_bootstrap(cur + np.array([0.3, -0.3] * 3), cur, tolerance=0.01)
    assert steady.promote and steady.low == 0.0
    assert not noisy.promote and noisy.mean == pytest.approx(0.0) and noisy.low < -0.01
    # a higher confidence widens the interval: a small, consistent gain on few images
    gain = cur + np.array([0.04, -0.01, 0.03, 0.02, -0.015, 0.05])
    lows = [paired_bootstrap(gain, cur, confidence=c).low for c in (0.6, 0.8, 0.95)]
    assert lows[0] > lows[1] > lows[2]


def test_lower_is_better_and_missing_values():
    cur = np.full(5, 0.2)
    assert paired_bootstrap(cur - 0.05, cur, metric="mae", lower_is_better=True).promote
    assert not paired_bootstrap(cur + 0.05, cur, metric="mae", lower_is_better=True).promote
    assert not paired_bootstrap([np.nan] * 5, cur).promote
    assert paired_bootstrap(cur, [np.nan] * 5).promote
    assert not paired_bootstrap([], []).promote
    assert paired_bootstrap([], []).to_json()["mean"] is None  # JSON-safe
    with pytest.raises(ValueError):
        paired_bootstrap([0.1, 0.2], [0.1])


def test_held_out_sides_have_a_minimum_and_never_change():
    sides: dict[int, str] = {}
    history = []
    for n in (2, 4, 6, 10, 12, 24, 40, 100, 200):
        sides = assign_sides(range(1, n + 1), 0.2, minimum=5, previous=sides)
        history.append(dict(sides))
        held = sum(s == VAL for s in sides.values())
        assert held >= min(5, n // 2), (n, held)
        assert any(s == TRAIN for s in sides.values())
        assert 0.1 * n <= held <= max(5, 0.3 * n) + 1  # about the share once past the minimum
    for earlier, later in itertools.pairwise(history):
        assert all(later[t] == s for t, s in earlier.items())  # every task keeps its side


def test_previous_sides_win_over_the_hash():
    fresh = assign_sides(range(1, 21), 0.2)
    flipped = {t: (TRAIN if s == VAL else VAL) for t, s in fresh.items()}
    assert assign_sides(range(1, 21), 0.2, minimum=5, previous=flipped) == flipped


def test_without_previous_sides_both_sides_get_a_task():
    assert assign_sides([1, 2], 0.0)[1] != assign_sides([1, 2], 0.0)[2]
    assert set(assign_sides([1, 2], 1.0).values()) == {TRAIN, VAL}


def test_the_round_keeps_sides(tmp_path):
    d = tmp_path / "projects" / "3"
    assert load_sides(d, 3) == {}
    save_sides(d, {5: VAL, 7: TRAIN})
    assert load_sides(d, 3) == {5: VAL, 7: TRAIN}
    (d / "sides.json").write_text("not json")
    assert load_sides(d, 3) == {}  # logged, and the next round starts afresh


def test_a_round_reads_and_writes_its_sides_itself(tmp_path):
    """A round (here one with too few tasks to train) takes the sides kept in its folder and
    writes back the old ones with those of its new tasks; a task keeps its side."""
    settings = Settings(model_dir=tmp_path / "models", model_size="test", image_size=32,
                        device="cpu", train_min_samples=50, train_holdout=0.5)  # fmt: skip
    registry = ModelRegistry(tmp_path / "models", None)
    ensure_current_version(registry, settings)
    d = tmp_path / "projects" / "1"
    save_sides(d, {1: VAL, 99: TRAIN})
    img, mask = np.zeros((32, 32, 3), np.uint8), np.zeros((1, 32, 32), np.uint8)
    samples = [(t, img, mask) for t in (1, 2, 3)]
    report = run_round(registry, settings, samples, ["object"], project=1, sides_dir=d)
    assert report.status == "skipped" and report.sides[1] == VAL
    kept = load_sides(d, 1)
    assert kept == {99: TRAIN, **report.sides} and set(kept) == {1, 2, 3, 99}
    again = run_round(registry, settings, samples[1:], ["object"], project=1, sides_dir=d)
    assert again.sides == {t: kept[t] for t in (2, 3)}
