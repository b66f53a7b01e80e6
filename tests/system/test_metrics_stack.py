"""Metrics with the services running: predictions through a real worker process, the round gauges
from real trainer rounds against a real Label Studio, and no secret in any log."""

from __future__ import annotations

import base64
import logging
import secrets
import time

import pytest
import redis

from backend.app import create_app
from contracts import metrics
from contracts.jobs import QUEUE_BATCH
from contracts.settings import Settings
from tests.backend.test_metrics import CFG, delta, own_redis, scrape, scrape_until, value
from tests.support.protocol import fixture, red_circle
from tests.support.services import (
    LabelStudioLikeFiles,
    annotate_brush,
    label_studio_env,
    png_bytes,
    service_env,
    workers,
)

__all__ = ["own_redis"]  # the module fixture, used here


@pytest.fixture(scope="module")
def stack(own_redis, model_dir, tmp_path_factory):
    """One real worker on a Redis of this module's own, and Label Studio-like image paths."""
    url = own_redis.url
    conn = redis.Redis.from_url(url)
    files = LabelStudioLikeFiles(tmp_path_factory.mktemp("metrics-files"))
    env = service_env(url, model_dir)
    with workers(env, conn, 1, tmp_path_factory.mktemp("metrics-logs")) as procs:
        yield {"conn": conn, "files": files, "env": env, "workers": procs}
    files.close()


def test_scrape_after_real_predictions_through_a_real_worker(stack, model_dir):
    files = stack["files"]
    settings = Settings.from_env(stack["env"])
    client = create_app(settings, redis.Redis.from_url(settings.redis_url)).test_client()
    good = [files.add(f"upload/3/g{i}.png", png_bytes(red_circle(seed=40 + i))) for i in range(3)]
    files.add("upload/3/corrupt.png", b"\x89PNG\r\n\x1a\nnot a png")
    tasks = [
        {"id": 1, "data": {"image": f"{files.url}/{good[0]}"}},
        {"id": 2, "data": {"image": f"{files.url}/upload/3/missing.png"}},  # 404: fetch
        {"id": 3, "data": {"image": f"{files.url}/upload/3/corrupt.png"}},  # decode
        {"id": 4, "data": {"image": f"{files.url}/{good[1]}"}},
        {"id": 5, "data": {"other": "no image"}},  # no_image, on the backend
        {"id": 6, "data": {"image": f"{files.url}/{good[2]}"}},
    ]
    before = scrape(client)
    t0 = time.perf_counter()
    r = client.post("/predict", json={"tasks": tasks, "label_config": CFG})
    predict_s = time.perf_counter() - t0
    assert r.status_code == 200
    version = r.get_json()["results"][0]["model_version"]
    assert [bool(x["result"]) for x in r.get_json()["results"]] == [1, 0, 0, 1, 0, 1]
    n_jobs = 2  # 5 tasks with an image, SAM2UNET_BATCH_SIZE=4
    after, scrapes = scrape_until(
        client, lambda s: delta(before, s, "sam2unet_jobs_total", queue=QUEUE_BATCH) >= n_jobs
    )
    t0 = time.perf_counter()
    scrape(client)
    scrape_ms = (time.perf_counter() - t0) * 1000
    req = {"endpoint": "/predict", "method": "POST"}
    assert delta(before, after, "sam2unet_http_requests_total", **req, status="200") == 1
    assert delta(before, after, "sam2unet_http_request_duration_seconds_count", **req) == 1
    # the request's recorded duration lies within the time measured around the call
    request_s = delta(before, after, "sam2unet_http_request_duration_seconds_sum", **req)
    assert 0 < request_s < predict_s + 1e-6  # (the float rounding of its running sum)
    assert delta(before, after, "sam2unet_jobs_total", queue=QUEUE_BATCH) == n_jobs
    for stage in metrics.STAGES:
        labels = {"queue": QUEUE_BATCH, "stage": stage}
        assert delta(before, after, "sam2unet_job_stage_duration_seconds_count", **labels) == n_jobs
        inf = delta(
            before, after, "sam2unet_job_stage_duration_seconds_bucket", **labels, le="+Inf"
        )
        assert inf == n_jobs
    forward = delta(
        before, after, "sam2unet_job_stage_duration_seconds_sum", queue=QUEUE_BATCH, stage="forward"
    )
    total = delta(
        before, after, "sam2unet_job_stage_duration_seconds_sum", queue=QUEUE_BATCH, stage="total"
    )
    assert 0 < forward < total < predict_s
    assert delta(before, after, "sam2unet_predictions_total", model_version=version) == 3
    assert delta(before, after, "sam2unet_failed_tasks_total", reason="fetch") == 1
    assert delta(before, after, "sam2unet_failed_tasks_total", reason="decode") == 1
    assert delta(before, after, "sam2unet_failed_tasks_total", reason="no_image") == 1
    assert delta(before, after, "sam2unet_cache_hits_total") == 0
    # scrapes are counted too: the one before and those until the jobs' metrics were in
    assert delta(before, after, "sam2unet_http_requests_total", endpoint="/metrics",
                 method="GET", status="200") == scrapes  # fmt: skip
    # live gauges
    assert value(after, "sam2unet_workers") == 1
    assert value(after, "sam2unet_queue_depth", queue=QUEUE_BATCH) == 0
    assert value(after, "sam2unet_model_version_info", version=version, source="test-fixture") == 1

    # the same images again: all three from the cache
    again = [t for t in tasks if t["id"] in (1, 4, 6)]
    r = client.post("/predict", json={"tasks": again, "label_config": CFG})
    assert all(x["result"] for x in r.get_json()["results"])
    third, _ = scrape_until(
        client, lambda s: delta(after, s, "sam2unet_jobs_total", queue=QUEUE_BATCH) >= 1
    )
    assert delta(after, third, "sam2unet_cache_hits_total") == 3
    assert delta(after, third, "sam2unet_predictions_total", model_version=version) == 3
    assert delta(after, third, "sam2unet_jobs_total", queue=QUEUE_BATCH) == 1
    assert delta(after, third, "sam2unet_http_requests_total", **req, status="200") == 1

    # a bad request is counted under its status
    client.post("/predict", data="not json", content_type="application/json")
    client.get("/no-such-page")
    fourth = scrape(client)
    assert delta(third, fourth, "sam2unet_http_requests_total", **req, status="400") == 1
    assert (
        delta(third, fourth, "sam2unet_http_requests_total", endpoint="unmatched", method="GET",
              status="404") == 1
    )  # fmt: skip
    print(f"/metrics scrape: {scrape_ms:.1f} ms")


