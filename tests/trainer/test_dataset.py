"""The trainer's dataset cache (trainer.dataset) on phone photos: a brush drawn on the displayed
photo is paired with its displayed pixels, and a cache derived before EXIF orientation was
applied is derived again."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from labelstudio.codecs import brush_result, results_to_masks, rle_to_mask
from labelstudio.labelconfig import parse_label_config
from tests.labelstudio.test_exif import on_screen, stored_image
from trainer.dataset import DatasetCache

BRUSH = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Thing"/></BrushLabels>
</View>"""


class Export:
    """A project's API answers as Label Studio gives them (get_project, export_project)."""

    def __init__(self, tasks: list[dict]) -> None:
        self._tasks = tasks

    def get_project(self, project: int) -> dict:
        return {"id": project, "label_config": BRUSH}

    def export_project(self, project: int) -> list[dict]:
        return self._tasks


@pytest.mark.parametrize("orientation", [2, 3, 6, 8])
def test_trainer_pairs_a_brush_drawn_on_the_displayed_photo_with_its_displayed_pixels(
    tmp_path, orientation
):
    stored = stored_image(40, 58, seed=orientation)
    data, shown = on_screen(stored, orientation)
    h, w = shown.shape[:2]
    drawn = np.zeros((h, w), bool)
    drawn[2 : h // 3, 3 : w // 2] = True  # the annotator's stroke, top-left of the screen
    item = brush_result(drawn, parse_label_config(BRUSH), "Thing", 1.0)
    assert (item["original_height"], item["original_width"]) == (h, w)
    task = {
        "id": 7,
        "data": {"image": "http://images.example/photo.jpg"},
        "annotations": [{"id": 70, "updated_at": "2024-05-01T10:00:00Z", "result": [item]}],
    }
    cache = DatasetCache(tmp_path)
    report = cache.sync(Export([task]), 1, lambda url, base, tid: data)
    assert report.samples == 1 and report.failed == 0
    ((sample, rgb, masks),) = cache.samples(1)
    assert (sample.height, sample.width) == (h, w)
    assert rgb.shape == shown.shape and np.array_equal(rgb, shown)
    assert masks.shape == (1, h, w)
    assert np.array_equal(masks[0] > 0, drawn)
    # and what the trainer stored decodes back to the annotation
    assert np.array_equal(rle_to_mask(item["value"]["rle"], h, w), drawn)


def test_a_cache_derived_before_orientation_was_applied_is_derived_again(tmp_path, caplog):
    """A dataset cache written when images were read in their stored frame holds, for a turned
    photo, a mask in the stored frame: that sample is dropped when the cache is read and derived
    again at the next sync; samples of photos without a turn are kept as they are."""
    target = parse_label_config(BRUSH)
    cache = DatasetCache(tmp_path)
    tasks, drawn, photos = [], {}, {}
    for tid, orientation in ((1, 6), (2, 1), (3, 3)):
        data, shown = on_screen(stored_image(40, 58, seed=tid), orientation)
        h, w = shown.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[2 : h // 3, 3 : w // 2] = True
        item = brush_result(mask, target, "Thing", 1.0)
        url = f"http://images.example/{tid}.jpg"
        tasks.append(
            {
                "id": tid,
                "data": {"image": url},
                "annotations": [{"id": 10 * tid, "updated_at": "2024-05-01", "result": [item]}],
            }
        )
        drawn[tid], photos[url] = mask, data
    export = Export(tasks)
    cache.sync(export, 1, lambda url, base, tid: photos[url])
    # what the cache looked like when written in the stored frame: no frame in the manifest,
    # and each mask (and size) as read on the stored pixels
    path = cache.project_dir(1) / "manifest.json"
    old = json.loads(path.read_text())
    old.pop("frame", None)
    for key, s in old["samples"].items():
        stored = np.asarray(Image.open(io.BytesIO(photos[tasks[int(key) - 1]["data"]["image"]])))
        h, w = stored.shape[:2]
        s["height"], s["width"] = h, w
        by_label = results_to_masks(tasks[int(key) - 1]["annotations"][0]["result"], target, h, w)
        np.savez_compressed(
            cache.project_dir(1) / "masks" / s["mask"],
            masks=(by_label["Thing"].astype(np.uint8) * 255)[None],
        )
    path.write_text(json.dumps(old))

    with caplog.at_level(logging.INFO, logger="trainer.dataset"):
        for s, rgb, masks in cache.samples(1):
            assert rgb.shape[:2] == masks.shape[1:], (s.task, rgb.shape, masks.shape)
        kept = cache.load_manifest(1)
    assert sorted(kept.samples) == ["2"]  # the turned photos' samples are dropped
    assert "derived again" in caplog.text, caplog.text
    report = cache.sync(export, 1, lambda url, base, tid: photos[url])
    assert (report.samples, report.added, report.failed) == (3, 2, 0)
    for s, rgb, masks in cache.samples(1):
        assert np.array_equal(masks[0] > 0, drawn[s.task]), s.task
        orientation = {1: 6, 2: 1, 3: 3}[s.task]
        assert np.array_equal(rgb, on_screen(stored_image(40, 58, seed=s.task), orientation)[1])
    assert json.loads(path.read_text())["frame"] == "displayed"
