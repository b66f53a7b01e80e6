"""The settings of a training run (:class:`TrainConfig`, saved in every checkpoint's training
state), the config of a run that continues from such a checkpoint, and the records a run
reports (:class:`EpochRecord`, :class:`TrainEvent`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sam2unet.exceptions import ConfigError
from sam2unet.metrics import METRIC_NAMES
from sam2unet.modeling.loss import BCEMode
from sam2unet.validation import EXTRA_VAL_METRICS


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run. ``select_metric`` picks the best checkpoint (a key of
    :data:`sam2unet.metrics.METRIC_NAMES` or ``iou`` / ``dice``)."""

    epochs: int = 20
    batch_size: int = 12
    lr: float = 1e-3
    weight_decay: float = 5e-4
    eta_min: float = 1e-7
    bce_mode: str = BCEMode.AS_RELEASED.value
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    bf16: bool = False
    select_metric: str = "miou"
    val_batch_size: int = 8
    progress_bar: bool = True

    # Settings a resumed run must share with the run it continues.
    RESUME_FIXED = (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "eta_min",
        "bce_mode",
        "seed",
        "select_metric",
    )

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(
                f"need lr > 0 and weight decay >= 0, got {self.lr}, {self.weight_decay}"
            )
        if self.num_workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.num_workers}")
        object.__setattr__(self, "bce_mode", BCEMode(self.bce_mode).value)
        if self.select_metric not in METRIC_NAMES and self.select_metric not in EXTRA_VAL_METRICS:
            known = [*METRIC_NAMES, *EXTRA_VAL_METRICS]
            raise ConfigError(f"unknown select metric {self.select_metric!r}; known: {known}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resume_config(train_state: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """The config of a run continued from ``train_state``: the saved one, with ``overrides``
    (``None`` values ignored). Changing a :attr:`TrainConfig.RESUME_FIXED` setting is an error."""
    saved = TrainConfig.from_dict(train_state["train_config"]).to_dict()
    given = {k: v for k, v in overrides.items() if v is not None}
    if "bce_mode" in given:
        given["bce_mode"] = BCEMode(given["bce_mode"]).value
    clash = {
        k: (saved[k], v)
        for k, v in given.items()
        if k in TrainConfig.RESUME_FIXED and saved[k] != v
    }
    if clash:
        listed = ", ".join(f"{k} (checkpoint {a!r}, asked {b!r})" for k, (a, b) in clash.items())
        raise ConfigError(f"a resumed run must keep the settings it started with: {listed}")
    return TrainConfig.from_dict({**saved, **given})


@dataclass
class EpochRecord:
    """One finished epoch. ``epoch`` counts from 1; ``lr`` is the rate used during it;
    ``val`` is empty without a validation set."""

    epoch: int
    loss: float
    lr: float
    seconds: float
    val: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainEvent:
    """Progress report: ``kind`` is ``"step"`` (after each batch) or ``"epoch"`` (after
    validation and checkpointing; ``record`` is set)."""

    kind: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    lr: float
    record: EpochRecord | None = None
