"""Annotations that hold smart keypoints / rectangles but no mask (submitted before the
suggestion was accepted): the trainer derives their masks with SAM2's head of the version that
served them, the mask the worker answers for the same prompts and weights, marks the samples
as derived and counts them; ``SAM2UNET_DERIVE_PROMPT_MASKS=false`` skips and counts them.

Checkpoints are official-format files with random weights (tests/support/sam2_helpers.py); the trainer
reads the project through the API answers Label Studio gives (the project and its export).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.settings import Settings
from labelstudio.codecs import brush_result, results_to_masks
from labelstudio.prompts import annotation_prompts, mask_labels, parse_context, prompt_labels
from modelstore.registry import ModelRegistry
from sam2unet.checkpoints import build_from_sam2
from sam2unet.config import ModelConfig
from sam2unet.random_weights import write_random_sam2_checkpoint
from tests.support.sam2_helpers import reference_predictor
from tests.support.services import png_bytes
from tests.worker.test_pipeline import (
    LABEL_CONFIG,
    TARGET,
    image,
    kp,
    make_runtime,
    predict,
    rect,
    reference,
)
from trainer.dataset import DatasetCache
from trainer.service import TrainerService
from worker.runtime import ModelRuntime

H, W = 37, 53
#: task id -> the annotation's result: prompts only, or prompts beside a mask
PROMPT_ONLY = {
    1: [kp(40.0, 45.0)],
    2: [rect(25.0, 15.0, 55.0, 60.0), kp(52.0, 44.0), kp(35.0, 25.0, False)],
    3: [kp(55.0, 45.0), kp(47.5, 30.0), kp(20.0, 80.0, False)],
}


class Export:
    """A project's API answers as Label Studio gives them (get_project, export_project)."""

    def __init__(self, tasks: list[dict]) -> None:
        self.tasks = tasks

    def get_project(self, project: int) -> dict:
        return {"id": project, "label_config": LABEL_CONFIG}

    def export_project(self, project: int) -> list[dict]:
        return self.tasks


def task(tid: int, result: list[dict], **annotation) -> dict:
    for item in result:
        item.update(original_width=W, original_height=H, image_rotation=0)
    ann = {"id": 100 + tid, "updated_at": f"2025-01-0{tid % 9 + 1}T10:00:00Z", "result": result}
    return {
        "id": tid,
        "data": {"image": f"http://img/{tid}.png"},
        "annotations": [ann | annotation],
    }


def images() -> dict[str, bytes]:
    return {f"http://img/{t}.png": png_bytes(image(H, W, seed=t)) for t in range(1, 10)}


def service(tmp_path, model_dir, redis_conn, tasks, **env) -> TrainerService:
    conf = Settings.from_env(
        {"SAM2UNET_MODEL_SIZE": "test", "SAM2UNET_IMAGE_SIZE": "64", "SAM2UNET_DEVICE": "cpu",
         "MODEL_DIR": str(model_dir), "SAM2UNET_DATA_DIR": str(tmp_path / "data"), **env}
    )  # fmt: skip
    data = images()
    return TrainerService(conf, redis_conn, Export(tasks), lambda url, base, tid=None: data[url])


def worker_masks(rt: ModelRuntime, tid: int, items: list[dict]) -> np.ndarray:
    """The worker's answer to ``items`` as an interactive call, decoded: K x H x W bool."""
    res = predict(rt, image(H, W, seed=tid), {"result": [dict(i) for i in items]})
    by_label = results_to_masks(res.result, TARGET, H, W)
    return np.stack([by_label.get(lab, np.zeros((H, W), bool)) for lab in TARGET.labels])


@pytest.fixture
def official_dir(tmp_path):
    model_dir = tmp_path / "models"
    sam2 = write_random_sam2_checkpoint(model_dir / "base" / "sam2.1_hiera_test.pt", "test")
    rt = make_runtime(model_dir, "test")
    return model_dir, sam2, rt


