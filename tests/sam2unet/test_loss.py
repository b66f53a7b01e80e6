"""Structure loss values on known inputs, checked against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from sam2unet.modeling.loss import BCEMode, deep_supervision_loss, structure_loss


def boundary_weights(mask: np.ndarray) -> np.ndarray:
    """1 + 5 |box31(mask) - mask|, the box mean counting zero padding (B x K x H x W)."""
    box = uniform_filter(mask, size=(1, 1, 31, 31), mode="constant", cval=0.0)
    return 1 + 5 * np.abs(box - mask)


def reference(logits: np.ndarray, mask: np.ndarray, weighted_bce: bool) -> float:
    p = 1 / (1 + np.exp(-logits))
    bce = -(mask * np.log(p) + (1 - mask) * np.log(1 - p))  # per pixel
    w = boundary_weights(mask)
    if weighted_bce:
        bce_term = (w * bce).sum(axis=(2, 3)) / w.sum(axis=(2, 3))
    else:
        bce_term = np.full(mask.shape[:2], bce.mean())  # one mean over everything
    inter = (p * mask * w).sum(axis=(2, 3))
    union = ((p + mask) * w).sum(axis=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return float((bce_term + wiou).mean())


@pytest.fixture
def square_mask() -> np.ndarray:
    m = np.zeros((2, 1, 48, 48))
    m[0, 0, 10:30, 12:40] = 1
    m[1, 0, 20:44, 4:20] = 1
    return m


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).double()


@pytest.mark.parametrize("mode", list(BCEMode))
def test_perfect_and_all_wrong(square_mask: np.ndarray, mode: BCEMode) -> None:
    good = np.where(square_mask > 0, 20.0, -20.0)
    perfect = float(structure_loss(t(good), t(square_mask), mode))
    wrong = float(structure_loss(t(-good), t(square_mask), mode))
    assert perfect < 1e-3
    # BCE of a confident wrong pixel is ~20; the IoU term is ~1
    assert wrong == pytest.approx(20 + 1, abs=0.05)


def test_as_released_is_plain_mean_bce_plus_weighted_iou(square_mask: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=square_mask.shape)
    got = float(structure_loss(t(logits), t(square_mask), BCEMode.AS_RELEASED))
    assert got == pytest.approx(reference(logits, square_mask, weighted_bce=False), rel=1e-9)


def test_weighted_uses_boundary_weights(square_mask: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, size=square_mask.shape)
    # larger errors near the boundary, where the weights are large
    w = boundary_weights(square_mask)
    logits = logits + np.where(square_mask > 0, -1.0, 1.0) * (w - 1)
    weighted = float(structure_loss(t(logits), t(square_mask), BCEMode.WEIGHTED))
    released = float(structure_loss(t(logits), t(square_mask), BCEMode.AS_RELEASED))
    assert weighted == pytest.approx(reference(logits, square_mask, weighted_bce=True), rel=1e-9)
    assert abs(weighted - released) > 0.05


def test_modes_agree_when_weights_are_uniform() -> None:
    mask = np.zeros((2, 1, 32, 32))  # no boundary: every weight is 1
    logits = np.random.default_rng(2).normal(0, 1, size=mask.shape)
    a = float(structure_loss(t(logits), t(mask), BCEMode.WEIGHTED))
    b = float(structure_loss(t(logits), t(mask), BCEMode.AS_RELEASED))
    assert a == pytest.approx(b, rel=1e-12)


def test_multi_label_averages_channels() -> None:
    rng = np.random.default_rng(3)
    mask = (rng.random((1, 3, 32, 32)) > 0.7).astype(float)
    logits = rng.normal(0, 1, size=mask.shape)
    whole = float(structure_loss(t(logits), t(mask), BCEMode.WEIGHTED))
    per = [
        float(structure_loss(t(logits[:, k : k + 1]), t(mask[:, k : k + 1]), BCEMode.WEIGHTED))
        for k in range(3)
    ]
    assert whole == pytest.approx(np.mean(per), rel=1e-12)


def test_deep_supervision_sums_the_three_outputs(square_mask: np.ndarray) -> None:
    rng = np.random.default_rng(4)
    outs = [t(rng.normal(0, 1, size=square_mask.shape)) for _ in range(3)]
    total = float(deep_supervision_loss(outs, t(square_mask), "weighted"))
    parts = sum(float(structure_loss(o, t(square_mask), "weighted")) for o in outs)
    assert total == pytest.approx(parts, rel=1e-12)


def test_unknown_bce_mode_is_rejected(square_mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match="sum"):
        structure_loss(t(square_mask), t(square_mask), "sum")
