"""Segmentation datasets: images paired with masks, and the training / evaluation transforms.

A *source* gives raw samples at their own size: (H x W x 3 uint8 image, K x H x W uint8 mask,
0..255). :class:`FolderSource` reads paired folders, :class:`ArraySource` holds arrays.
A :class:`SegmentationDataset` views a source (optionally a subset of it) through the
transform of the released SAM2-UNet pipeline: square resize (image bilinear, mask bicubic),
random horizontal and vertical flips when training, ImageNet normalisation.

Flips are drawn from ``SeedSequence([seed, epoch, index])``: the same for any number of loader
workers, and reproducible when training resumes at a given epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from sam2unet.exceptions import ConfigError, DatasetError
from sam2unet.transforms import (
    displayed_frame,
    normalize,
    resize_mask,
    resize_rgb,
    to_rgb_array,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS: tuple[str, ...] = IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- pairing


def _names(paths: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(sorted(paths)[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def list_by_stem(
    folder: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, what: str = "image"
) -> dict[str, Path]:
    """Files of ``folder`` with one of ``extensions`` (case-insensitive), keyed by stem.

    Hidden files and other extensions are skipped. A missing or empty folder, or two files
    with the same stem (``a.jpg`` and ``a.png``), is a :class:`DatasetError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{what} folder not found: {folder}")
    exts = {e.lower() for e in extensions}
    by_stem: dict[str, list[str]] = {}
    skipped = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in exts:
            skipped.append(p.name)
            continue
        by_stem.setdefault(p.stem, []).append(p.name)
    if skipped:
        log.debug("skipping %d files of %s without a known extension", len(skipped), folder)
    dups = {s: n for s, n in by_stem.items() if len(n) > 1}
    if dups:
        listed = "; ".join(" and ".join(n) for _, n in sorted(dups.items())[:10])
        raise DatasetError(f"{what} folder {folder} has several files with the same name: {listed}")
    if not by_stem:
        raise DatasetError(
            f"{what} folder {folder} has no {what} files (extensions: {', '.join(sorted(exts))})"
        )
    return {s: folder / n[0] for s, n in sorted(by_stem.items())}


def pair_by_stem(
    images_dir: str | Path,
    masks_dir: str | Path,
    what: tuple[str, str] = ("image", "mask"),
    extensions: tuple[Sequence[str], Sequence[str]] = (IMAGE_EXTENSIONS, MASK_EXTENSIONS),
) -> list[tuple[Path, Path]]:
    """(image, mask) paths paired by file stem, sorted by stem.

    Every image needs exactly one mask and every mask an image: anything else is a
    :class:`DatasetError` naming the unpaired files (never a silent mispairing).
    """
    a = list_by_stem(images_dir, extensions[0], what[0])
    b = list_by_stem(masks_dir, extensions[1], what[1])
    only_a = [a[s].name for s in a.keys() - b.keys()]
    only_b = [b[s].name for s in b.keys() - a.keys()]
    problems = []
    if only_a:
        problems.append(
            f"{len(only_a)} {what[0]}(s) in {images_dir} without a {what[1]}: {_names(only_a)}"
        )
    if only_b:
        problems.append(
            f"{len(only_b)} {what[1]}(s) in {masks_dir} without a {what[0]}: {_names(only_b)}"
        )
    if problems:
        raise DatasetError("unpaired files: " + "; ".join(problems))
    return [(a[s], b[s]) for s in sorted(a)]


# --------------------------------------------------------------------------- reading


def read_image(path: str | Path) -> np.ndarray:
    """An image file as H x W x 3 uint8 (RGB), in its displayed frame (EXIF orientation
    applied, as :func:`sam2unet.transforms.decode_image`)."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb_array(displayed_frame(im, str(path)).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as H x W uint8 0..255: a single-channel 0/255 PNG is one label.

    Colour masks are converted to grey (luma), as the released pipeline does. Like images,
    masks are read in their displayed frame: a mask file carrying an EXIF Orientation tag
    (saved in a photo's stored frame by an editor that kept the photo's metadata) is shown,
    and read, turned as its photo is.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(displayed_frame(im, str(path)).convert("L")).copy()
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}") from e


def mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    """A mask as K x H x W uint8 0..255 (an H x W mask becomes 1 x H x W).

    bool: True -> 255; float: values in [0, 1], scaled by 255; integer: 0..255, except that a
    mask holding only 0 and 1 is read as 0/1 and scaled by 255.
    """
    m = np.asarray(mask)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise DatasetError(f"expected a K x H x W or H x W mask, got shape {m.shape}")
    if m.dtype == bool:
        return m.astype(np.uint8) * 255
    if np.issubdtype(m.dtype, np.floating):
        if m.size and (m.min() < 0 or m.max() > 1):
            raise DatasetError(
                f"float masks must hold values in [0, 1], got [{m.min()}, {m.max()}]"
            )
        return np.round(m * 255.0).astype(np.uint8)
    if m.size and (m.min() < 0 or m.max() > 255):
        raise DatasetError(f"integer masks must hold values in 0..255, got [{m.min()}, {m.max()}]")
    if m.size and m.max() <= 1:
        return m.astype(np.uint8) * 255
    return m.astype(np.uint8)


# --------------------------------------------------------------------------- sources


class FolderSource:
    """Images in one folder, masks in one folder per label, paired by file stem.

    ``mask_dirs``: one folder (one label) or a sequence of folders, one per label, each holding
    a single-channel 0/255 mask for every image.
    """

    def __init__(
        self,
        images_dir: str | Path,
        mask_dirs: str | Path | Sequence[str | Path],
        labels: Sequence[str] | None = None,
    ) -> None:
        dirs = [mask_dirs] if isinstance(mask_dirs, (str, Path)) else list(mask_dirs)
        if not dirs:
            raise ConfigError("at least one mask folder is needed")
        if labels is None:
            labels = ("object",) if len(dirs) == 1 else tuple(Path(d).name for d in dirs)
        if len(labels) != len(dirs):
            raise ConfigError(f"{len(dirs)} mask folders for {len(labels)} labels {list(labels)}")
        self.labels = tuple(labels)
        pairs = [pair_by_stem(images_dir, d) for d in dirs]
        self.images = [img for img, _ in pairs[0]]
        self.masks = [tuple(p[i][1] for p in pairs) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return self.images[index].stem

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H x W x 3 uint8 image, K x H x W uint8 mask) at the files' own size."""
        rgb = read_image(self.images[index])
        planes = []
        for path in self.masks[index]:
            m = read_mask(path)
            if m.shape != rgb.shape[:2]:
                turned = m.shape == rgb.shape[1::-1]
                raise DatasetError(
                    f"mask {path} is {m.shape[1]}x{m.shape[0]} but its image "
                    f"{self.images[index]} is {rgb.shape[1]}x{rgb.shape[0]}"
                    + (
                        " (turned a quarter: both are read as displayed, EXIF orientation "
                        "applied; was one saved in the other's stored frame without its tag?)"
                        if turned
                        else ""
                    )
                )
            planes.append(m)
        return rgb, np.stack(planes)


class ArraySource:
    """Samples held in memory: a list of (H x W x 3 uint8 image, K x H x W or H x W mask).

    Masks may be bool, float in [0, 1] or uint8 (see :func:`mask_to_uint8`); every sample must
    have the same K and its image's H x W.
    """

    def __init__(
        self,
        samples: Sequence[tuple[np.ndarray, np.ndarray]],
        labels: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        if not samples:
            raise DatasetError("no samples given")
        if names is not None and len(names) != len(samples):
            raise DatasetError(f"{len(names)} names for {len(samples)} samples")
        self.names = [str(n) for n in names] if names is not None else None
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []
        k = None
        for i, (image, mask) in enumerate(samples):
            rgb = to_rgb_array(image)
            m = mask_to_uint8(mask)
            if m.shape[1:] != rgb.shape[:2]:
                raise DatasetError(
                    f"sample {self._label(i)}: mask is {m.shape[2]}x{m.shape[1]}, "
                    f"image is {rgb.shape[1]}x{rgb.shape[0]}"
                )
            if k is None:
                k = m.shape[0]
            elif m.shape[0] != k:
                raise DatasetError(
                    f"sample {self._label(i)} has {m.shape[0]} mask channels, sample 0 has {k}"
                )
            self.samples.append((rgb, m))
        assert k is not None
        self.labels = tuple(labels) if labels is not None else self._default_labels(k)
        if len(self.labels) != k:
            raise ConfigError(f"masks have {k} channels but labels are {list(self.labels)}")

    @staticmethod
    def _default_labels(k: int) -> tuple[str, ...]:
        return ("object",) if k == 1 else tuple(f"label{i}" for i in range(k))

    def _label(self, i: int) -> str:
        return self.names[i] if self.names is not None else str(i)

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self._label(index)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H x W x 3 uint8 image, K x H x W uint8 mask)."""
        return self.samples[index]


class Source(Protocol):
    """What a :class:`SegmentationDataset` reads: labelled raw samples by index."""

    labels: tuple[str, ...]

    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H x W x 3 uint8 image, K x H x W uint8 mask 0..255), K = ``len(labels)``."""
        ...


# --------------------------------------------------------------------------- transforms


def transform_sample(
    rgb: np.ndarray,
    mask: np.ndarray,
    image_size: int,
    hflip: bool = False,
    vflip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize (image bilinear, mask bicubic), flip, normalise.

    rgb: H x W x 3 uint8, mask: K x H x W uint8 -> (3 x S x S float32 normalised,
    K x S x S float32 in [0, 1]).
    """
    img = resize_rgb(rgb, image_size)
    m = np.stack([resize_mask(plane, image_size) for plane in mask])
    if hflip:
        img, m = img[:, ::-1], m[:, :, ::-1]
    if vflip:
        img, m = img[::-1], m[:, ::-1]
    return torch.from_numpy(normalize(img)), torch.from_numpy(np.ascontiguousarray(m))


class SegmentationDataset(torch.utils.data.Dataset):
    """A view of a source for training (random flips) or evaluation (no flips).

    Item: (image 3 x S x S float32, mask K x S x S float32 in [0, 1]), S = ``image_size``.
    ``indices`` restricts the view to those samples of the source.
    """

    def __init__(
        self,
        source: Source,
        image_size: int,
        train: bool = False,
        seed: int = 0,
        indices: Sequence[int] | None = None,
        flip_p: float = 0.5,
    ) -> None:
        if image_size <= 0 or image_size % 32:
            raise ConfigError(f"image_size must be a positive multiple of 32, got {image_size}")
        self.source = source
        self.image_size = int(image_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
        self.epoch = 0

    @property
    def labels(self) -> tuple[str, ...]:
        return self.source.labels

    def set_epoch(self, epoch: int) -> None:
        """Select the flips of ``epoch`` (call before iterating a loader over this dataset)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> str:
        return self.source.name(self.indices[i])

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(H x W x 3 uint8 image, K x H x W uint8 mask) at the sample's own size."""
        return self.source.raw(self.indices[i])

    def flips(self, i: int) -> tuple[bool, bool]:
        """(hflip, vflip) of item ``i`` in the current epoch."""
        if not self.train:
            return False, False
        idx = self.indices[i]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, idx]))
        u = rng.random(2)
        return bool(u[0] < self.flip_p), bool(u[1] < self.flip_p)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, mask = self.raw(i)
        hflip, vflip = self.flips(i)
        return transform_sample(rgb, mask, self.image_size, hflip, vflip)


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(n)`` into (train, val) index lists, both sorted.

    ``val_fraction`` in [0, 1): the validation part has ``round(n * val_fraction)`` items, at
    least one when the fraction is positive, and the training part keeps at least one.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise DatasetError(f"cannot hold out {n_val} of {n} samples for validation")
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 7])).permutation(n)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


def train_val_datasets(
    source: Source,
    image_size: int,
    val_fraction: float = 0.0,
    val_source: Source | None = None,
    seed: int = 0,
) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(train, val) datasets: ``val_source`` when given, else a seeded ``val_fraction`` split
    of ``source`` (no validation set when the fraction is 0)."""
    if val_source is not None:
        if val_fraction:
            raise ConfigError("give either a validation source or a validation fraction, not both")
        if tuple(val_source.labels) != tuple(source.labels):
            raise ConfigError(
                f"validation labels {list(val_source.labels)} differ from training labels "
                f"{list(source.labels)}"
            )
        return (
            SegmentationDataset(source, image_size, train=True, seed=seed),
            SegmentationDataset(val_source, image_size, train=False, seed=seed),
        )
    train_idx, val_idx = split_indices(len(source), val_fraction, seed)
    train = SegmentationDataset(source, image_size, train=True, seed=seed, indices=train_idx)
    val = (
        SegmentationDataset(source, image_size, train=False, seed=seed, indices=val_idx)
        if val_idx
        else None
    )
    return train, val
