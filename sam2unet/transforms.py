"""Image and mask pre/post-processing (numpy/PIL), shared by training and inference.

Images are decoded in the frame they are displayed in: a photo whose EXIF Orientation tag
turns it on screen (phones write one instead of turning the pixels) is turned the same way,
as Label Studio and browsers show it, so that predictions, prompts given in percent of the
displayed image, and annotations drawn on it all share one frame.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
from PIL import ExifTags, Image, ImageOps

from sam2unet.exceptions import ImageError

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Refuse images whose pixel count would need more memory than this (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """Any PIL image or numpy array (H x W, H x W x 1/3/4; uint8 or float in [0, 1]) to
    H x W x 3 uint8."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"expected an H x W x 3 image, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"empty image of shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def displayed_frame(im: Image.Image, name: str = "image") -> Image.Image:
    """A loaded image turned as its EXIF Orientation tag says it is displayed
    (:func:`PIL.ImageOps.exif_transpose`); the image itself when it has no such tag.

    An EXIF block too damaged to be read or rewritten leaves the image in its stored frame,
    with a warning naming ``name``: the pixels are intact and usable, and the orientation the
    block meant is unknown (refusing the image would lose a task its viewer still shows).
    """
    try:
        if ExifTags.Base.Orientation not in im.getexif():
            return im  # most images: no copy
        return ImageOps.exif_transpose(im)
    except Exception as e:  # the library raises many types on malformed EXIF blocks
        log.warning(
            "%s has an unreadable EXIF block (%s: %s); using its stored frame",
            name,
            type(e).__name__,
            e,
        )
        return im


def turned_on_screen(source: bytes | str | os.PathLike[str]) -> bool:
    """Whether an image (its bytes or its file) has an EXIF Orientation tag that displays it
    otherwise than stored (values 2 to 8). Reads the header only; False for data or EXIF that
    cannot be read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)
    except Exception:  # the library raises many types on malformed files
        return False


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes to H x W x 3 uint8 in the displayed frame (EXIF orientation
    applied, see :func:`displayed_frame`), refusing empty, corrupt, truncated and oversized
    (decompression-bomb) images with :class:`ImageError`."""
    if not data:
        raise ImageError("empty image (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image of {w}x{h} pixels exceeds the {max_pixels} pixel limit")
            im.load()
            return to_rgb_array(displayed_frame(im))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused as a decompression bomb: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot decode image: {e}") from e


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """Square resize of an H x W x 3 uint8 image (PIL bilinear, antialiased like training)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Square resize of an H x W uint8 mask with bicubic interpolation (as the released
    training data pipeline); returns float32 in [0, 1]."""
    im = Image.fromarray(mask)
    if mask.shape[0] != size or mask.shape[1] != size:
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def normalize(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x H x W float32, ImageNet-normalised."""
    x = rgb.astype(np.float32) * (1.0 / 255.0)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """Image of any size -> 3 x size x size float32 network input."""
    return normalize(resize_rgb(to_rgb_array(image), size))
