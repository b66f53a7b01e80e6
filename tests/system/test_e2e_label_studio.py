"""End to end with a real Label Studio 1.23.2 (own venv, loopback): our backend under gunicorn,
a worker and the trainer as real processes on a real Redis.

Label Studio is told about the backend, retrieves predictions for uploaded images and stores them
with our model version and score; annotations made through its API and "Start training" lead to a
new, promoted version whose predictions Label Studio then holds; a whole project is pre-annotated
through the asynchronous path with exactly one prediction of the current version per task.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from labelstudio.codecs import brush_result
from labelstudio.labelconfig import parse_label_config
from launcher.redis_server import free_port
from tests.support.lstudio import running_label_studio
from tests.support.services import (
    ServiceProcess,
    backend_process,
    fresh_redis_db,
    label_studio_env,
    png_bytes,
)

pytestmark = pytest.mark.e2e

BRUSH = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Circle" background="#FF0000"/>
  </BrushLabels>
</View>"""
AUTH = ("ls-backend", "b4ckend-pass")


def circle_sample(seed: int, h: int = 80, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 70 + 90).astype(np.uint8)
    cy, cx = rng.integers(25, h - 25), rng.integers(25, w - 25)
    r = rng.integers(12, 22)
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    img[mask] = (215, 40, 35)
    return img, mask


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, redis_server, model_dir):
    """Label Studio, plus our backend, one worker and the trainer, on a copy of the test-size
    model registry (its current version was trained on synthetic shapes)."""
    import shutil

    root = tmp_path_factory.mktemp("e2e")
    shutil.copytree(model_dir, root / "models")
    model_dir = root / "models"
    redis_url, _ = fresh_redis_db(redis_server, 11)
    with running_label_studio(root / "ls") as ls:
        port = free_port()
        env = label_studio_env(
            redis_url,
            model_dir,
            ls,
            AUTH,
            SAM2UNET_TRAIN_DEBOUNCE="0.5",
            SAM2UNET_TRAIN_MIN_NEW="1000",
            SAM2UNET_TRAIN_EPOCHS="8",
            SAM2UNET_TRAIN_BATCH_SIZE="4",
            SAM2UNET_TRAIN_HOLDOUT="0.25",
            SAM2UNET_TRAIN_MIN_SAMPLES="4",
        )
        logs = root / "logs"
        logs.mkdir()
        backend = backend_process(env, port, logs)
        worker = ServiceProcess(["worker", "--name", "e2e-worker"], env, "worker", logs)
        trainer = ServiceProcess(["trainer"], env, "trainer", logs)
        try:
            backend.wait_http(f"http://127.0.0.1:{port}/health")
            worker.wait_log("worker ready", timeout=120)
            trainer.wait_log("listening for webhook events", timeout=120)
            yield {
                "ls": ls,
                "url": f"http://127.0.0.1:{port}",
                "backend": backend,
                "worker": worker,
                "trainer": trainer,
                "redis_url": redis_url,
                "model_dir": model_dir,
            }
        finally:
            for p in (trainer, worker, backend):
                p.stop()


def backend_get(e2e, path: str) -> dict:
    r = requests.get(e2e["url"] + path, auth=AUTH, timeout=10)
    r.raise_for_status()
    return r.json()


def our_predictions(ls, task_id: int) -> list[dict]:
    return [
        p
        for p in ls.predictions(task_id)
        if str(p.get("model_version", "")).startswith("sam2unet-")
    ]


def test_label_studio_retrieves_and_stores_our_predictions(e2e):
    ls = e2e["ls"]
    project = ls.create_project(BRUSH, title="e2e predictions")
    ids = ls.import_images(
        project, [(f"c{i}.png", png_bytes(circle_sample(i)[0])) for i in range(3)]
    )
    ml = ls.add_ml_backend(project, e2e["url"], basic_auth=AUTH)
    assert ml.get("state") in ("CO", "CONNECTED", None) or ml.get("id"), ml
    version = backend_get(e2e, "/versions")["current"]
    ls.retrieve_predictions(project)
    for tid in ids:
        preds = wait_until(lambda t=tid: our_predictions(ls, t), 60, f"predictions of task {tid}")
        assert len(preds) == 1
        p = preds[0]
        assert p["model_version"] == version
        assert isinstance(p["score"], float) and 0 <= p["score"] <= 1
        assert p["result"][0]["type"] == "brushlabels"
        assert p["result"][0]["value"]["brushlabels"] == ["Circle"]


