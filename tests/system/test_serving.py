"""The serving path against real components: a real Redis server, real worker processes running
the test-size model, and the Flask app; image URLs are served from loopback."""

from __future__ import annotations

import base64
import copy
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from backend.app import create_app
from contracts.events import EVENTS_STREAM
from contracts.settings import Settings
from labelstudio.codecs import polygons_to_mask, rle_to_mask
from modelstore.registry import ModelRegistry
from tests.support.protocol import fixture, red_circle
from tests.support.services import (
    LabelStudioLikeFiles,
    fresh_redis_db,
    png_bytes,
    service_env,
    workers,
)


@pytest.fixture(scope="module")
def stack(redis_server, model_dir, tmp_path_factory):
    """Two real workers on a Redis database of their own, and Label Studio-like image paths."""
    url, conn = fresh_redis_db(redis_server, 14)
    root = tmp_path_factory.mktemp("ls-files")
    files = LabelStudioLikeFiles(root)
    # the files the captured requests refer to
    for i, rel in enumerate(
        [
            "upload/1/006a6f72-red_circle.png",
            "upload/2/98ad98eb-red_circle.png",
            "local/e2e_imgs/local_red_circle.png",
        ]
    ):
        files.add(rel, png_bytes(red_circle(seed=i)))
    for task in (
        fixture("post_predict_batch.json")["json"]["tasks"]
        + fixture("post_predict_batch_polygon.json")["json"]["tasks"]
    ):
        ref = task["data"]["image"]
        if ref.startswith("/data/upload/"):
            files.add(
                "upload/" + ref[len("/data/upload/") :], png_bytes(red_circle(seed=task["id"]))
            )
    env = service_env(url, model_dir)
    log_dir = tmp_path_factory.mktemp("worker-logs")
    with workers(env, conn, 2, log_dir) as procs:
        settings = Settings.from_env(env)
        yield {"url": url, "conn": conn, "files": files, "workers": procs, "settings": settings}
    files.close()
    conn.flushdb()


def make_client(stack, **overrides):
    settings = stack["settings"].with_(**overrides)
    app = create_app(settings, redis.Redis.from_url(stack["url"]))
    return app.test_client()


def replay(client, name: str, hostname: str | None = None, auth: str | None = None):
    req = copy.deepcopy(fixture(name))
    body = req["json"]
    if hostname and isinstance(body, dict) and "hostname" in body:
        body["hostname"] = hostname
    headers = {"Authorization": auth} if auth else {}
    if req["method"] == "GET":
        return client.get(req["path"], headers=headers)
    return client.post(req["path"], json=body, headers=headers)


def expected_masks(model_dir: Path, version: str, images: list[np.ndarray]) -> list[np.ndarray]:
    """What the model computes for these images, in this process, independently of the service."""
    from sam2unet.predictor import Predictor

    loaded = ModelRegistry(model_dir, None).load(version)
    pred = Predictor(loaded.model, loaded.config, device="cpu")
    return [p[0] >= 0.5 for p in pred.predict(images)]


def test_replay_every_captured_request(stack):
    client = make_client(stack)
    files = stack["files"]
    for name in ("post_setup.json", "post_setup_polygon.json"):
        r = replay(client, name, hostname=files.url)
        assert r.status_code == 200, r.get_json()
        version = r.get_json()["model_version"]
        assert version.startswith("sam2unet-test-v")
    r = replay(client, "get_health.json")
    assert r.status_code == 200
    health = r.get_json()
    assert health["status"] == "UP" and health["workers"] >= 2
    assert health["model_version"] == version
    r = replay(client, "get_versions.json")
    assert version in r.get_json()["versions"]
    for name in (
        "post_predict_single.json",
        "post_predict_batch.json",
        "post_predict_batch_polygon.json",
        "post_predict_interactive.json",
    ):
        body = fixture(name)["json"]
        r = replay(client, name)
        assert r.status_code == 200, (name, r.get_json())
        results = r.get_json()["results"]
        assert len(results) == len(body["tasks"]), name
        for res in results:
            assert res["model_version"] == version, (name, res)
            assert isinstance(res["score"], float) and 0.0 <= res["score"] <= 1.0
    for name in (
        "post_webhook_annotation_created.json",
        "post_webhook_annotation_created_polygon.json",
        "post_webhook_annotation_updated.json",
        "post_webhook_annotations_deleted.json",
        "post_webhook_start_training.json",
        "post_webhook_start_training_polygon.json",
    ):
        r = replay(client, name)
        assert r.status_code == 200, (name, r.get_json())
        assert r.get_json()["status"] == "recorded"
    events = stack["conn"].xrange(EVENTS_STREAM)
    actions = [e[1][b"action"].decode() for e in events]
    assert actions.count("START_TRAINING") == 2 and "ANNOTATIONS_DELETED" in actions


