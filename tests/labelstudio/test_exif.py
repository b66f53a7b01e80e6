"""Phone photos: a JPEG whose EXIF Orientation tag turns it on screen is decoded in the frame
Label Studio and browsers display, wherever images are decoded (predictions, prompts, the
trainer's dataset, the train/evaluate folders; the trainer's dataset
cache: tests/trainer/test_dataset.py).

The expected frame comes from the EXIF/TIFF 6.0 definition of the tag, written here with numpy
(``displayed``), independently of the library the product uses to apply it.
"""

from __future__ import annotations

import io
import logging
import random
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from sam2unet.data import FolderSource
from sam2unet.transforms import decode_image

ORIENTATION = 0x0112

#: where the first stored pixel appears on screen, as the tag's name in the standard says
FIRST_PIXEL = {
    1: "top-left",
    2: "top-right",
    3: "bottom-right",
    4: "bottom-left",
    5: "top-left",
    6: "top-right",
    7: "bottom-right",
    8: "bottom-left",
}


def displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The image as shown on screen: the stored rows and columns placed as the tag says
    (its value names the visual side of the stored 0th row, then of the 0th column)."""
    s = stored
    return np.ascontiguousarray(
        {
            1: lambda: s,
            2: lambda: s[:, ::-1],  # row 0 at the top, column 0 on the right
            3: lambda: s[::-1, ::-1],  # bottom, right
            4: lambda: s[::-1, :],  # bottom, left
            5: lambda: s.swapaxes(0, 1),  # row 0 on the left, column 0 at the top
            6: lambda: s[::-1].swapaxes(0, 1),  # right, top (turned a quarter clockwise)
            7: lambda: s[::-1, ::-1].swapaxes(0, 1),  # right, bottom
            8: lambda: s[:, ::-1].swapaxes(0, 1),  # left, bottom (a quarter anticlockwise)
        }[orientation]()
    )


def corner(img: np.ndarray, where: str) -> np.ndarray:
    h, w = img.shape[:2]
    y = 0 if where.startswith("top") else h - 1
    x = 0 if where.endswith("left") else w - 1
    return img[y, x]


def stored_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """No symmetry: a gradient, noise, and a bright block at the stored top-left."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.stack(
        [yy * 200 // max(h, 1), xx * 200 // max(w, 1), (yy + 2 * xx) % 97], axis=-1
    ).astype(np.int32)
    img = img + rng.integers(0, 40, img.shape)
    img[: max(1, h // 4), : max(1, w // 5)] = (250, 250, 250)
    return img.clip(0, 255).astype(np.uint8)


def exif_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "PhoneMaker"  # Make: phones write more than the orientation
    return exif.tobytes()


def jpeg(stored: np.ndarray, orientation: int | None = None, exif: bytes | None = None) -> bytes:
    """A JPEG (quality 95, as a phone writes) of the stored pixels, tagged when asked."""
    buf = io.BytesIO()
    extra = {}
    if orientation is not None:
        extra["exif"] = exif_block(orientation)
    if exif is not None:
        extra["exif"] = exif
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, **extra)
    return buf.getvalue()


def png(arr: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    extra = {"exif": exif_block(orientation)} if orientation is not None else {}
    Image.fromarray(arr).save(buf, format="PNG", **extra)
    return buf.getvalue()


def on_screen(stored: np.ndarray, orientation: int) -> tuple[bytes, np.ndarray]:
    """(tagged JPEG, the pixels a browser shows for it). JPEG is lossy, but the same pixels
    encode to the same compressed data with or without the tag: the untagged file's decoded
    pixels, placed as the tag says, are exactly what the tagged file shows."""
    return jpeg(stored, orientation), displayed(decode_image(jpeg(stored)), orientation)


# --------------------------------------------------------------------------- decode_image


def test_the_expected_frame_follows_the_standard():
    """The oracle itself: the first stored pixel lands in the corner the tag names, and the
    sides swap for the tags 5 to 8."""
    img = stored_image(9, 14)
    for o, where in FIRST_PIXEL.items():
        shown = displayed(img, o)
        assert shown.shape[:2] == ((9, 14) if o <= 4 else (14, 9)), o
        assert np.array_equal(corner(shown, where), img[0, 0]), o


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_decodes_as_displayed(orientation):
    stored = stored_image(37, 53, seed=orientation)
    data, want = on_screen(stored, orientation)
    got = decode_image(data)
    assert got.shape == want.shape, (orientation, got.shape, want.shape)
    assert np.array_equal(got, want), orientation
    # and close to the original pixels as they are shown (JPEG at quality 95)
    assert np.abs(got.astype(int) - displayed(stored, orientation)).mean() < 12


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    orientation=st.integers(1, 8),
    h=st.integers(1, 41),
    w=st.integers(1, 41),
    seed=st.integers(0, 2**16),
)
def test_property_decoded_frame_is_the_displayed_one(orientation, h, w, seed):
    note(f"orientation={orientation} h={h} w={w} seed={seed}")
    stored = stored_image(h, w, seed)
    data, want = on_screen(stored, orientation)
    got = decode_image(data)
    assert got.shape == (want.shape if orientation <= 4 else (w, h, 3))
    assert np.array_equal(got, want)


def test_an_orientation_tag_on_a_png_is_applied_too():
    stored = stored_image(21, 34)
    for o in range(1, 9):
        assert np.array_equal(decode_image(png(stored, o)), displayed(stored, o)), o


def test_out_of_range_orientation_values_leave_the_stored_frame():
    stored = stored_image(12, 20)
    for value in (0, 9, 255, 65535):
        data = jpeg(stored, value)
        assert np.array_equal(decode_image(data), decode_image(jpeg(stored))), value


def corrupt_exif() -> bytes:
    """An EXIF block whose orientation reads as 6 but whose first entry (the Make text) is
    renumbered as tag 0x0120, which the standard defines as numbers: the library cannot
    rewrite the block after turning the image (one of the blocks fuzzing found)."""
    block = bytearray(exif_block(6))
    assert block[6:8] == b"MM"  # big-endian; entries follow the 8-byte header and a count
    start = 6 + 8 + 2
    assert block[start : start + 2] == (0x010F).to_bytes(2, "big")
    block[start : start + 2] = (0x0120).to_bytes(2, "big")
    return bytes(block)


def test_a_corrupt_exif_block_falls_back_to_the_stored_frame_with_a_log_line(caplog):
    stored = stored_image(19, 31)
    data = jpeg(stored, exif=corrupt_exif())
    with caplog.at_level(logging.WARNING, logger="sam2unet.transforms"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = decode_image(data)
    assert np.array_equal(got, decode_image(jpeg(stored)))
    assert "EXIF" in caplog.text and "stored frame" in caplog.text, caplog.text


@settings(max_examples=300, deadline=None)
@given(
    orientation=st.integers(1, 8),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 200)),
    seed=st.integers(0, 1000),
)
def test_property_damaged_exif_never_breaks_decoding(orientation, edits, cut, seed):
    """Any damage to the EXIF block: the pixels still decode, in some frame the standard
    defines (never an exception, never other pixels)."""
    note(f"orientation={orientation} edits={edits} cut={cut} seed={seed}")
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "PhoneMaker"
    exif[0x011A] = 72.0
    exif[0x0132] = "2024:05:01 10:00:00"
    block = bytearray(exif.tobytes())
    for at, value in edits:
        block[at % len(block)] = value
    if cut is not None:
        block = block[: cut % (len(block) + 1)]
    stored = stored_image(11 + seed % 7, 17 + seed % 5, seed)
    plain = decode_image(jpeg(stored))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns about the damage it skips
        got = decode_image(jpeg(stored, exif=bytes(block)))
    assert any(
        got.shape == displayed(plain, o).shape and np.array_equal(got, displayed(plain, o))
        for o in range(1, 9)
    )


