"""Paired-folder datasets, transforms, in-memory datasets, splits and synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam2unet.data import (
    ArraySource,
    FolderSource,
    SegmentationDataset,
    mask_to_uint8,
    pair_by_stem,
    split_indices,
    train_val_datasets,
)
from sam2unet.exceptions import ConfigError, DatasetError
from sam2unet.synthetic import SHAPE_CLASSES, generate, write_synthetic_dataset
from sam2unet.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.support.model_helpers import write_pngs

# ----------------------------------------------------------------------------- pairing


def folders(tmp_path: Path, images: list[str], masks: list[str]) -> tuple[Path, Path]:
    write_pngs(tmp_path / "images", images)
    write_pngs(tmp_path / "masks", masks)
    return tmp_path / "images", tmp_path / "masks"


def test_pairs_by_stem_across_extensions(tmp_path: Path) -> None:
    img, msk = folders(tmp_path, ["b.jpg", "a.PNG", "c.webp"], ["a.png", "c.png", "b.png"])
    (img / ".DS_Store").write_bytes(b"x")
    (img / "notes.txt").write_text("not an image")
    pairs = pair_by_stem(img, msk)
    assert [(i.name, m.name) for i, m in pairs] == [
        ("a.PNG", "a.png"),
        ("b.jpg", "b.png"),
        ("c.webp", "c.png"),
    ]


@pytest.mark.parametrize(
    ("images", "masks", "message"),
    [
        (
            ["a.png", "b.png", "c.png"],
            ["a.png", "c.png"],
            r"1 image\(s\) .* without a mask: b\.png",
        ),
        (["a.png"], ["a.png", "zz.png"], r"1 mask\(s\) .* without a image: zz\.png"),
        (["a.jpg", "a.png", "b.png"], ["a.png", "b.png"], r"same name: a\.jpg and a\.png"),
        (["a.png"], ["a.png", "a.bmp"], r"same name: a\.bmp and a\.png"),
        ([], ["a.png"], "no image files"),
    ],
    ids=["missing-mask", "extra-mask", "duplicate-image", "duplicate-mask", "empty"],
)
def test_pairing_errors_name_the_files(tmp_path: Path, images, masks, message) -> None:
    (tmp_path / "images").mkdir()
    img, msk = folders(tmp_path, images, masks)
    with pytest.raises(DatasetError, match=message):
        pair_by_stem(img, msk)


def test_missing_and_extra_reported_together(tmp_path: Path) -> None:
    img, msk = folders(tmp_path, ["a.png", "b.png"], ["b.png", "c.png"])
    with pytest.raises(DatasetError) as e:
        FolderSource(img, msk)
    assert "a.png" in str(e.value) and "c.png" in str(e.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        pair_by_stem(tmp_path / "nope", tmp_path)


def test_mask_of_other_size_is_an_error(tmp_path: Path) -> None:
    write_pngs(tmp_path / "images", ["a.png"], size=(20, 30))
    write_pngs(tmp_path / "masks", ["a.png"], size=(30, 20))
    src = FolderSource(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(DatasetError, match=r"mask .*a\.png is 20x30 but its image .* is 30x20"):
        src.raw(0)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    img, msk = folders(tmp_path, ["a.png"], ["a.png"])
    (img / "a.png").write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.png"):
        FolderSource(img, msk).raw(0)


def test_one_mask_folder_per_label(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(tmp_path, 3, 40, seed=0, classes=SHAPE_CLASSES)
    src = FolderSource(paths.images, paths.mask_dirs)
    assert src.labels == SHAPE_CLASSES
    rgb, mask = src.raw(1)
    assert rgb.shape == (40, 40, 3) and mask.shape == (3, 40, 40)
    _, expected = generate(2, 40, seed=0, classes=SHAPE_CLASSES)[1]
    np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------- transforms


@pytest.fixture
def source() -> ArraySource:
    return ArraySource(generate(6, (50, 70), seed=4), names=[f"s{i}" for i in range(6)])


def test_eval_item_shapes_and_normalisation(source: ArraySource) -> None:
    ds = SegmentationDataset(source, 64)
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (1, 64, 64) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1 and y.max() > 0.9
    rgb, _ = source.raw(0)
    resized = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.BILINEAR), np.float32) / 255
    expected = (resized - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x.numpy().transpose(1, 2, 0), expected, atol=1e-5)
    assert ds.flips(0) == (False, False)


def test_train_flips_are_seeded_per_epoch_and_match_eval(source: ArraySource) -> None:
    train = SegmentationDataset(source, 64, train=True, seed=7)
    again = SegmentationDataset(source, 64, train=True, seed=7)
    plain = SegmentationDataset(source, 64)
    seen = set()
    for epoch in range(4):
        train.set_epoch(epoch)
        again.set_epoch(epoch)
        for i in range(len(train)):
            h, v = train.flips(i)
            assert (h, v) == again.flips(i)
            seen.add((h, v))
            x, y = train[i]
            ex, ey = plain[i]
            dims = [d for d, f in ((2, h), (1, v)) if f]
            if dims:
                ex, ey = ex.flip(dims), ey.flip(dims)
            assert torch.equal(x, ex) and torch.equal(y, ey)
    assert len(seen) == 4  # all four flip combinations occur over 24 draws
    train.set_epoch(0)
    other_seed = SegmentationDataset(source, 64, train=True, seed=8)
    assert [train.flips(i) for i in range(6)] != [other_seed.flips(i) for i in range(6)]


def test_dataset_rejects_bad_image_size(source: ArraySource) -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        SegmentationDataset(source, 50)


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[0, 1], [1, 0]], dtype=bool),
        np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32),
        np.array([[0, 1], [1, 0]], dtype=np.uint8),
        np.array([[0, 255], [255, 0]], dtype=np.uint8),
        np.array([[[0, 255], [255, 0]]], dtype=np.uint8),
    ],
    ids=["bool", "float", "uint8-01", "uint8-0255", "k-h-w"],
)
def test_mask_dtypes(mask: np.ndarray) -> None:
    np.testing.assert_array_equal(mask_to_uint8(mask), [[[0, 255], [255, 0]]])


@pytest.mark.parametrize(
    "mask",
    [np.full((2, 2), 1.5), np.full((2, 2), -1), np.zeros((1, 1, 2, 2))],
    ids=["float>1", "negative", "4d"],
)
def test_bad_masks_rejected(mask: np.ndarray) -> None:
    with pytest.raises(DatasetError):
        mask_to_uint8(mask)


def test_array_source_checks_sizes_and_channels() -> None:
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    with pytest.raises(DatasetError, match="sample x: mask is 10x12, image is 12x10"):
        ArraySource([(rgb, np.zeros((12, 10), bool))], names=["x"])
    with pytest.raises(DatasetError, match="sample 1 has 2 mask channels, sample 0 has 1"):
        ArraySource([(rgb, np.zeros((10, 12), bool)), (rgb, np.zeros((2, 10, 12), bool))])
    with pytest.raises(ConfigError, match="2 channels"):
        ArraySource([(rgb, np.zeros((2, 10, 12), bool))], labels=["only"])
    src = ArraySource([(rgb, np.zeros((2, 10, 12), bool))])
    assert src.labels == ("label0", "label1")
    with pytest.raises(DatasetError, match="no samples"):
        ArraySource([])


# ----------------------------------------------------------------------------- splits


def test_split_is_seeded_disjoint_and_complete() -> None:
    tr, va = split_indices(50, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40
    assert sorted(tr + va) == list(range(50))
    assert (tr, va) == split_indices(50, 0.2, seed=3)
    assert va != split_indices(50, 0.2, seed=4)[1]
    assert split_indices(5, 0.01, 0)[1] != []  # at least one
    assert split_indices(5, 0.0, 0) == (list(range(5)), [])
    with pytest.raises(DatasetError):
        split_indices(1, 0.5)


def test_train_val_datasets(source: ArraySource) -> None:
    train, val = train_val_datasets(source, 64, 0.5, seed=1)
    assert train.train and val is not None and not val.train
    assert sorted(train.indices + val.indices) == list(range(6))
    other = ArraySource(generate(2, 32, seed=9))
    train, val = train_val_datasets(source, 64, val_source=other)
    assert len(train) == 6 and val is not None and len(val) == 2
    with pytest.raises(ConfigError, match="not both"):
        train_val_datasets(source, 64, 0.2, val_source=other)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_index_stable() -> None:
    a = generate(4, 48, seed=11)
    b = generate(4, 48, seed=11)
    c = generate(2, 48, seed=11, start=2)
    for (ra, ma), (rb, mb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(a[3][0], c[1][0])
    d = generate(4, 48, seed=12)
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, d, strict=True))


def test_synthetic_masks_are_binary_and_salient() -> None:
    for rgb, mask in generate(12, (40, 56), seed=0):
        assert rgb.shape == (40, 56, 3) and rgb.dtype == np.uint8
        assert mask.shape == (1, 40, 56) and set(np.unique(mask)) <= {0, 255}
        fg = mask[0] > 0
        assert 0.005 < fg.mean() < 0.9
        # salient: the object's colour differs clearly from the background's
        diff = np.abs(rgb[fg].mean(axis=0) - rgb[~fg].mean(axis=0)).max()
        assert diff > 30


def test_synthetic_classes_give_disjoint_per_class_masks() -> None:
    samples = generate(20, 48, seed=5, classes=SHAPE_CLASSES, max_objects=3)
    present = np.zeros(3, dtype=int)
    for _, mask in samples:
        assert mask.shape == (3, 48, 48)
        assert ((mask > 0).sum(axis=0) <= 1).all()  # a pixel belongs to one class at most
        assert (mask > 0).any()
        present += (mask > 0).any(axis=(1, 2))
    assert (present > 0).all()
    with pytest.raises(ConfigError, match="hexagon"):
        generate(1, 48, classes=["hexagon"])


def test_write_synthetic_dataset_pairs(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(tmp_path / "syn", 5, 64, seed=2)
    src = FolderSource(paths.images, paths.masks)
    assert len(src) == 5 and src.labels == ("object",)
    rgb, mask = src.raw(3)
    erg, emask = generate(1, 64, seed=2, start=3)[0]
    np.testing.assert_array_equal(rgb, erg)
    np.testing.assert_array_equal(mask, emask)