@pytest.mark.timeout(900)  # a hang guard (Label Studio's start, two short rounds)
def test_training_round_gauges_from_real_trainer_rounds(own_redis, model_dir, tmp_path):
    """The trainer service's own rounds (sync from a real Label Studio, fine-tuning, the
    promotion gate) are what /metrics reports: a trainer that stopped recording its rounds
    would fail here."""
    import dataclasses
    import shutil

    from labelstudio.client import LabelStudioClient
    from labelstudio.fetch import FetchPolicy, ImageFetcher
    from sam2unet.synthetic import generate
    from tests.support.lstudio import running_label_studio
    from trainer.service import ROUNDS_KEY, TrainerService

    url = f"redis://127.0.0.1:{own_redis.port}/5"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    cfg = """<View><Image name="image" value="$image"/>
      <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels></View>"""
    samples = generate(6, 64, seed=5)
    with running_label_studio(tmp_path / "ls") as ls:
        annotated = ls.create_project(cfg, title="annotated")
        ids = ls.import_images(annotated, [(f"s{i}.png", png_bytes(im)) for i, (im, _) in
                                           enumerate(samples)])  # fmt: skip
        annotate_brush(ls, cfg, ids, [m[0] > 127 for _, m in samples], "object")
        bare = ls.create_project(cfg, title="nothing annotated")
        ls.import_images(bare, [("b.png", png_bytes(samples[0][0]))])

        env = label_studio_env(url, models, ls)
        settings = Settings.from_env(env).with_(
            train_epochs=1, train_min_samples=4, train_holdout=0.25, promote_tolerance=1.0
        )
        ls_client = LabelStudioClient(ls.url, ls.pat)
        fetch = ImageFetcher(ls_client, FetchPolicy.from_settings(settings)).fetch
        service = TrainerService(settings, conn, ls_client, fetch)
        client = create_app(settings, conn).test_client()
        before = scrape(client)
        assert not any(k[0].startswith("sam2unet_training_last_round") for k in before)
        skipped = service.round(bare, "test")
        promoted = service.round(annotated, "test")  # a tolerance of 1: any candidate passes
        # no candidate beats its parent's held-out mIoU by 1: rejected
        service.settings = dataclasses.replace(settings, promote_tolerance=-1.0)
        t0 = time.time()
        rejected = service.round(annotated, "test")
        t1 = time.time()
    assert [r.status for r in (skipped, promoted, rejected)] == ["skipped", "promoted", "rejected"]
    assert rejected.parent == promoted.candidate

    after = scrape(client)
    for status in ("skipped", "promoted", "rejected"):
        assert delta(before, after, "sam2unet_training_rounds_total", status=status) == 1
    last = {"status": "rejected", "project": str(annotated), "parent": promoted.candidate,
            "candidate": rejected.candidate}  # fmt: skip
    assert value(after, "sam2unet_training_last_round_info", **last) == 1
    for model, got in (("candidate", rejected.candidate_metrics),
                       ("current", rejected.current_metrics)):  # fmt: skip
        assert got and all(
            value(after, "sam2unet_training_last_round_metric", model=model, metric=name)
            == pytest.approx(v)
            for name, v in got.items()
        )
    assert value(after, "sam2unet_training_last_round_samples", set="train") == rejected.train_size
    assert value(after, "sam2unet_training_last_round_samples", set="val") == rejected.val_size
    assert value(after, "sam2unet_training_last_round_duration_seconds") == pytest.approx(
        rejected.seconds
    )
    assert t0 <= value(after, "sam2unet_training_last_round_timestamp_seconds") <= t1
    assert conn.llen(ROUNDS_KEY) == 3
    assert value(after, "sam2unet_trainer_state_info", state="idle", project="") == 1
    conn.flushdb()


