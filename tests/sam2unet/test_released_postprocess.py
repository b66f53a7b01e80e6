"""``sam2unet-assist evaluate --postprocess released``: the saved maps are exactly those the
authors' ``test.py`` writes (its steps are written out here, independently of the product:
final output's logits resized bilinearly to the ground truth's size, sigmoid, per-image
min-max, ``* 255`` truncated to uint8), on images of odd sizes; today's default is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cli import main
from sam2unet.checkpoints import load_released
from sam2unet.evaluate import evaluate_dirs
from sam2unet.transforms import preprocess
from tests.support.model_helpers import cpu_config, perturb_trainable, released_state, seeded_model

SIZES = [(37, 53), (64, 41), (29, 29), (80, 120)]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A released-format checkpoint (test size, perturbed decoder) and image/mask folders."""
    root = tmp_path_factory.mktemp("released-eval")
    model = seeded_model(cpu_config(), seed=11)
    perturb_trainable(model, seed=12)
    ckpt = root / "SAM2UNet-test.pth"
    torch.save(released_state(model), ckpt)
    rng = np.random.default_rng(3)
    for d in ("images", "masks"):
        (root / d).mkdir()
    for i, (h, w) in enumerate(SIZES):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        inside = (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 3) ** 2
        img[inside] = (200, 40, 40)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(inside.astype(np.uint8) * 255).save(root / "masks" / f"im{i}.png")
    return root, ckpt


def released_test_py(ckpt: Path, image: Path, gt_path: Path) -> np.ndarray:
    """The released test.py's steps for one image (its model input: our documented
    preprocessing at the released 352 input size)."""
    model = load_released(ckpt).model.eval()
    gt = np.asarray(Image.open(gt_path).convert("L"), np.float32)
    x = torch.from_numpy(preprocess(np.asarray(Image.open(image).convert("RGB")), 352))[None]
    with torch.no_grad():
        res, _, _ = model(x)
        res = F.interpolate(res, size=gt.shape, mode="bilinear", align_corners=False)
        res = res.sigmoid().data.cpu()
    res = res.numpy().squeeze()
    res = (res - res.min()) / (res.max() - res.min() + 1e-8)
    return (res * 255).astype(np.uint8)


def evaluate(root: Path, ckpt: Path, out: Path, capsys, *extra: str) -> dict:
    argv = ["evaluate", "--checkpoint", str(ckpt), "--images", str(root / "images")]
    argv += ["--masks", str(root / "masks"), "--save-pred", str(out), "--device", "cpu"]
    capsys.readouterr()
    assert main([*argv, "--batch-size", "1", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_released_maps_equal_the_released_test_py(case, tmp_path, capsys):
    root, ckpt = case
    results = evaluate(root, ckpt, tmp_path / "released", capsys, "--postprocess", "released")
    for i in range(len(SIZES)):
        name = f"im{i}.png"
        saved = np.asarray(Image.open(tmp_path / "released" / name))
        want = released_test_py(ckpt, root / "images" / name, root / "masks" / name)
        assert saved.shape == SIZES[i]
        assert np.array_equal(saved, want), name
        assert saved.min() == 0 and saved.max() >= 254  # per-image min-max
    assert results == pytest.approx(evaluate_dirs(tmp_path / "released", root / "masks"))

    default = evaluate(root, ckpt, tmp_path / "default", capsys)
    assert default == pytest.approx(evaluate_dirs(tmp_path / "default", root / "masks"))
    differ = [
        not np.array_equal(
            np.asarray(Image.open(tmp_path / "default" / f"im{i}.png")),
            np.asarray(Image.open(tmp_path / "released" / f"im{i}.png")),
        )
        for i in range(len(SIZES))
    ]
    assert all(differ)


def test_postprocess_needs_a_checkpoint_run(case, capsys):
    root, _ = case
    argv = ["evaluate", "--pred", str(root / "masks"), "--gt", str(root / "masks")]
    assert main([*argv, "--postprocess", "released"]) == 2
    assert "--postprocess applies to --checkpoint runs" in capsys.readouterr().err
