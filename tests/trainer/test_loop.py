"""The active-learning loop on synthetic data with the test-size model: simulated annotators
correct the current model's pre-annotations in rounds; each round fine-tunes from the promoted
version, evaluates on held-out corrections, and promotes only a candidate that is not worse."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.settings import Settings
from modelstore.bootstrap import ensure_current_version
from modelstore.registry import ModelRegistry
from sam2unet.synthetic import generate
from trainer.promotion import VAL, assign_sides
from trainer.round import run_round


def mean_iou(registry: ModelRegistry, version: str, test_set) -> float:
    from sam2unet.metrics import iou
    from sam2unet.predictor import Predictor

    loaded = registry.load(version)
    pred = Predictor(loaded.model, loaded.config, device="cpu")
    probs = pred.predict([img for img, _ in test_set])
    return float(
        np.mean([iou(p[0] > 0.5, m[0] > 127) for p, (_, m) in zip(probs, test_set, strict=True)])
    )


def holdout_split(task_ids, fraction, minimum=0):
    """(train, held-out) task ids of a first round, as the round assigns their sides."""
    sides = assign_sides(task_ids, fraction, minimum)
    val = [t for t in task_ids if sides[t] == VAL]
    return [t for t in task_ids if sides[t] != VAL], val


def test_holdout_split_is_stable_and_disjoint():
    ids = list(range(1, 101))
    train, val = holdout_split(ids, 0.2)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert 10 <= len(val) <= 30
    train2, val2 = holdout_split([*ids, *range(101, 201)], 0.2)
    assert set(val) <= set(val2) and set(train) <= set(train2)  # tasks never switch sets
    assert holdout_split([1, 2], 0.0)[1] and holdout_split([1, 2], 1.0)[0]
    assert len(holdout_split(ids[:12], 0.2, minimum=5)[1]) == 5


@pytest.mark.slow
def test_loop_iou_rises_round_over_round_and_a_worse_candidate_is_not_promoted(tmp_path):
    settings = Settings(
        model_dir=tmp_path,
        model_size="test",
        image_size=64,
        device="cpu",
        train_epochs=8,
        train_batch_size=8,
        train_lr=3e-3,  # a random trunk (no SAM2 weights here) learns faster with it
        train_holdout=0.25,
        train_min_samples=4,
    )
    registry = ModelRegistry(tmp_path, None)
    first = ensure_current_version(registry, settings).name
    pool = generate(72, 64, seed=7)
    test_set = generate(24, 64, seed=1234)
    labels = ("object",)
    corrected = []
    ious = [mean_iou(registry, first, test_set)]
    versions = [first]
    for rnd in range(3):
        # annotators open the next 24 tasks, see the current pre-annotations and correct them
        batch = pool[rnd * 24 : (rnd + 1) * 24]
        for i, (img, truth) in enumerate(batch):
            corrected.append((rnd * 24 + i + 1, img, truth))
        report = run_round(registry, settings, corrected, labels, project=1, reason=f"round {rnd}")
        assert report.status == "promoted", report
        assert registry.current() == report.candidate
        versions.append(report.candidate)
        ious.append(mean_iou(registry, report.candidate, test_set))
    print("held-out IoU per promoted version:", [f"{v:.3f}" for v in ious])
    assert ious[1] > ious[0] + 0.15
    assert ious[2] > ious[1] and ious[3] > ious[2]

    # a worse candidate: annotators who swapped the masks of the training tasks among them
    # (the held-out ones stay right, so that the gate measures against the truth)
    train_ids, _ = holdout_split(
        [t for t, _, _ in corrected], settings.train_holdout, settings.holdout_min
    )
    swapped = dict(zip(train_ids, np.random.default_rng(0).permutation(train_ids), strict=True))
    truth = {t: m for t, _, m in corrected}
    wrong = [(t, img, truth[swapped.get(t, t)]) for t, img, _ in corrected]
    assert sum(not np.array_equal(m, truth[t]) for t, _, m in wrong) > len(train_ids) // 2
    before = registry.current()
    bad = run_round(registry, settings, wrong, labels, project=1)
    print("shuffled-mask candidate:", bad.reason)
    assert bad.status == "rejected"
    assert registry.current() == before
    assert bad.candidate in [v.name for v in registry.versions()]  # kept, with its metrics
    info = registry.get(bad.candidate)
    assert info.metrics["promoted"] is False
    assert info.metrics["val"]["miou"] < info.metrics["parent_val"]["miou"]