def test_prompt_only_annotations_train_on_the_workers_masks(
    tmp_path, official_dir, redis_conn, caplog
):
    model_dir, sam2, rt = official_dir
    v1 = rt.version
    expected = {t: worker_masks(rt, t, items) for t, items in PROMPT_ONLY.items()}
    assert all(m[0].any() for m in expected.values())  # SAM2 gives each a mask
    # and the worker's masks are SAM2's own predictor's on the same weights
    ref = reference_predictor(sam2, "test")
    ref.set_image(image(H, W, seed=1))
    ((logits, _),) = reference(ref, [(PROMPT_ONLY[1], None)], H, W)
    assert np.array_equal(expected[1][0], logits > 0)

    brush = np.zeros((H, W), bool)
    brush[5:20, 10:30] = True
    tasks = [task(t, [dict(i) for i in items]) for t, items in PROMPT_ONLY.items()]
    tasks[0]["annotations"][0]["prediction"] = {"model_version": f"{v1}/untrained"}
    tasks += [
        # a mask of the label beside the prompts: nothing is derived, the mask is the sample's
        task(4, [brush_result(brush, TARGET, "Foreground", 1.0), kp(40.0, 45.0)]),
        # a lone negative click: nothing to derive, not used
        task(5, [kp(40.0, 45.0, False)]),
    ]
    caplog.set_level(logging.INFO)
    svc = service(tmp_path, model_dir, redis_conn, tasks)
    labels, samples, _ = svc.training_set(1)
    assert labels == ["Foreground", "Background"]
    by_task = {t: m for t, _, m in samples}
    for t in PROMPT_ONLY:
        assert np.array_equal(by_task[t] > 0, expected[t]), t
    manifest = svc.cache.load_manifest(1)
    assert sorted(manifest.samples) == ["1", "2", "3", "4"]
    report = svc.last_sync
    assert report.prompts == {"derived": 3, "derived_now": 3, "skipped": 1, "enabled": True}
    for t in PROMPT_ONLY:
        assert manifest.samples[str(t)].derived == {"version": v1, "labels": ["Foreground"]}
        assert manifest.samples[str(t)].labels_present == ["Foreground"]
    assert manifest.samples["4"].derived is None
    assert np.array_equal(by_task[4][0] > 0, brush) and not by_task[4][1].any()
    assert "negative clicks only" in caplog.text and "annotation not used" in caplog.text
    assert "no positive point and no rectangle" in caplog.text

    # deterministic: another trainer on its own cache derives the same masks, byte for byte
    again = service(tmp_path / "again", model_dir, redis_conn, tasks)
    _, samples2, _ = again.training_set(1)
    assert all(np.array_equal(by_task[t], m) for t, _, m in samples2)
    # an unchanged annotation is not derived again
    svc.training_set(1)
    assert svc.last_sync.prompts == {"derived": 3, "derived_now": 0, "skipped": 1, "enabled": True}


def test_the_version_that_served_the_prompts_answers_them(tmp_path, official_dir, redis_conn):
    """A second version on another official base becomes current: an annotation that started
    from the first version's prediction gets the first version's mask, one without a
    prediction the current version's; the two heads answer differently."""
    model_dir, _, rt = official_dir
    v1 = rt.version
    items = PROMPT_ONLY[2]
    first = worker_masks(rt, 2, items)
    other = write_random_sam2_checkpoint(
        model_dir / "base" / "sam2.1_hiera_test_b.pt", "test", seed=5
    )
    del other
    registry = ModelRegistry(model_dir, None)
    loaded = build_from_sam2(
        model_dir / "base" / "sam2.1_hiera_test_b.pt", ModelConfig(size="test", image_size=64)
    )
    v2 = registry.create_version(
        loaded.model, loaded.config, loaded.base, parent=v1, decoder_trained=False
    ).name
    registry.promote(v2)
    rt2 = ModelRuntime(rt.settings, registry)
    rt2.ensure_current()
    assert rt2.version == v2 and rt2.prompt_head == "sam2"
    second = worker_masks(rt2, 2, items)
    assert not np.array_equal(first, second)

    served = task(1, [dict(i) for i in items], parent_prediction=7)
    served["predictions"] = [{"id": 7, "model_version": v1, "result": []}]
    served["data"]["image"] = "http://img/2.png"
    current = task(2, [dict(i) for i in items])
    svc = service(tmp_path, model_dir, redis_conn, [served, current])
    _, samples, _ = svc.training_set(1)
    by_task = {t: m > 0 for t, _, m in samples}
    assert np.array_equal(by_task[1], first) and np.array_equal(by_task[2], second)
    manifest = svc.cache.load_manifest(1)
    assert manifest.samples["1"].derived["version"] == v1
    assert manifest.samples["2"].derived["version"] == v2


