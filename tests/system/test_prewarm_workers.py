"""Opening a task prewarms its image's features on a real worker process."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from rq import Queue

from contracts.routing import route_key
from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from tests.support.services import fresh_redis_db, png_bytes, service_env, workers
from tests.worker.test_pipeline import image, kp, rect
from tests.worker.test_prewarm import GatedFiles, _body, _wait_for, official_dir

__all__ = ["official_dir"]  # the module fixture, used here


def test_opening_a_task_prewarms_its_image_on_a_worker(redis_server, official_dir, tmp_path):
    """A one-task /predict (the task has no prediction of the version) and an interactive call
    without prompts (after a Submit) each prewarm their image on a worker; the first click on
    it then runs on that worker from the cache. With SAM2UNET_PREWARM=off nothing is queued."""
    from backend.app import create_app
    from contracts.jobs import QUEUE_PREWARM

    url, conn = fresh_redis_db(redis_server, 12)
    ModelRegistry(official_dir, conn).current()
    files = GatedFiles()
    env = service_env(url, official_dir)
    client = create_app(Settings.from_env(env), conn).test_client()
    opened = files.add("opened.png", png_bytes(image(45, 67, seed=1)))
    submitted = files.add("next.png", png_bytes(image(45, 67, seed=2)))
    try:
        with workers(env, conn, 1, tmp_path) as (proc,):
            assert client.post("/predict", json=_body(opened)).status_code == 200
            r = client.post("/predict", json=_body(submitted, {"result": []}))
            assert r.status_code == 200
            _wait_for(lambda: proc.log().count("image features prewarmed") == 2)
            for ref in (opened, submitted):
                assert conn.get(route_key(None, ref)).decode() == proc.name
                r = client.post("/predict", json=_body(ref, {"result": [kp(40.0, 45.0)]}))
                assert r.get_json()["results"][0]["result"]
            assert proc.log().count("image features from the cache") == 2
            assert proc.log().count("image features computed") == 0
        off = create_app(Settings.from_env({**env, "SAM2UNET_PREWARM": "off"}), conn)
        conn.flushdb()
        ModelRegistry(official_dir, conn).current()
        with workers(env, conn, 1, tmp_path):
            r = off.test_client().post("/predict", json=_body(opened))
            assert r.status_code == 200
        assert not any(q.name.startswith(QUEUE_PREWARM) and q.count for q in Queue.all(conn))
        assert not conn.keys("sam2unet:prewarm-pending:*")
    finally:
        files.close()
        conn.close()


def test_a_cache_hit_overtakes_another_images_encode(redis_server, official_dir, tmp_path):
    """One worker: annotator A's first click on an image is held in its fetch (standing in
    for a slow encode); annotator B's click on an image whose features the worker holds is
    answered meanwhile, by the worker's prompt lane, and A's answer comes once released."""
    from backend.app import create_app

    url, conn = fresh_redis_db(redis_server, 13)
    ModelRegistry(official_dir, conn).current()
    files = GatedFiles()
    env = service_env(url, official_dir, SAM2UNET_PREWARM="off")
    app = create_app(Settings.from_env(env), conn)
    cached = files.add("cached.png", png_bytes(image(45, 67, seed=3)))
    slow = files.add("slow.png", png_bytes(image(45, 67, seed=4)))
    click = {"result": [kp(40.0, 45.0)]}
    box = {"result": [rect(20.0, 20.0, 60.0, 60.0), kp(40.0, 45.0)]}
    try:
        with workers(env, conn, 1, tmp_path) as (proc,), ThreadPoolExecutor(2) as pool:
            client = app.test_client()
            assert client.post("/predict", json=_body(cached, click)).status_code == 200
            first = pool.submit(app.test_client().post, "/predict", json=_body(slow, click))
            _wait_for(lambda: "/slow.png" in files.requests)
            t0 = time.monotonic()
            hit = client.post("/predict", json=_body(cached, box))
            waited = time.monotonic() - t0
            assert waited < 5.0, f"the cache hit waited {waited:.1f}s"
            assert not first.done(), "the encode was not held"
            assert hit.get_json()["results"][0]["result"], hit.get_json()
            files.gate.set()
            assert first.result(60).get_json()["results"][0]["result"]
        assert "image features from the cache" in proc.log()
    finally:
        files.close()
        conn.close()
