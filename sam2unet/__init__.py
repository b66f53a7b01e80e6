"""SAM2-UNet: SAM2's Hiera encoder with adapters, RFB reductions and a U-Net decoder.

Importing this package does not import ``sam2`` (which initialises hydra globally) or build any
model; :mod:`sam2unet.build` does that on demand.
"""

from sam2unet.config import HieraSpec, ModelConfig
from sam2unet.exceptions import CheckpointError, ConfigError, DatasetError, ImageError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "HieraSpec",
    "ImageError",
    "ModelConfig",
]