def test_no_secret_in_any_log(own_redis, model_dir, tmp_path, caplog):
    """A prediction with a Label Studio API key (used to fetch the image) and basic auth: neither
    secret, nor the encoded credentials, appears in the backend's or the worker's log."""
    api_key = "lskey" + secrets.token_hex(16)
    password = "pw-" + secrets.token_hex(12)
    setup_token = "setup" + secrets.token_hex(16)
    basic = base64.b64encode(f"ls:{password}".encode()).decode()
    url = f"redis://127.0.0.1:{own_redis.port}/4"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    files = LabelStudioLikeFiles(tmp_path / "files")
    seen_auth: list[str | None] = []
    handler = files.httpd.RequestHandlerClass

    class Recording(handler):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            seen_auth.append(self.headers.get("Authorization"))
            super().do_GET()

    files.httpd.RequestHandlerClass = Recording
    ref = files.add("upload/5/secret-test.png", png_bytes(red_circle(seed=7)))
    env = service_env(
        url,
        model_dir,
        LABEL_STUDIO_URL=files.url,
        LABEL_STUDIO_API_KEY=api_key,
        BASIC_AUTH_USER="ls",
        BASIC_AUTH_PASS=password,
        LOG_LEVEL="DEBUG",
    )
    settings = Settings.from_env(env)
    caplog.set_level(logging.DEBUG)
    auth = {"Authorization": f"Basic {basic}"}
    try:
        with workers(env, conn, 1, tmp_path) as procs:
            client = create_app(settings, conn).test_client()
            setup = fixture("post_setup.json")["json"]
            setup.update(hostname=files.url, access_token=setup_token)
            assert client.post("/setup", json=setup, headers=auth).status_code == 200
            tasks = [
                {"id": 11, "data": {"image": f"/data/upload/{ref[len('upload/') :]}"}},
                {"id": 12, "data": {"image": "/data/upload/5/missing.png"}},
            ]
            body = {"tasks": tasks, "label_config": CFG, "project": setup["project"]}
            r = client.post("/predict", json=body, headers=auth)
            assert r.status_code == 200
            results = r.get_json()["results"]
            assert results[0]["result"] and not results[1]["result"]
            assert client.get("/metrics", headers=auth).status_code == 200
            bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
            assert client.post("/setup", json=setup, headers=bad).status_code == 401
            worker_log = procs[0].log()
    finally:
        files.close()
        conn.flushdb()
    assert f"Token {api_key}" in seen_auth  # the key was really used, for the image
    backend_log = "\n".join(
        f"{rec.name} {rec.levelname} {rec.getMessage()} {rec.exc_text or ''}"
        for rec in caplog.records
    )
    assert "DEBUG" in worker_log and backend_log
    assert "task 12: no prediction" in worker_log  # failures name their task
    for secret in (api_key, password, basic, setup_token):
        assert secret not in backend_log
        assert secret not in worker_log
