"""A synthetic salient-object dataset: textured backgrounds with contrasting shapes.

Every sample is drawn from its own random stream, ``SeedSequence([seed, index])``, so sample
``i`` of a seed is the same however many samples are generated.

Two modes:

* salient (``classes=None``): one to ``max_objects`` ellipses, polygons or blobs; the mask is
  their union, 1 x H x W;
* classes (e.g. ``("circle", "square", "triangle")``): shapes of those classes, one mask per
  class, K x H x W; a shape drawn later hides the earlier ones where they overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sam2unet.exceptions import ConfigError

SALIENT_SHAPES: tuple[str, ...] = ("ellipse", "polygon", "blob")
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
MIN_SIZE = 8


@dataclass(frozen=True)
class SyntheticPaths:
    """Where :func:`write_synthetic_dataset` put its files.

    ``masks`` holds the masks directly (salient mode) or one sub-folder per class.
    """

    images: Path
    masks: Path
    labels: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def mask_dirs(self) -> list[Path]:
        """One mask folder per label, in label order."""
        if self.labels == ("object",):
            return [self.masks]
        return [self.masks / label for label in self.labels]


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(h, w) < MIN_SIZE:
        raise ConfigError(
            f"synthetic images must be at least {MIN_SIZE} pixels a side, got {h}x{w}"
        )
    return h, w


def _smooth_noise(
    rng: np.random.Generator, h: int, w: int, cells: int, channels: int
) -> np.ndarray:
    """H x W x C float32 in about [0, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.random((cells, cells, channels)).astype(np.float32)
    planes = [
        np.asarray(Image.fromarray(grid[:, :, c], mode="F").resize((w, h), Image.BICUBIC))
        for c in range(channels)
    ]
    return np.stack(planes, axis=2)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """H x W x 3 float32 in [0, 255]: muted base colour, low-frequency clouds, optional
    stripes, fine noise."""
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    base = base.mean() + (base - base.mean()) * 0.5  # muted
    clouds = _smooth_noise(rng, h, w, int(rng.integers(3, 8)), 3) - 0.5
    img = base + clouds * rng.uniform(30, 70)
    if rng.random() < 0.4:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        img = img + stripes[:, :, None] * rng.uniform(5, 15)
    img = img + rng.normal(0, rng.uniform(4, 12), size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255)


def _foreground_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A saturated colour far from the background's mean colour."""
    best, best_d = None, -1.0
    for _ in range(16):
        c = rng.uniform(0, 255, size=3).astype(np.float32)
        c[rng.integers(0, 3)] = rng.choice([rng.uniform(0, 40), rng.uniform(215, 255)])
        d = float(np.linalg.norm(c - bg_mean))
        if d > best_d:
            best, best_d = c, d
        if d > 150:
            break
    assert best is not None
    return best


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """H x W x 3 float32 texture around ``colour`` (noise, spots or stripes)."""
    kind = rng.integers(0, 3)
    tex = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
    if kind == 0:
        tex = tex + rng.normal(0, 10, size=(h, w, 3))
    elif kind == 1:
        tex = tex + (_smooth_noise(rng, h, w, int(rng.integers(6, 14)), 1) - 0.5) * 60
    else:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / rng.uniform(4, 9))
        tex = tex + stripes[:, :, None] * 25
    return np.clip(tex, 0, 255)


def _polygon_mask(h: int, w: int, points: np.ndarray) -> np.ndarray:
    """H x W bool: the filled polygon with vertices ``points`` (N x 2, x y)."""
    im = Image.new("L", (w, h), 0)
    ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(im) > 0


