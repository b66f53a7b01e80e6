"""A task model made from the authors' released SAM2-UNet weights answers prompts with SAM2's
own head when an official checkpoint in ``MODEL_DIR/base`` has the same trunk (compared by a
hash of the trunk tensors), and by crop-and-segment when none does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from modelstore.version_heads import official_trunk_digest, trunk_digest
from sam2unet.checkpoints import build_from_sam2, load_released, trunk_state_of
from sam2unet.random_weights import write_random_sam2_checkpoint
from tests.support.model_helpers import perturb_trainable, released_state
from tests.worker.test_pipeline import context, image, kp, predict, rect
from worker.runtime import ModelRuntime


def _released_version(model_dir: Path, official: Path, perturb_trunk: bool = False) -> ModelRuntime:
    """A version made from a released-format checkpoint whose trunk is ``official``'s (or, with
    ``perturb_trunk``, slightly different), promoted, and a worker runtime holding it."""
    built = build_from_sam2(official, image_size=64)
    perturb_trainable(built.model, seed=5)  # a "trained" task model: its own decoder
    if perturb_trunk:
        with torch.no_grad():
            next(iter(built.model.encoder.parameters())).add_(1e-3)
    path = model_dir / "released" / "SAM2UNet-task.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(released_state(built.model), path)
    loaded = load_released(path, image_size=64)
    registry = ModelRegistry(model_dir, None)
    info = registry.create_version(loaded.model, loaded.config, None, source="released:task")
    registry.promote(info.name, reason="test")
    settings = Settings(model_size="test", image_size=64, model_dir=model_dir, device="cpu")
    rt = ModelRuntime(settings, registry)
    rt.ensure_current()
    return rt


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    write_random_sam2_checkpoint(d / "base" / "sam2.1_hiera_test.pt", "test")
    return d


def _official_runtime(model_dir: Path) -> ModelRuntime:
    from modelstore.bootstrap import ensure_current_version

    settings = Settings(model_size="test", image_size=64, model_dir=model_dir, device="cpu")
    registry = ModelRegistry(model_dir, None)
    ensure_current_version(registry, settings)
    rt = ModelRuntime(settings, registry)
    rt.ensure_current()
    return rt


def test_released_model_with_an_official_trunk_uses_sam2s_head(official_dir, tmp_path):
    model_dir = tmp_path / "models"
    (model_dir / "base").mkdir(parents=True)
    checkpoint = model_dir / "base" / "sam2.1_hiera_test.pt"
    checkpoint.write_bytes((official_dir / "base" / "sam2.1_hiera_test.pt").read_bytes())
    (model_dir / "base" / "notes.pt").write_bytes(b"not a checkpoint")  # skipped, no error
    rt = _released_version(model_dir, checkpoint)
    assert rt.info is not None and rt.info.base is None  # the version names no base
    assert rt.prompt_head == "sam2"
    assert trunk_digest(trunk_state_of(rt.predictor.model)) == official_trunk_digest(checkpoint)

    # its answers are those of the official checkpoint's own version: same trunk, same head
    ref = _official_runtime(official_dir)
    img = image(41, 57, seed=3)
    for objects in ([([kp(40, 45)], None)], [([kp(45, 50)], rect(20, 20, 50, 60))]):
        ours = predict(rt, img, context(objects)).result
        theirs = predict(ref, img, context(objects)).result
        assert [r["value"]["rle"] for r in ours] == [r["value"]["rle"] for r in theirs]
        assert ours and [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs])


def test_released_model_with_another_trunk_keeps_crop_and_segment(official_dir, tmp_path):
    model_dir = tmp_path / "models"
    (model_dir / "base").mkdir(parents=True)
    checkpoint = model_dir / "base" / "sam2.1_hiera_test.pt"
    checkpoint.write_bytes((official_dir / "base" / "sam2.1_hiera_test.pt").read_bytes())
    rt = _released_version(model_dir, checkpoint, perturb_trunk=True)
    assert rt.prompt_head == "crop"
    res = predict(rt, image(41, 57, seed=3), context([([kp(40, 45)], None)]))
    assert res.error is None


def test_trunk_digest_depends_on_every_tensor():
    a = {"x": torch.zeros(3), "y": torch.ones(2, 2)}
    b = {"y": torch.ones(2, 2), "x": torch.zeros(3)}
    assert trunk_digest(a) == trunk_digest(b)  # key order does not matter
    for changed in (
        {"x": torch.zeros(3), "y": torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-6]])},
        {"x": torch.zeros(3, dtype=torch.float64), "y": torch.ones(2, 2)},
        {"x": torch.zeros(3), "y": torch.ones(4)},
        {"x": torch.zeros(3), "z": torch.ones(2, 2)},
    ):
        assert trunk_digest(changed) != trunk_digest(a)
    assert np.array_equal(a["y"].numpy(), np.ones((2, 2)))