def test_setting_off_skips_and_counts_them_and_on_again_derives_them(
    tmp_path, official_dir, redis_conn, caplog
):
    model_dir, _, _ = official_dir
    brush = np.zeros((H, W), bool)
    brush[5:20, 10:30] = True
    tasks = [task(t, [dict(i) for i in items]) for t, items in PROMPT_ONLY.items()]
    tasks.append(task(4, [brush_result(brush, TARGET, "Foreground", 1.0), kp(40.0, 45.0)]))
    # a mask of one label, prompts of another: not used either (its Background would be empty)
    tasks.append(task(5, [brush_result(brush, TARGET, "Background", 1.0), kp(40.0, 45.0)]))
    caplog.set_level(logging.INFO)
    off = service(tmp_path, model_dir, redis_conn, tasks, SAM2UNET_DERIVE_PROMPT_MASKS="false")
    _, samples, _ = off.training_set(1)
    assert [t for t, _, _ in samples] == [4]
    assert off.last_sync.prompts == {
        "derived": 0, "derived_now": 0, "skipped": 4, "enabled": False
    }  # fmt: skip
    assert "4 annotation(s) hold smart keypoints/rectangles but no mask" in caplog.text
    assert "SAM2UNET_DERIVE_PROMPT_MASKS=false" in caplog.text

    # on: the same cache; the skipped annotations are derived at the next sync
    on = service(tmp_path, model_dir, redis_conn, tasks)
    _, samples, _ = on.training_set(1)
    assert [t for t, _, _ in samples] == [1, 2, 3, 4, 5]
    assert on.last_sync.prompts == {"derived": 4, "derived_now": 4, "skipped": 0, "enabled": True}
    # off again: the derived samples leave the training set
    off = service(tmp_path, model_dir, redis_conn, tasks, SAM2UNET_DERIVE_PROMPT_MASKS="false")
    _, samples, _ = off.training_set(1)
    assert [t for t, _, _ in samples] == [4] and off.last_sync.prompts["skipped"] == 4


def test_a_cache_made_before_masks_were_derived_is_derived_again(
    tmp_path, official_dir, redis_conn
):
    """A sample stored with no mask at all for an annotation holding prompts (how such
    annotations were read before) is derived again though the annotation did not change."""
    model_dir, _, rt = official_dir
    tasks = [task(1, [dict(i) for i in PROMPT_ONLY[1]])]
    old = DatasetCache(tmp_path / "data", derive_prompt_masks=False)
    old._prompts_to_derive = lambda task, ann, target: ([], set(), None)  # as before
    old.sync(Export(tasks), 1, lambda url, base, tid=None: images()[url])
    (sample,) = old.load_manifest(1).samples.values()
    assert sample.labels_present == [] and sample.derived is None
    svc = service(tmp_path, model_dir, redis_conn, tasks)
    _, samples, _ = svc.training_set(1)
    assert svc.last_sync.prompts["derived_now"] == 1
    assert np.array_equal(samples[0][2] > 0, worker_masks(rt, 1, PROMPT_ONLY[1]))


def test_a_version_answering_by_crop_derives_nothing(tmp_path, model_dir, redis_conn, caplog):
    """The session's versions have a random trunk (no SAM2 head): no mask is derived, the
    annotation is not used and is counted."""
    tasks = [task(1, [dict(i) for i in PROMPT_ONLY[2]])]
    caplog.set_level(logging.INFO)
    svc = service(tmp_path, model_dir, redis_conn, tasks)
    _, samples, _ = svc.training_set(1)
    assert samples == [] and svc.last_sync.prompts["skipped"] == 1
    assert "crop-and-segment" in caplog.text


def test_a_task_model_with_an_official_trunk_derives_the_workers_mask(tmp_path, redis_conn):
    """A version made from released SAM2-UNet weights whose trunk is an official checkpoint's:
    the worker answers its prompts with that checkpoint's head, and so does the trainer."""
    from tests.worker.test_task_model_prompts import _released_version

    model_dir = tmp_path / "models"
    write_random_sam2_checkpoint(model_dir / "base" / "sam2.1_hiera_test.pt", "test")
    rt = _released_version(model_dir, model_dir / "base" / "sam2.1_hiera_test.pt")
    assert rt.prompt_head == "sam2"
    want = worker_masks(rt, 2, PROMPT_ONLY[2])
    svc = service(tmp_path, model_dir, redis_conn, [task(2, [dict(i) for i in PROMPT_ONLY[2]])])
    _, samples, _ = svc.training_set(1)
    assert np.array_equal(samples[0][2] > 0, want) and want[0].any()
    assert svc.cache.load_manifest(1).samples["2"].derived["version"] == rt.version