def _radial_points(
    cx: float, cy: float, radii: np.ndarray, start: float = 0.0
) -> np.ndarray:  # N x 2
    theta = start + np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
    return np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=1)


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """H x W bool mask of one shape of ``kind`` at a random place, size and rotation."""
    side = min(h, w)
    r = rng.uniform(0.12, 0.28) * side
    cx = rng.uniform(r, w - r) if w > 2 * r else w / 2
    cy = rng.uniform(r, h - r) if h > 2 * r else h / 2
    rot = rng.uniform(0, 2 * np.pi)
    if kind == "circle":
        yy, xx = np.mgrid[0:h, 0:w]
        return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    if kind == "ellipse":
        a, b = r, r * rng.uniform(0.45, 0.95)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
        u = dx * np.cos(rot) + dy * np.sin(rot)
        v = -dx * np.sin(rot) + dy * np.cos(rot)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "square":
        return _polygon_mask(h, w, _radial_points(cx, cy, np.full(4, r), rot))
    if kind == "triangle":
        return _polygon_mask(h, w, _radial_points(cx, cy, np.full(3, r), rot))
    if kind == "polygon":
        n = int(rng.integers(3, 9))
        theta = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.6, 1.0, n)
        pts = np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=1)
        return _polygon_mask(h, w, pts)
    if kind == "blob":
        theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        radii = np.ones_like(theta)
        for k in range(2, 6):
            radii += rng.uniform(0, 0.25 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        radii = r * np.clip(radii, 0.4, None) / radii.max()
        return _polygon_mask(h, w, _radial_points(cx, cy, radii))
    raise ConfigError(f"unknown shape {kind!r}")


def make_sample(
    rng: np.random.Generator,
    size: int | tuple[int, int],
    classes: Sequence[str] | None = None,
    max_objects: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """One sample: (H x W x 3 uint8 image, K x H x W uint8 mask with values 0/255).

    K = 1 in salient mode, ``len(classes)`` otherwise. Every shape is at least partly
    visible, so the union of the masks is never empty.
    """
    h, w = _hw(size)
    if classes is not None:
        unknown = [c for c in classes if c not in SHAPE_CLASSES]
        if unknown or not classes:
            raise ConfigError(f"shape classes must be among {SHAPE_CLASSES}, got {list(classes)}")
    img = _background(rng, h, w)
    bg_mean = img.reshape(-1, 3).mean(axis=0)
    k = 1 if classes is None else len(classes)
    masks = np.zeros((k, h, w), dtype=bool)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        if classes is None:
            kind, channel = SALIENT_SHAPES[int(rng.integers(len(SALIENT_SHAPES)))], 0
        else:
            channel = int(rng.integers(len(classes)))
            kind = classes[channel]
        shape = _shape_mask(rng, kind, h, w)
        if not shape.any():  # a shape on a tiny image can miss every pixel centre
            shape[int(h // 2), int(w // 2)] = True
        tex = _texture(rng, h, w, _foreground_colour(rng, bg_mean))
        img[shape] = tex[shape]
        masks[:, shape] = False
        masks[channel, shape] = True
    out = Image.fromarray(np.round(img).astype(np.uint8))
    out = out.filter(ImageFilter.GaussianBlur(radius=0.6))
    return np.asarray(out).copy(), masks.astype(np.uint8) * 255


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` for ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def generate(
    n: int,
    size: int | tuple[int, int],
    seed: int = 0,
    classes: Sequence[str] | None = None,
    max_objects: int = 2,
    start: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` samples (image H x W x 3 uint8, mask K x H x W uint8 0/255), indices
    ``start .. start + n - 1`` of ``seed``."""
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    return [
        make_sample(sample_rng(seed, i), size, classes, max_objects)
        for i in range(start, start + n)
    ]


def write_synthetic_dataset(
    out_dir: str | Path,
    n: int,
    size: int | tuple[int, int],
    seed: int = 0,
    classes: Sequence[str] | None = None,
    max_objects: int = 2,
) -> SyntheticPaths:
    """Write ``n`` samples as ``out_dir/images/NNNNN.png`` and ``out_dir/masks/NNNNN.png``
    (single-channel 0/255), or ``out_dir/masks/<class>/NNNNN.png`` with ``classes``."""
    out = Path(out_dir)
    images, masks = out / "images", out / "masks"
    labels = ("object",) if classes is None else tuple(classes)
    paths = SyntheticPaths(images, masks, labels, tuple(f"{i:05d}" for i in range(n)))
    images.mkdir(parents=True, exist_ok=True)
    for d in paths.mask_dirs:
        d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(paths.names):
        rgb, mask = make_sample(sample_rng(seed, i), size, classes, max_objects)
        Image.fromarray(rgb).save(images / f"{name}.png")
        for d, m in zip(paths.mask_dirs, mask, strict=True):
            Image.fromarray(m).save(d / f"{name}.png")
    return paths


#: Kinds of :func:`make_domain_sample`: an easy high-contrast object, a low-contrast object,
#: a small object, several objects, and an object with a texture like its busy background's.
DOMAINS: tuple[str, ...] = ("easy", "low_contrast", "small", "several", "camouflage")


def make_domain_sample(
    rng: np.random.Generator, size: int | tuple[int, int], domain: str
) -> tuple[np.ndarray, np.ndarray]:
    """One salient-mode sample of ``domain`` (see :data:`DOMAINS`): (H x W x 3 uint8 image,
    1 x H x W uint8 0/255 mask). ``easy`` is a :func:`make_sample` with one object."""
    if domain not in DOMAINS:
        raise ConfigError(f"unknown domain {domain!r}; known: {list(DOMAINS)}")
    if domain == "easy":
        return make_sample(rng, size, None, max_objects=1)
    h, w = _hw(size)
    img = _background(rng, h, w)
    bg_mean = img.reshape(-1, 3).mean(axis=0)
    mask = np.zeros((h, w), dtype=bool)
    count = int(rng.integers(3, 6)) if domain == "several" else 1
    for _ in range(count):
        kind = SALIENT_SHAPES[int(rng.integers(len(SALIENT_SHAPES)))]
        shape = _shape_mask(rng, kind, h, w)
        if domain in ("small", "several"):  # shrink the shape around its centre
            ys, xs = np.nonzero(shape)
            cy, cx = ys.mean(), xs.mean()
            f = rng.uniform(0.25, 0.4) if domain == "small" else rng.uniform(0.4, 0.6)
            yy, xx = np.mgrid[0:h, 0:w]
            sy = np.clip(np.round(cy + (yy - cy) / f), 0, h - 1).astype(int)
            sx = np.clip(np.round(cx + (xx - cx) / f), 0, w - 1).astype(int)
            shape = shape[sy, sx] & (np.abs(yy - cy) * 1.0 / f < h) & (np.abs(xx - cx) / f < w)
        if not shape.any():
            shape[int(h // 2), int(w // 2)] = True
        if domain == "low_contrast":
            colour = bg_mean + rng.choice([-1.0, 1.0], size=3) * rng.uniform(14, 26, size=3)
        elif domain == "camouflage":
            colour = bg_mean + rng.normal(0, 20, size=3)
        else:
            colour = _foreground_colour(rng, bg_mean)
        tex = _texture(rng, h, w, np.clip(colour, 0, 255).astype(np.float32))
        if domain == "camouflage":
            tex = 0.5 * tex + 0.5 * _background(rng, h, w)
        img[shape] = tex[shape]
        mask |= shape
    out = Image.fromarray(np.round(img).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(out).copy(), mask[None].astype(np.uint8) * 255
