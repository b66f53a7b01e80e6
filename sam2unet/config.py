"""Model sizes and configuration: the Hiera settings per size, the official SAM2 checkpoints per
size, and the frozen dataclass saved inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sam2unet.exceptions import ConfigError


@dataclass(frozen=True)
class HieraSpec:
    """Settings of SAM2's Hiera trunk for one model size."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the four stage outputs, finest first (dim doubles per stage)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.stages)))


HIERA_SPECS: dict[str, HieraSpec] = {
    # A very small trunk for tests and CPU demos: same architecture, few narrow blocks.
    "test": HieraSpec(16, 1, (1, 1, 2, 1), (3,), (7, 7), (8, 4, 4, 2)),
    "tiny": HieraSpec(96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7)),
    "small": HieraSpec(96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7)),
    "base_plus": HieraSpec(112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14)),
    "large": HieraSpec(144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), (8, 4, 16, 8)),
}

# Official checkpoints (Meta's SAM2 and SAM2.1 releases) per size.
OFFICIAL_CHECKPOINTS: dict[str, dict[str, str]] = {
    "sam2.1": {
        s: f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{s}.pt"
        for s in ("tiny", "small", "base_plus", "large")
    },
    "sam2": {
        s: f"https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_{s}.pt"
        for s in ("tiny", "small", "base_plus", "large")
    },
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a SAM2-UNet model (besides the base trunk weights).

    ``labels`` names the output channels in order; a single-label model has one channel.
    ``image_size`` is the square side the network sees; it must be a multiple of 32.
    ``rfb_channels`` is the width of the RFB reductions and the decoder: 64 as in the paper, 16
    for the test size so that tests train in seconds on a CPU.
    """

    size: str = "tiny"
    image_size: int = 352
    adapter_dim: int = 32
    rfb_channels: int | None = None  # 64 (as released); 16 for the test size
    labels: tuple[str, ...] = ("object",)
    hiera: HieraSpec | None = field(default=None)

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % 32:
            raise ConfigError(
                f"image_size must be a positive multiple of 32 (Hiera's total stride), got {self.image_size}"
            )
        if not self.labels:
            raise ConfigError("labels must name at least one output channel")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels must be unique, got {list(self.labels)}")
        if self.rfb_channels is None:
            object.__setattr__(self, "rfb_channels", 16 if self.size == "test" else 64)
        if self.hiera is None:
            if self.size not in HIERA_SPECS:
                raise ConfigError(
                    f"unknown model size {self.size!r}; known sizes: {', '.join(HIERA_SPECS)}"
                )
            object.__setattr__(self, "hiera", HIERA_SPECS[self.size])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        if d.get("hiera") is not None:
            h = dict(d["hiera"])
            for k in (
                "stages",
                "global_att_blocks",
                "window_pos_embed_bkg_spatial_size",
                "window_spec",
            ):
                if k in h:
                    h[k] = tuple(h[k])
            d["hiera"] = HieraSpec(**h)
        if "labels" in d:
            d["labels"] = tuple(d["labels"])
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        d = self.to_dict()
        d.update(changes)
        if "size" in changes and "hiera" not in changes:
            d["hiera"] = None
        return ModelConfig.from_dict(d)
