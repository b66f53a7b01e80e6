"""Pure network modules: tensors in, tensors out."""

from sam2unet.modeling.decoder import DoubleConv, Up
from sam2unet.modeling.encoder import Adapter, add_adapters
from sam2unet.modeling.loss import deep_supervision_loss, structure_loss
from sam2unet.modeling.rfb import RFB
from sam2unet.modeling.sam2unet import SAM2UNet

__all__ = [
    "RFB",
    "Adapter",
    "DoubleConv",
    "SAM2UNet",
    "Up",
    "add_adapters",
    "deep_supervision_loss",
    "structure_loss",
]
