"""The training loop: it learns on synthetic data, checkpoints, and resumes exactly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sam2unet.checkpoints import load_delta, read_delta, save_delta
from sam2unet.data import ArraySource, SegmentationDataset, train_val_datasets
from sam2unet.exceptions import ConfigError
from sam2unet.modeling.sam2unet import is_frozen_key
from sam2unet.random_weights import random_model, write_official_checkpoint
from sam2unet.synthetic import SHAPE_CLASSES, generate
from sam2unet.train_config import TrainConfig, TrainEvent, resume_config
from sam2unet.training import initial_model, train
from sam2unet.validation import validate
from tests.support.model_helpers import cpu_config, torch_threads

SIDE = 64  # network input; the synthetic images are 128 x 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def datasets(n_train: int, n_val: int, seed: int = 0):
    train_src = ArraySource(generate(n_train, 128, seed=seed + 1))
    val_src = ArraySource(generate(n_val, 128, seed=seed + 2)) if n_val else None
    return (
        SegmentationDataset(train_src, SIDE, train=True, seed=seed),
        SegmentationDataset(val_src, SIDE) if val_src is not None else None,
    )


def quiet(**kw) -> TrainConfig:
    return TrainConfig(**{"device": "cpu", "progress_bar": False, **kw})


def test_training_beats_the_untrained_model(tmp_path: Path) -> None:
    train_ds, val_ds = datasets(60, 16)
    loaded = random_model(cpu_config(), seed=0)
    before = validate(loaded.model, loaded.config, val_ds)
    events: list[TrainEvent] = []
    start = time.perf_counter()
    result = train(
        loaded,
        train_ds,
        val_ds,
        quiet(epochs=4, batch_size=4, lr=3e-3, seed=0),
        out_dir=tmp_path,
        progress=events.append,
    )
    seconds = time.perf_counter() - start
    after = result.history[-1].val
    print(
        f"\nheld-out IoU@0.5 {before['iou']:.3f} -> {after['iou']:.3f}, "
        f"mIoU {before['miou']:.3f} -> {after['miou']:.3f}, "
        f"S {before['sm']:.3f} -> {after['sm']:.3f}, "
        f"loss {result.history[0].loss:.3f} -> {result.history[-1].loss:.3f}, {seconds:.1f}s"
    )
    assert after["iou"] > before["iou"] + 0.3
    assert after["iou"] > 0.55
    assert after["miou"] > before["miou"] + 0.2
    assert result.history[-1].loss < result.history[0].loss
    # one "step" event per batch (60 / 4 -> 15 batches), one "epoch" event per epoch
    assert [e.kind for e in events].count("step") == 4 * 15
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2, 3, 4]
    # cosine schedule over the epochs, from lr down towards eta_min
    lrs = [r.lr for r in result.history]
    assert lrs[0] == pytest.approx(3e-3) and lrs == sorted(lrs, reverse=True)
    # the best checkpoint holds the best epoch's validation metric
    best = max(result.history, key=lambda r: r.val["miou"])
    assert result.best_epoch == best.epoch
    assert result.best_metric == pytest.approx(best.val["miou"])
    saved = read_delta(result.best_path)
    assert saved["metrics"]["epoch"] == best.epoch and saved["train_state"] is None
    assert json.loads((tmp_path / "history.json").read_text())[-1]["epoch"] == 4
    reloaded = load_delta(result.best_path)
    again = validate(reloaded.model, reloaded.config, val_ds)
    assert again["miou"] == pytest.approx(best.val["miou"], abs=1e-6)


def trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def test_resume_continues_exactly(tmp_path: Path) -> None:
    train_ds, val_ds = datasets(8, 2)
    config = quiet(epochs=3, batch_size=4, seed=5)

    full = train(random_model(cpu_config(), 0), train_ds, val_ds, config, tmp_path / "full")

    part = train(
        random_model(cpu_config(), 0),
        train_ds,
        val_ds,
        config,
        tmp_path / "part",
        should_stop=lambda: True,
    )
    assert part.stopped and part.epochs_done == 1
    ckpt = load_delta(part.last_path)
    assert ckpt.train_state["epoch"] == 1
    resumed = train(
        ckpt, train_ds, val_ds, config, tmp_path / "part", resume_state=ckpt.train_state
    )
    assert not resumed.stopped and resumed.epochs_done == 3
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    assert [r.loss for r in resumed.history] == [r.loss for r in full.history]
    assert [r.lr for r in resumed.history] == [r.lr for r in full.history]
    assert [r.val for r in resumed.history] == [r.val for r in full.history]
    a, b = trainable(full.model), trainable(resumed.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_epoch == full.best_epoch
    state = read_delta(resumed.last_path)["train_state"]
    assert state["epoch"] == 3 and state["scheduler"]["last_epoch"] == 3


def test_resume_config_keeps_fixed_settings() -> None:
    state = {"train_config": quiet(epochs=3, lr=1e-3).to_dict()}
    assert resume_config(state, epochs=None, num_workers=2).num_workers == 2
    assert resume_config(state, epochs=3).epochs == 3
    with pytest.raises(ConfigError, match=r"epochs \(checkpoint 3, asked 5\)"):
        resume_config(state, epochs=5)
    with pytest.raises(ConfigError, match="bce_mode"):
        resume_config(state, bce_mode="weighted")


def test_checkpoints_with_a_base_hold_only_trainable_weights(tmp_path: Path) -> None:
    base = write_official_checkpoint(
        tmp_path / "sam2_hiera_test.pt", random_model(cpu_config()).model
    )
    loaded = initial_model(cpu_config(), sam2=base)
    assert loaded.base is not None and loaded.base.name == base.name
    train_ds, _ = datasets(4, 0)
    result = train(loaded, train_ds, None, quiet(epochs=1, batch_size=4), tmp_path / "run")
    assert result.best_path == result.last_path  # no validation: the last one
    payload = read_delta(result.last_path)
    assert payload["base"]["name"] == base.name
    assert not any(is_frozen_key(k) for k in payload["weights"])
    back = load_delta(result.last_path, [tmp_path])
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x)[0], result.model.eval()(x)[0])


def test_weighted_bce_trains_too(tmp_path: Path) -> None:
    train_ds, _ = datasets(2, 0)
    result = train(
        random_model(cpu_config()),
        train_ds,
        None,
        quiet(epochs=1, batch_size=2, bce_mode="weighted"),
    )
    assert result.last_path is None and result.best_path is None
    assert result.history[0].loss > 0


def test_mismatches_are_config_errors() -> None:
    train_ds, _ = datasets(2, 0)
    with pytest.raises(ConfigError, match="resized to 64 but the model config says 96"):
        train(random_model(cpu_config(image_size=96)), train_ds, None, quiet(epochs=1))
    with pytest.raises(ConfigError, match="labels"):
        train(random_model(cpu_config(labels=("a", "b"))), train_ds, None, quiet(epochs=1))
    with pytest.raises(ConfigError, match="select metric"):
        quiet(select_metric="accuracy")
    with pytest.raises(ValueError, match="sum"):
        quiet(bce_mode="sum")


def test_loader_workers_do_not_change_the_result() -> None:
    """Data order and flips depend on seed and epoch only, so a run resumed with another
    ``--workers`` still continues the same run."""
    train_ds, _ = datasets(4, 0)
    results = [
        train(
            random_model(cpu_config()), train_ds, None, quiet(epochs=1, batch_size=2, num_workers=w)
        )
        for w in (0, 2)
    ]
    a, b = (trainable(r.model) for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results[0].history[0].loss == results[1].history[0].loss


def test_multi_label_training_reports_each_label(tmp_path: Path) -> None:
    samples = generate(6, 96, seed=3, classes=SHAPE_CLASSES, max_objects=3)
    source = ArraySource(samples, labels=SHAPE_CLASSES)
    train_ds, val_ds = train_val_datasets(source, SIDE, 0.34, seed=0)
    loaded = random_model(cpu_config(labels=SHAPE_CLASSES))
    result = train(loaded, train_ds, val_ds, quiet(epochs=1, batch_size=2), tmp_path)
    val = result.history[0].val
    for label in SHAPE_CLASSES:
        assert 0 <= val[f"miou/{label}"] <= 1
    assert val["miou"] == pytest.approx(np.mean([val[f"miou/{c}"] for c in SHAPE_CLASSES]))
    assert load_delta(result.last_path).config.labels == SHAPE_CLASSES


def test_initial_model_from_a_delta_or_released_file(tmp_path: Path) -> None:
    start = random_model(cpu_config(image_size=96), seed=4)
    delta = save_delta(tmp_path / "d.pt", start.model, start.config, None, train_state={"x": 1})
    loaded = initial_model(cpu_config(), init=delta)
    assert loaded.config.image_size == 64 and loaded.train_state is None
    torch.save(start.model.state_dict(), tmp_path / "released.pth")
    released = initial_model(cpu_config(), init=tmp_path / "released.pth")
    assert released.source_format == "released" and released.config.image_size == 64
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        ref = start.model.eval()(x)[0]
        assert torch.equal(loaded.model.eval()(x)[0], ref)
        assert torch.equal(released.model.eval()(x)[0], ref)
