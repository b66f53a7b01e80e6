"""Label Studio's requests as it really sends them (tests/support/fixtures/protocol, captured
from Label Studio 1.23.2), the feature flag the deployment sets on it, and the test image the
serving tests send through them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "protocol"

# Label Studio's feature flag (an environment variable of its process) for the prediction
# import that recounts only the tasks of the call instead of the whole project
# (docs/deployment.md, "Large projects")
EFFICIENT_PREDICTION_IMPORT = {
    "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short": "true"
}


def fixture(name: str) -> dict:
    """The captured request ``name`` (its method, path, headers and JSON body)."""
    return json.loads((FIXTURES / name).read_text())


def red_circle(h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    """A noisy grey image with a red disc in the middle."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2] = (220, 30, 30)
    return img