def test_brush_and_polygon_results_decode_back_to_the_predicted_mask(stack, model_dir):
    client = make_client(stack)
    files = stack["files"]
    images = [red_circle(57, 83, seed=10), red_circle(120, 70, seed=11)]
    refs = [files.add(f"upload/9/rt{i}.png", png_bytes(im)) for i, im in enumerate(images)]
    tasks = [{"id": 100 + i, "data": {"image": f"{files.url}/{r}"}} for i, r in enumerate(refs)]
    version = ModelRegistry(model_dir, stack["conn"]).current()
    expected = expected_masks(model_dir, version, images)
    assert all(m.any() and not m.all() for m in expected), "test needs non-trivial masks"

    brush_cfg = fixture("post_setup.json")["json"]["schema"]
    r = client.post("/predict", json={"tasks": tasks, "label_config": brush_cfg, "project": "1.1"})
    results = r.get_json()["results"]
    for res, im, exp in zip(results, images, expected, strict=True):
        (item,) = res["result"]
        assert item["type"] == "brushlabels" and item["from_name"] == "tag"
        assert (item["original_height"], item["original_width"]) == im.shape[:2]
        assert item["value"]["brushlabels"] == ["Foreground"]
        mask = rle_to_mask(item["value"]["rle"], *im.shape[:2])
        assert np.array_equal(mask, exp)

    poly_cfg = fixture("post_setup_polygon.json")["json"]["schema"]
    r = client.post("/predict", json={"tasks": tasks, "label_config": poly_cfg})
    results = r.get_json()["results"]
    for res, im, exp in zip(results, images, expected, strict=True):
        assert res["result"] and all(i["type"] == "polygonlabels" for i in res["result"])
        polys = [i["value"]["points"] for i in res["result"]]
        mask = polygons_to_mask(polys, *im.shape[:2])
        iou = (mask & exp).sum() / (mask | exp).sum()
        assert iou > 0.9, iou


def test_one_result_per_task_in_order_with_bad_tasks_in_the_middle(stack):
    client = make_client(stack)
    files = stack["files"]
    good = [
        files.add(f"upload/7/good{i}.png", png_bytes(red_circle(seed=20 + i))) for i in range(3)
    ]
    files.add("upload/7/corrupt.png", b"\x89PNG\r\n\x1a\nnot really a png")
    files.add("upload/7/empty.png", b"")
    tasks = [
        {"id": 1, "data": {"image": f"{files.url}/{good[0]}"}},
        {"id": 2, "data": {"image": f"{files.url}/upload/7/missing.png"}},
        {"id": 3, "data": {"image": f"{files.url}/upload/7/corrupt.png"}},
        {"id": 4, "data": {"image": f"{files.url}/{good[1]}"}},
        {"id": 5, "data": {"other": "x"}},
        {"id": 6, "data": {"image": f"{files.url}/upload/7/empty.png"}},
        {"id": 7, "data": {"image": "http://10.255.255.1/private.png"}},
        {"id": 8, "data": {"image": f"{files.url}/{good[2]}"}},
    ]
    cfg = fixture("post_setup.json")["json"]["schema"]
    t0 = time.monotonic()
    r = client.post("/predict", json={"tasks": tasks, "label_config": cfg})
    assert time.monotonic() - t0 < 30
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    ok = [bool(res["result"]) for res in results]
    assert ok == [True, False, False, True, False, False, False, True]
    good_version = results[0]["model_version"]
    for res, fine in zip(results, ok, strict=True):
        if not fine:
            assert res["model_version"] == good_version + "/failed"


