"""Training plots: a real round writes training.png into its (immutable) version directory,
versions.png shows every version; the verdict colour follows the promotion; a plot that cannot be
drawn never fails a round."""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from contracts.settings import Settings
from modelstore.bootstrap import ensure_current_version
from modelstore.registry import ModelRegistry
from modelstore.versions import versions_json
from sam2unet.synthetic import generate
from trainer import plots
from trainer.round import run_round

HISTORY = [
    {"epoch": e, "loss": 1.0 / e, "lr": 1e-3 * (1 - e / 6), "seconds": 1.0} for e in range(1, 6)
]
CURRENT = {"miou": 0.5, "mdice": 0.6, "sm": 0.7, "wfm": 0.4, "mean_em": 0.7, "mae": 0.2}
CANDIDATE = {"miou": 0.6, "mdice": 0.7, "sm": 0.75, "wfm": 0.5, "mean_em": 0.8, "mae": 0.15}


def decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def share_of(img: np.ndarray, hex_colour: str) -> float:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return float((np.abs(img - rgb).sum(axis=-1) < 30).mean())


def test_training_png_colours_the_verdict():
    kwargs = {"metric": "miou", "parent": "sam2unet-test-v1", "project": 3, "train_size": 9,
              "val_size": 3}  # fmt: skip
    promoted = decode(plots.training_png(HISTORY, CURRENT, CANDIDATE, promoted=True, **kwargs))
    rejected = decode(plots.training_png(HISTORY, CURRENT, CANDIDATE, promoted=False, **kwargs))
    assert promoted.shape == (round(4.6 * plots.DPI), round(11.5 * plots.DPI), 3)
    assert share_of(promoted, plots.GREEN) > 0.01 and share_of(promoted, plots.RED) == 0
    assert share_of(rejected, plots.RED) > 0.01 and share_of(rejected, plots.GREEN) == 0
    assert share_of(promoted, plots.BLUE) > 0.001  # the loss curve
    # no epochs, no metrics: still a figure
    decode(plots.training_png([], {}, {}, promoted=False, metric="miou", parent=None))


def test_versions_png_without_and_with_versions():
    empty = decode(plots.versions_png([]))
    assert empty.shape[0] == round(4.8 * plots.DPI)
    rows = [
        {"version": f"sam2unet-test-v{i}", "promoted": i != 3, "current": i == 2,
         "metrics": {"miou": 0.3 + 0.1 * i, "sm": 0.5 + 0.1 * i} if i > 1 else {},
         "correction_rate": {"n": 4, "mean": 0.5 - 0.1 * i} if i < 3 else None}
        for i in range(1, 4)
    ]  # fmt: skip
    img = decode(plots.versions_png(rows))
    assert share_of(img, plots.BLUE) > 0.0005 and share_of(img, plots.GREEN) > 0.0005
    many = [dict(rows[1], version=f"sam2unet-test-v{i}", current=False) for i in range(1, 80)]
    assert decode(plots.versions_png(many)).shape[1] == round(18.0 * plots.DPI)


def test_a_round_writes_training_png_into_its_version_and_versions_png(tmp_path):
    settings = Settings(model_dir=tmp_path, model_size="test", image_size=64, device="cpu",
                        train_epochs=2, train_batch_size=8, train_holdout=0.25)  # fmt: skip
    registry = ModelRegistry(tmp_path, None)
    first = ensure_current_version(registry, settings).name
    samples = [(i + 1, img, m) for i, (img, m) in enumerate(generate(12, 64, seed=3))]
    report = run_round(registry, settings, samples, ("object",), project=5, reason="test")
    assert report.status in ("promoted", "rejected")
    version_dir = registry.versions_dir / report.candidate
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "meta.json",
        "model.pt",
        "training.png",
    ]
    img = decode((version_dir / "training.png").read_bytes())
    colour = plots.GREEN if report.status == "promoted" else plots.RED
    assert share_of(img, colour) > 0.01
    assert len(report.history) == 2

    path = plots.write_versions_png(registry, settings)
    assert path == tmp_path / "versions.png"
    decode(path.read_bytes())
    assert [r["version"] for r in versions_json(registry, settings)] == [first, report.candidate]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_plot_that_cannot_be_drawn_never_fails_a_round(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert plots.safe_training_png(object(), promoted=True) is None
    assert "could not draw the round's training plot" in caplog.text
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    settings = Settings(model_dir=not_a_dir)
    assert plots.write_versions_png(ModelRegistry(not_a_dir, None), settings) is None


def test_training_png_draws_the_paired_interval_and_the_table_lists_it():
    from modelstore.versions import interval_text
    from trainer.promotion import paired_bootstrap

    cur = np.linspace(0.4, 0.6, 8)
    decision = paired_bootstrap(cur + np.linspace(0.0, 0.2, 8), cur).to_json()
    kwargs = {"metric": "miou", "parent": "sam2unet-test-v1", "promoted": True}
    plain = decode(plots.training_png(HISTORY, CURRENT, CANDIDATE, **kwargs))
    with_interval = decode(
        plots.training_png(HISTORY, CURRENT, CANDIDATE, decision=decision, **kwargs)
    )
    assert (np.abs(with_interval - plain).sum(axis=-1) > 0).mean() > 0.001
    # the error bar is black, in the held-out panel
    right = slice(plain.shape[1] // 2, None)
    assert (with_interval[:, right].sum(axis=-1) < 60).sum() > (
        plain[:, right].sum(axis=-1) < 60
    ).sum() + 20
    text = interval_text(decision)
    assert text == f"{decision['mean']:+.3f} [{decision['low']:+.3f},{decision['high']:+.3f}]"
    assert interval_text(None) == "-"
