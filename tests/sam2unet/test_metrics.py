"""MetricSuite (pysodmetrics), IoU / Dice helpers and folder / model evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam2unet.checkpoints import LoadedModel
from sam2unet.evaluate import evaluate_dirs, evaluate_model, label_channel
from sam2unet.exceptions import ConfigError, DatasetError
from sam2unet.metrics import METRIC_NAMES, MetricSuite, dice, format_table, iou
from sam2unet.synthetic import write_synthetic_dataset
from tests.support.model_helpers import cpu_config, seeded_model


@pytest.fixture
def gt() -> np.ndarray:
    g = np.zeros((60, 80), dtype=np.uint8)
    g[10:40, 20:60] = 255
    return g


def test_perfect_prediction(gt: np.ndarray) -> None:
    s = MetricSuite()
    s.step(gt, gt)
    r = s.results()
    assert set(METRIC_NAMES) <= set(r) and r["count"] == 1
    assert r["mae"] == 0
    for key in ("sm", "wfm", "adp_fm", "max_fm", "max_em"):
        assert r[key] == pytest.approx(1, abs=1e-3), key


def test_inverted_prediction(gt: np.ndarray) -> None:
    s = MetricSuite()
    s.step(255 - gt, gt)
    r = s.results()
    assert r["mae"] == 1 and r["sm"] == pytest.approx(0, abs=1e-6)
    assert r["adp_fm"] == 0 and r["wfm"] == 0


def test_miou_and_mdice_average_256_thresholds(gt: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 256, size=gt.shape).astype(np.uint8)
    pred[gt > 0] = np.clip(pred[gt > 0].astype(int) + 90, 0, 255)
    pred[0, 0], pred[0, 1] = 0, 255  # full range: pysodmetrics' min-max scaling is the identity
    s = MetricSuite()
    s.step(pred, gt)
    r = s.results()
    g = gt > 128
    ious = [iou(pred >= t, g) if (pred >= t).any() else 0.0 for t in range(256)]
    dices = [dice(pred >= t, g) if (pred >= t).any() else 0.0 for t in range(256)]
    assert r["miou"] == pytest.approx(np.mean(ious), abs=2e-3)
    assert r["mdice"] == pytest.approx(np.mean(dices), abs=2e-3)
    assert r["max_fm"] >= r["mean_fm"] and r["max_em"] >= r["mean_em"]


def test_float_bool_and_uint8_inputs_agree(gt: np.ndarray) -> None:
    prob = np.random.default_rng(1).random(gt.shape)
    a, b = MetricSuite(), MetricSuite()
    a.step(prob, gt > 128)
    b.step(np.round(prob * 255).astype(np.uint8), gt)
    assert a.results() == b.results()


def test_means_over_samples(gt: np.ndarray) -> None:
    s = MetricSuite()
    s.step(gt, gt)
    s.step(255 - gt, gt)
    assert s.results()["mae"] == pytest.approx(0.5)
    assert s.results()["count"] == 2


def test_suite_input_errors(gt: np.ndarray) -> None:
    s = MetricSuite()
    with pytest.raises(DatasetError, match="no samples"):
        s.results()
    with pytest.raises(DatasetError, match="80x60"):
        s.step(gt[:, :50], gt)
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        s.step(gt.astype(np.float32), gt)


@pytest.mark.parametrize(
    ("p", "g", "want_iou", "want_dice"),
    [
        ([1, 1, 0, 0], [1, 0, 0, 0], 0.5, 2 / 3),
        ([1, 1, 0, 0], [0, 0, 1, 1], 0.0, 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0, 1.0),
        ([1, 1, 1, 0], [0, 1, 1, 1], 0.5, 2 / 3),
    ],
)
def test_iou_dice(p, g, want_iou, want_dice) -> None:
    p, g = np.array(p, bool), np.array(g, bool)
    assert iou(p, g) == pytest.approx(want_iou)
    assert dice(p, g) == pytest.approx(want_dice)


def test_format_table_lists_metrics_in_order(gt: np.ndarray) -> None:
    s = MetricSuite()
    s.step(gt, gt)
    lines = format_table(s.results(), title="t").splitlines()
    assert lines[0] == "t"
    assert lines[1].startswith("S-measure") and lines[-1].split() == ["count", "1"]


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_dirs_pairs_and_checks_sizes(tmp_path: Path, gt: np.ndarray) -> None:
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for name, pred in (("a", gt), ("b", 255 - gt)):
        Image.fromarray(pred).save(tmp_path / "pred" / f"{name}.png")
        Image.fromarray(gt).save(tmp_path / "gt" / f"{name}.png")
    r = evaluate_dirs(tmp_path / "pred", tmp_path / "gt")
    assert r["count"] == 2 and r["mae"] == pytest.approx(0.5)
    Image.fromarray(gt).save(tmp_path / "gt" / "c.png")
    with pytest.raises(
        DatasetError, match=r"ground-truth mask\(s\) .* without a prediction: c\.png"
    ):
        evaluate_dirs(tmp_path / "pred", tmp_path / "gt")
    Image.fromarray(gt[:30]).save(tmp_path / "pred" / "c.png")
    with pytest.raises(DatasetError, match=r"prediction .*c\.png is 80x30 but its mask"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "gt")


def test_evaluate_model_matches_its_saved_predictions(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(tmp_path / "data", 4, (50, 70), seed=1)
    config = cpu_config()
    loaded = LoadedModel(seeded_model(config), config, None, "random")
    r = evaluate_model(loaded, paths.images, paths.masks, device="cpu", save_dir=tmp_path / "pred")
    assert r["count"] == 4 and all(math.isfinite(r[k]) for k in METRIC_NAMES)
    saved = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert saved == [f"{n}.png" for n in paths.names]
    assert Image.open(tmp_path / "pred" / saved[0]).size == (70, 50)
    assert evaluate_dirs(tmp_path / "pred", paths.masks) == r


def test_label_channel() -> None:
    assert label_channel(("object",), None) == 0
    assert label_channel(("a", "b"), "b") == 1
    with pytest.raises(ConfigError, match="name the one"):
        label_channel(("a", "b"), None)
    with pytest.raises(ConfigError, match="'c' is not one"):
        label_channel(("a", "b"), "c")