def test_annotations_and_start_training_promote_a_new_version(e2e):
    ls = e2e["ls"]
    project = ls.create_project(BRUSH, title="e2e training")
    samples = [circle_sample(100 + i) for i in range(10)]
    ids = ls.import_images(
        project, [(f"t{i}.png", png_bytes(img)) for i, (img, _) in enumerate(samples)]
    )
    ml = ls.add_ml_backend(project, e2e["url"], basic_auth=AUTH)
    before = backend_get(e2e, "/versions")["current"]
    target = parse_label_config(BRUSH)
    annotated = ids[:8]
    for tid, (_, mask) in zip(annotated, samples[:8], strict=False):
        item = brush_result(mask, target, "Circle", 1.0)
        item.pop("score", None)
        ls.annotate(tid, [item])
    r = ls.api("POST", f"/api/ml/{ml['id']}/train", json={})
    assert r.status_code in (200, 201), r.text
    trainer = e2e["trainer"]
    trainer.wait_log(f"round for project {project}: promoted", timeout=300)
    after = backend_get(e2e, "/versions")
    assert after["current"] != before
    details = {d["version"]: d for d in after["details"]}
    new = details[after["current"]]
    assert new["parent"] == before and new["train_size"] >= 4 and new["val_size"] >= 1
    assert new["metrics"]["miou"] >= new["parent_metrics"]["miou"]
    # setup reports the new version, and active learning stores new predictions with it
    setup = requests.post(
        e2e["url"] + "/setup",
        json={"schema": BRUSH, "project": f"{project}.1"},
        auth=AUTH,
        timeout=5,
    ).json()
    assert setup["model_version"] == after["current"]
    for tid in ids[8:]:
        wait_until(
            lambda t=tid: [
                p for p in our_predictions(ls, t) if p["model_version"] == after["current"]
            ],
            120,
            f"active-learning prediction of task {tid}",
        )


def finished_run(e2e, body: dict, timeout: float) -> dict:
    """Start a pre-annotation run (``POST /preannotate`` with ``body``: 202) and return its
    status once it stopped running."""
    r = requests.post(e2e["url"] + "/preannotate", json=body, auth=AUTH, timeout=10)
    assert r.status_code == 202, r.text
    run = r.json()["id"]
    return wait_until(
        lambda: (s := backend_get(e2e, f"/preannotate/{run}"))["status"] != "running" and s,
        timeout,
        f"pre-annotation run {run} to finish",
        interval=1.0,
    )


def test_whole_project_preannotated_through_the_async_path(e2e):
    ls = e2e["ls"]
    project = ls.create_project(BRUSH, title="e2e bulk")
    n = 40
    ids = ls.import_images(
        project, [(f"b{i}.png", png_bytes(circle_sample(500 + i)[0])) for i in range(n)]
    )
    st = finished_run(e2e, {"project": project, "page_size": 15}, 300)
    assert st["status"] == "completed", st
    assert st["done"] == n and st["failed"] == 0 and st["total"] == n
    version = backend_get(e2e, "/versions")["current"]
    for tid in ids:
        preds = [p for p in our_predictions(ls, tid) if p["model_version"] == version]
        assert len(preds) == 1, (tid, preds)
    # a second run finds nothing left to do
    st2 = finished_run(e2e, {"project": project}, 120)
    assert st2["skipped"] == n and st2["done"] == 0
    for tid in ids[:5]:
        assert len([p for p in our_predictions(ls, tid) if p["model_version"] == version]) == 1


def test_predict_past_the_deadline_answers_in_time_and_writes_the_rest_back(e2e, tmp_path):
    """A /predict too large for the deadline: what is done is answered, the rest is computed in
    the background and written to Label Studio, so every task ends with exactly one prediction
    of the current version."""
    ls = e2e["ls"]
    port = free_port()
    env = label_studio_env(
        e2e["redis_url"],
        e2e["model_dir"],
        ls,
        SAM2UNET_PREDICT_DEADLINE="0.3",
        SAM2UNET_BATCH_SIZE="2",
    )
    quick = ServiceProcess(
        ["backend", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env,
        "quick",
        tmp_path,
    )
    try:
        quick.wait_http(f"http://127.0.0.1:{port}/health")
        project = ls.create_project(BRUSH, title="e2e deadline")
        n = 30
        ids = ls.import_images(
            project, [(f"d{i}.png", png_bytes(circle_sample(900 + i)[0])) for i in range(n)]
        )
        ls.add_ml_backend(project, f"http://127.0.0.1:{port}")
        version = backend_get(e2e, "/versions")["current"]
        ls.retrieve_predictions(project)
        quick.wait_log("not finished within", timeout=30)
        for tid in ids:
            preds = wait_until(
                lambda t=tid: [p for p in our_predictions(ls, t) if p["model_version"] == version],
                120,
                f"a prediction of task {tid}",
            )
            assert len(preds) == 1, (tid, preds)
            assert preds[0]["result"], tid
        time.sleep(2)  # nothing arrives twice
        for tid in ids:
            assert len([p for p in our_predictions(ls, tid) if p["model_version"] == version]) == 1
    finally:
        quick.stop()


def test_a_task_without_an_image_counts_as_failed_and_the_run_points_the_project(e2e):
    """A run over a project with one task whose image field is empty: that task is counted
    failed and never queued, the others are predicted, and the finished run points the project
    at the version it wrote."""
    ls = e2e["ls"]
    project = ls.create_project(BRUSH, title="e2e task without image")
    ids = ls.import_images(
        project, [(f"n{i}.png", png_bytes(circle_sample(700 + i)[0])) for i in range(2)]
    )
    (empty,) = ls.import_tasks(project, [{"data": {"image": ""}}])
    st = finished_run(e2e, {"project": project}, 120)
    assert st["status"] == "completed", st
    assert (st["done"], st["failed"], st["total"], st["queued"]) == (2, 1, 3, 2), st
    version = backend_get(e2e, "/versions")["current"]
    for tid in ids:
        assert [p for p in our_predictions(ls, tid) if p["model_version"] == version], tid
    assert our_predictions(ls, empty) == []
    wait_until(
        lambda: ls.api("GET", f"/api/projects/{project}").json().get("model_version") == version,
        30,
        "the project pointed at the run's version",
    )
