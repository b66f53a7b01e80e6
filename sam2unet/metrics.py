"""The SAM2-UNet paper's metrics, computed by ``pysodmetrics`` (``py_sod_metrics``).

Inputs follow the common salient-object evaluation protocol (the released ``eval.py``):
a prediction is a grey map stored as uint8 0..255, which pysodmetrics min-max normalises per
image; the ground truth is a grey mask thresholded at > 128. Float predictions in [0, 1] are
first quantised to uint8 as a saved PNG would be, so evaluating maps in memory and evaluating
the same maps written to files give the same numbers.

Keys of :meth:`MetricSuite.results` (all floats):

======== ==========================================================================
sm       S-measure (alpha 0.5)
wfm      weighted F-measure (beta 1, as the reference implementation)
mae      mean absolute error
adp_em   E-measure at the adaptive threshold (2 x mean of the map)
mean_em  E-measure averaged over the 256 thresholds
max_em   E-measure, best of the 256 thresholds
adp_fm   F-measure (beta^2 = 0.3) at the adaptive threshold
mean_fm  F-measure (beta^2 = 0.3) averaged over the 256 thresholds
max_fm   F-measure (beta^2 = 0.3), best of the 256 thresholds
miou     IoU averaged over the 256 thresholds (the paper's mIoU)
mdice    Dice averaged over the 256 thresholds (the paper's mDice)
======== ==========================================================================
"""

from __future__ import annotations

import numpy as np
import py_sod_metrics as psm

from sam2unet.exceptions import DatasetError

METRIC_NAMES: dict[str, str] = {
    "sm": "S-measure",
    "wfm": "weighted F",
    "mae": "MAE",
    "adp_em": "E-measure (adaptive)",
    "mean_em": "E-measure (mean)",
    "max_em": "E-measure (max)",
    "adp_fm": "F-measure (adaptive)",
    "mean_fm": "F-measure (mean)",
    "max_fm": "F-measure (max)",
    "miou": "mIoU",
    "mdice": "mDice",
}
# Metrics where lower is better; all others are higher-is-better.
LOWER_IS_BETTER = frozenset({"mae"})


def to_uint8_map(pred: np.ndarray) -> np.ndarray:
    """An H x W prediction as uint8 0..255: uint8 kept, bool -> 0/255, float in [0, 1] ->
    ``round(p * 255)``."""
    p = np.asarray(pred)
    if p.ndim != 2:
        raise DatasetError(f"expected an H x W map, got shape {p.shape}")
    if p.dtype == np.uint8:
        return p
    if p.dtype == bool:
        return p.astype(np.uint8) * 255
    if np.issubdtype(p.dtype, np.floating):
        if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or np.isnan(p).any()):
            raise DatasetError("float maps must hold values in [0, 1]")
        return np.round(p * 255.0).astype(np.uint8)
    raise DatasetError(f"unsupported map dtype {p.dtype}; use uint8, bool or float in [0, 1]")


def to_uint8_gt(gt: np.ndarray) -> np.ndarray:
    """An H x W ground truth as uint8: uint8 kept (foreground > 128), bool -> 0/255,
    float in [0, 1] -> foreground > 0.5."""
    g = np.asarray(gt)
    if g.ndim != 2:
        raise DatasetError(f"expected an H x W mask, got shape {g.shape}")
    if g.dtype == np.uint8:
        return g
    if g.dtype == bool:
        return g.astype(np.uint8) * 255
    if np.issubdtype(g.dtype, np.floating):
        return (g > 0.5).astype(np.uint8) * 255
    raise DatasetError(f"unsupported mask dtype {g.dtype}; use uint8, bool or float in [0, 1]")


class MetricSuite:
    """Accumulates (prediction, ground truth) pairs of H x W maps and reports the paper's
    metrics, each averaged over the pairs."""

    def __init__(self) -> None:
        self._sm = psm.Smeasure()
        self._wfm = psm.WeightedFmeasure()
        self._mae = psm.MAE()
        self._em = psm.Emeasure()
        dyn = {"with_dynamic": True, "with_adaptive": True}
        self._fm = psm.FmeasureV2(
            metric_handlers={
                "fm": psm.FmeasureHandler(**dyn, beta=0.3),
                "iou": psm.IOUHandler(with_dynamic=True, with_adaptive=False),
                "dice": psm.DICEHandler(with_dynamic=True, with_adaptive=False),
            }
        )
        self.count = 0

    def step(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one pair: pred H x W (uint8 0..255, bool, or float in [0, 1]),
        gt H x W (uint8, foreground > 128; bool; or float, foreground > 0.5)."""
        p, g = to_uint8_map(pred), to_uint8_gt(gt)
        if p.shape != g.shape:
            raise DatasetError(
                f"prediction is {p.shape[1]}x{p.shape[0]}, mask {g.shape[1]}x{g.shape[0]}"
            )
        for m in (self._sm, self._wfm, self._mae, self._em, self._fm):
            m.step(pred=p, gt=g)
        self.count += 1

    def results(self) -> dict[str, float]:
        """The metrics of :data:`METRIC_NAMES` as floats (plus ``count``)."""
        if not self.count:
            raise DatasetError("no samples were evaluated")
        em = self._em.get_results()["em"]
        fm = self._fm.get_results()
        out = {
            "sm": self._sm.get_results()["sm"],
            "wfm": self._wfm.get_results()["wfm"],
            "mae": self._mae.get_results()["mae"],
            "adp_em": em["adp"],
            "mean_em": em["curve"].mean(),
            "max_em": em["curve"].max(),
            "adp_fm": fm["fm"]["adaptive"],
            "mean_fm": fm["fm"]["dynamic"].mean(),
            "max_fm": fm["fm"]["dynamic"].max(),
            "miou": fm["iou"]["dynamic"].mean(),
            "mdice": fm["dice"]["dynamic"].mean(),
        }
        res = {k: float(v) for k, v in out.items()}
        res["count"] = self.count
        return res


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape (1.0 when both are empty)."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise DatasetError(f"shape mismatch: {p.shape} vs {g.shape}")
    union = np.count_nonzero(p | g)
    return 1.0 if union == 0 else np.count_nonzero(p & g) / union


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape (1.0 when both are empty)."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise DatasetError(f"shape mismatch: {p.shape} vs {g.shape}")
    total = np.count_nonzero(p) + np.count_nonzero(g)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(p & g) / total


def format_table(results: dict[str, float], title: str | None = None) -> str:
    """A two-column text table of metric results, in :data:`METRIC_NAMES` order."""
    rows = [(METRIC_NAMES.get(k, k), f"{results[k]:.4f}") for k in METRIC_NAMES if k in results]
    rows += [
        (k, f"{v:.4f}" if isinstance(v, float) else str(v))
        for k, v in results.items()
        if k not in METRIC_NAMES
    ]
    width = max(len(r[0]) for r in rows) if rows else 0
    lines = [title] if title else []
    lines += [f"{name:<{width}}  {value:>8}" for name, value in rows]
    return "\n".join(lines)