def test_basic_auth_on_and_off(stack):
    creds = {"basic_auth_user": "ls", "basic_auth_pass": "s3cret"}
    client = make_client(stack, **creds)
    good = "Basic " + base64.b64encode(b"ls:s3cret").decode()
    bad = "Basic " + base64.b64encode(b"ls:wrong").decode()
    assert replay(client, "get_health.json").status_code == 200  # health is open
    r = replay(client, "post_setup.json")
    assert r.status_code == 401 and r.get_json()["error"] == "unauthorized"
    assert "WWW-Authenticate" in r.headers
    assert replay(client, "post_setup.json", auth=bad).status_code == 401
    assert replay(client, "post_setup.json", auth=good).status_code == 200
    assert replay(client, "get_versions.json").status_code == 401
    # annotation webhooks come without auth; START_TRAINING comes with it
    assert replay(client, "post_webhook_annotation_created.json").status_code == 200
    assert replay(client, "post_webhook_start_training.json").status_code == 401
    assert replay(client, "post_webhook_start_training.json", auth=good).status_code == 200
    open_client = make_client(stack)
    assert replay(open_client, "post_setup.json").status_code == 200


def test_same_image_twice_runs_the_model_once(stack):
    client = make_client(stack)
    files = stack["files"]
    ref = files.add("upload/8/twice.png", png_bytes(red_circle(seed=99)))
    cfg = fixture("post_setup.json")["json"]["schema"]
    body = {"tasks": [{"id": 1, "data": {"image": f"{files.url}/{ref}"}}], "label_config": cfg}
    conn = stack["conn"]
    before = set(conn.keys("sam2unet:cache:*"))
    first = client.post("/predict", json=body).get_json()["results"][0]
    added = set(conn.keys("sam2unet:cache:*")) - before
    assert len(added) == 1
    second = client.post("/predict", json=body).get_json()["results"][0]
    assert set(conn.keys("sam2unet:cache:*")) - before == added
    assert first["result"][0]["value"]["rle"] == second["result"][0]["value"]["rle"]
    assert first["result"][0]["id"] != second["result"][0]["id"]
    logs = "".join(w.log() for w in stack["workers"])
    assert "1 items (1 cached" in logs


def test_bad_requests_get_clear_json_errors(stack):
    client = make_client(stack)
    r = client.post("/predict", data="not json", content_type="application/json")
    assert r.status_code == 400 and "JSON" in r.get_json()["message"]
    r = client.post("/predict", json={"tasks": "x", "label_config": "<View/>"})
    assert r.status_code == 400
    r = client.post(
        "/predict", json={"tasks": [], "label_config": "<View><Image name='i' value='$i'/></View>"}
    )
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_label_config"
    r = client.post("/setup", json={"project": "1.2"})
    assert r.status_code == 400 and "schema" in r.get_json()["message"]
    r = client.post("/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 1}})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    r = client.post("/webhook", json=[1, 2])
    assert r.status_code == 400
    r = client.get("/nope")
    assert r.status_code == 404 and r.get_json()["error"] == "not_found"
    assert "Traceback" not in r.get_data(as_text=True)


def test_redis_down_gives_503_json_quickly(model_dir):
    from launcher.redis_server import free_port

    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", model_dir=model_dir)
    client = create_app(settings).test_client()
    cfg = fixture("post_setup.json")["json"]["schema"]
    for call in (
        lambda: client.get("/health"),
        lambda: client.post("/setup", json={"schema": cfg, "project": "1.1"}),
        lambda: client.post(
            "/predict",
            json={"tasks": [{"id": 1, "data": {"image": "/x.png"}}], "label_config": cfg},
        ),
        lambda: client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}),
    ):
        t0 = time.monotonic()
        r = call()
        assert time.monotonic() - t0 < 5
        assert r.status_code == 503, r.get_data(as_text=True)
        assert r.get_json()["error"] == "redis_unavailable"