def test_damaged_exif_blocks_found_by_fuzzing_decode():
    """A fixed sample of random damage (many of these made the library's transposition
    raise): every one decodes."""
    rnd = random.Random(1)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "Phone"
    exif[0x011A] = 72.0
    exif[0x0110] = "Model X"
    good = exif.tobytes()
    stored = stored_image(9, 13)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(400):
            block = bytearray(good)
            for _ in range(rnd.randint(1, 4)):
                block[rnd.randrange(len(block))] = rnd.randrange(256)
            assert decode_image(jpeg(stored, exif=bytes(block))).shape[:2] in ((9, 13), (13, 9))


# --------------------------------------------------------------------------- folders


def write_folder(tmp_path, orientation: int, mask_orientation: int | None = None):
    """An image folder holding one tagged phone photo, and its mask drawn on the photo as it is
    shown (so in the displayed frame). ``mask_orientation``: the mask file is instead stored in
    the photo's stored frame and carries that tag."""
    stored = stored_image(30, 44, seed=orientation)
    data, shown = on_screen(stored, orientation)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "photo.jpg").write_bytes(data)
    mask_shown = np.zeros(shown.shape[:2], np.uint8)
    mask_shown[: shown.shape[0] // 3, : shown.shape[1] // 2] = 255  # top-left of the screen
    if mask_orientation is None:
        (tmp_path / "masks" / "photo.png").write_bytes(png(mask_shown))
    else:
        # the same mask, in the stored frame: invert ``displayed`` by trying each stored layout
        h, w = stored.shape[:2]
        grid = np.arange(h * w).reshape(h, w)
        where = displayed(grid, mask_orientation)
        mask_stored = np.zeros(h * w, np.uint8)
        mask_stored[where.ravel()] = mask_shown.ravel()
        (tmp_path / "masks" / "photo.png").write_bytes(
            png(mask_stored.reshape(h, w), mask_orientation)
        )
    return shown, mask_shown


@pytest.mark.parametrize("orientation", range(1, 9))
def test_folder_images_are_read_as_displayed_and_stay_paired(tmp_path, orientation):
    shown, mask = write_folder(tmp_path, orientation)
    rgb, masks = FolderSource(tmp_path / "images", tmp_path / "masks").raw(0)
    assert np.array_equal(rgb, shown), orientation
    assert np.array_equal(masks[0], mask)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_tagged_mask_file_is_read_as_displayed_too(tmp_path, orientation):
    """A mask saved in the photo's stored frame with the photo's tag (what editors that keep
    the metadata write) shows, like the photo, turned: both are read as shown."""
    shown, mask = write_folder(tmp_path, orientation, mask_orientation=orientation)
    rgb, masks = FolderSource(tmp_path / "images", tmp_path / "masks").raw(0)
    assert np.array_equal(rgb, shown)
    assert np.array_equal(masks[0], mask)
