"""The reference ``SAM2ImagePredictor`` on the weights of a random official-format checkpoint
(:func:`sam2unet.random_weights.write_random_sam2_checkpoint`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sam2unet.prompt_head import head_image_size

STUB = Path(__file__).parent / "torchvision_stub"


@contextmanager
def torchvision_stub() -> Iterator[None]:
    """The stand-in importable as ``torchvision`` inside the block only: on the way out its path
    leaves ``sys.path`` and its modules leave ``sys.modules``, so later tests (the image check
    among them) see torchvision absent, as it is."""
    sys.path.insert(0, str(STUB))
    try:
        yield
    finally:
        sys.path.remove(str(STUB))
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]


def reference_predictor(model, size: str):
    """sam2's own SAM2ImagePredictor on ``model``, its torchvision transforms from the stub
    (importable only while the predictor is built: sam2's transforms keep what they took)."""
    with torchvision_stub():
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(model)
    s = head_image_size(size)
    # the predictor hard-codes the feature sizes of a 1024 input
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor
