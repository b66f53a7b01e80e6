"""How much the post-processing changes the scores: ``evaluate`` with the default (as served)
and with ``--postprocess released`` (as the authors' test.py), on one model and one small
synthetic test set. ``python -m bench.postprocess [--train-epochs 6] [--n 32]``; the result
table is in docs/model.md."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    from sam2unet.config import ModelConfig
    from sam2unet.data import ArraySource, SegmentationDataset
    from sam2unet.evaluate import evaluate_model
    from sam2unet.random_weights import random_model
    from sam2unet.synthetic import generate
    from sam2unet.train_config import TrainConfig
    from sam2unet.training import train

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-epochs", type=int, default=6)
    p.add_argument("--n", type=int, default=32, help="test images")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    config = ModelConfig(size="test", image_size=64)
    loaded = random_model(config, seed=0)
    data = SegmentationDataset(ArraySource(generate(48, 64, seed=1)), 64, train=True)
    cfg = TrainConfig(
        epochs=args.train_epochs, batch_size=8, lr=3e-3, device="cpu", progress_bar=False
    )
    loaded.model = train(loaded, data, None, cfg).model
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("images", "masks"):
            (root / d).mkdir()
        # test images larger than the 64-pixel input and not square: both resizes matter
        for i, (img, mask) in enumerate(generate(args.n, (96, 144), seed=args.seed)):
            Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
            Image.fromarray(mask[0]).save(root / "masks" / f"{i:03d}.png")
        scores, maps = {}, {}
        for mode in ("default", "released"):
            out = root / mode
            scores[mode] = evaluate_model(
                loaded,
                root / "images",
                root / "masks",
                device="cpu",
                save_dir=out,
                postprocess=mode,
            )
            maps[mode] = [np.asarray(Image.open(f), np.int16) for f in sorted(out.glob("*.png"))]
    diff = np.concatenate(
        [np.abs(a - b).ravel() for a, b in zip(maps["default"], maps["released"], strict=True)]
    )
    keys = ["sm", "wfm", "mae", "adp_em", "mean_em", "max_em", "adp_fm", "mean_fm", "miou", "mdice"]
    print(f"{'metric':<8}{'default':>10}{'released':>10}{'diff':>10}")
    for k in keys:
        if k in scores["default"]:
            a, b = scores["default"][k], scores["released"][k]
            print(f"{k:<8}{a:>10.4f}{b:>10.4f}{b - a:>+10.4f}")
    print(
        f"map pixels (0..255): mean |default - released| {diff.mean():.2f}, "
        f"max {int(diff.max())}, share differing {np.mean(diff > 0):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