def test_without_any_version_masks_are_used_and_prompts_only_skipped(tmp_path, redis_conn, caplog):
    """No model version yet: an annotation with its mask beside the prompts is used as it is;
    one with prompts only is skipped, with the reason."""
    brush = np.zeros((H, W), bool)
    brush[5:20, 10:30] = True
    tasks = [
        task(1, [brush_result(brush, TARGET, "Foreground", 1.0), kp(40.0, 45.0)]),
        task(2, [dict(i) for i in PROMPT_ONLY[1]]),
    ]
    caplog.set_level(logging.INFO)
    svc = service(tmp_path, tmp_path / "empty-models", redis_conn, tasks)
    _, samples, _ = svc.training_set(1)
    assert [t for t, _, _ in samples] == [1] and np.array_equal(samples[0][2][0] > 0, brush)
    assert svc.last_sync.prompts["skipped"] == 1
    assert "no model version to answer its prompts" in caplog.text


# --------------------------------------------------------------------------- properties

LABELS = ["Foreground", "Background", "Other", None]
coord = st.one_of(st.floats(-20, 130), st.sampled_from([float("nan"), float("inf"), "1", None]))


@st.composite
def items(draw):
    kind = draw(st.sampled_from(["keypointlabels", "rectanglelabels", "keypoint", "brushlabels",
                                 "choices", 3]))  # fmt: skip
    label = draw(st.sampled_from(LABELS))
    value = {"x": draw(coord), "y": draw(coord)}
    if kind in ("rectanglelabels", "brushlabels"):
        value |= {"width": draw(coord), "height": draw(coord)}
    if label is not None and isinstance(kind, str):
        value[kind] = [label]
    item = {"type": kind, "value": value, "to_name": draw(st.sampled_from(["image", "other"]))}
    item["from_name"] = {
        "keypointlabels": "kp",
        "rectanglelabels": "rect",
        "brushlabels": "tag",
    }.get(kind, draw(st.sampled_from(["kp", "x"])))
    if draw(st.booleans()):
        item["is_positive"] = draw(st.sampled_from([True, False, None, "yes"]))
    if kind == "brushlabels":
        item |= brush_result(np.ones((4, 6), bool), TARGET, "Foreground", 1.0)
        item["value"]["brushlabels"] = [label or "Foreground"]
    return item


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(items(), max_size=6))
def test_without_masks_derived_no_sample_holds_a_prompted_label_it_has_no_mask_of(tmp_path, result):
    """Any annotation result: the sync never fails; with derivation off, an annotation whose
    prompts name a label it holds no mask of never becomes a sample (it is counted instead),
    and parsing the prompts either gives points and boxes or a clear BadRequest."""
    from contracts.errors import BadRequest

    prompts = annotation_prompts(result, TARGET)
    try:
        parsed = parse_context({"result": prompts}, H, W, TARGET.to_name)
    except BadRequest as e:
        assert "interactive prompt" in e.message
    else:
        assert all(0 <= p.x <= W and 0 <= p.y <= H for p in parsed.points)
    wanted = prompt_labels(prompts, TARGET, list(enumerate(TARGET.labels))) - mask_labels(
        result, TARGET
    )
    assert wanted <= set(TARGET.labels)
    tid = abs(hash(repr(result))) % 10**6
    cache = DatasetCache(tmp_path / str(tid), derive_prompt_masks=False)
    data = png_bytes(np.zeros((4, 6, 3), np.uint8))
    t = {"id": 1, "data": {"image": "http://img/x.png"},
         "annotations": [{"id": 1, "updated_at": "2025-01-01", "result": result}]}  # fmt: skip
    report = cache.sync(Export([t]), 1, lambda url, base, tid=None: data)
    if wanted:
        assert report.samples == 0 and report.prompts["skipped"] == 1
    else:
        assert report.prompts["skipped"] == 0
        assert report.samples + report.failed == 1