def test_workers_reload_a_promoted_version_between_jobs(redis_server, model_dir, tmp_path):
    import torch

    url, conn = fresh_redis_db(redis_server, 13)
    mdir = tmp_path / "models"
    shutil.copytree(model_dir, mdir)
    root = tmp_path / "files"
    files = LabelStudioLikeFiles(root)
    ref = files.add("upload/1/a.png", png_bytes(red_circle(seed=5)))
    env = service_env(url, mdir)
    settings = Settings.from_env(env)
    client = create_app(settings, conn).test_client()
    cfg = fixture("post_setup.json")["json"]["schema"]
    body = {"tasks": [{"id": 1, "data": {"image": f"{files.url}/{ref}"}}], "label_config": cfg}
    try:
        with workers(env, conn, 1, tmp_path) as procs:
            v1 = client.post("/predict", json=body).get_json()["results"][0]["model_version"]
            registry = ModelRegistry(mdir, conn)
            loaded = registry.load(v1)
            with torch.no_grad():
                loaded.model.head.bias.fill_(-20.0)  # a visibly different model: empty masks
            info = registry.create_version(loaded.model, loaded.config, loaded.base, parent=v1)
            registry.promote(info.name)
            setup = client.post("/setup", json={"schema": cfg, "project": "1.1"}).get_json()
            assert setup["model_version"] == info.name
            res = client.post("/predict", json=body).get_json()["results"][0]
            assert res["model_version"] == info.name
            assert res["result"] == []
            assert f"loaded model version {info.name}" in procs[0].log()
    finally:
        files.close()
        conn.flushdb()


def test_the_runtime_reads_the_pointer_once_per_job(redis_url, model_dir, tmp_path):
    """The worker checks the current version right before a job; the job's own check takes
    that one. Outside a job, every check reads Redis and follows a promotion at once."""
    from worker.runtime import ModelRuntime

    conn = redis.Redis.from_url(redis_url)
    mdir = tmp_path / "models"
    shutil.copytree(model_dir, mdir)
    registry = ModelRegistry(mdir, conn)
    first, second = (p["version"] for p in registry.promotions()[-2:])
    registry.rollback(first)
    runtime = ModelRuntime(Settings(model_dir=mdir, model_size="test", image_size=64), registry)
    calls = []
    current = registry.current
    registry.current = lambda: calls.append(1) or current()  # type: ignore[method-assign]

    assert runtime.begin_job() == first and len(calls) == 1
    registry.promote(second)  # during the job: this job keeps its version...
    assert runtime.ensure_current(in_job=True) == first and len(calls) == 1
    runtime.end_job()
    assert runtime.ensure_current(in_job=True) == second and len(calls) == 2  # ...the next not
    registry.rollback(first)
    assert runtime.ensure_current() == first and len(calls) == 3
    assert runtime.ensure_current() == first and len(calls) == 4


@pytest.mark.parametrize(("cpu_batch", "per_pass"), [(None, 1), (0, 8), (3, 3)])
def test_a_cpu_worker_runs_its_job_batch_one_image_per_forward_pass(model_dir, cpu_batch, per_pass):
    """SAM2UNET_CPU_BATCH_SIZE (default 1; 0: the job's batch size) caps images per forward
    pass of a worker on a CPU; jobs still carry SAM2UNET_BATCH_SIZE tasks."""
    from worker.runtime import ModelRuntime

    env = {"MODEL_DIR": str(model_dir), "SAM2UNET_BATCH_SIZE": "8", "SAM2UNET_DEVICE": "cpu"}
    if cpu_batch is not None:
        env["SAM2UNET_CPU_BATCH_SIZE"] = str(cpu_batch)
    settings = Settings.from_env(env)
    runtime = ModelRuntime(settings, ModelRegistry(model_dir, None))
    runtime.ensure_current()
    assert settings.batch_size == 8 and runtime.predictor.batch_size == per_pass


def test_one_request_id_links_the_backend_answer_to_its_worker_log_lines(stack):
    client = make_client(stack)
    files = stack["files"]
    refs = [files.add(f"upload/6/rid{i}.png", png_bytes(red_circle(seed=60 + i))) for i in range(6)]
    cfg = fixture("post_setup.json")["json"]["schema"]
    tasks = [{"id": 600 + i, "data": {"image": f"{files.url}/{r}"}} for i, r in enumerate(refs)]
    r = client.post("/predict", json={"tasks": tasks, "label_config": cfg})
    rid = r.headers["X-Request-ID"]
    assert len(rid) == 12
    lines = [ln for w in stack["workers"] for ln in w.log().splitlines() if f"request {rid}:" in ln]
    assert sum(int(ln.split(": ")[-1].split(" items")[0]) for ln in lines) == len(tasks)
