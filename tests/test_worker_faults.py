"""A worker killed with SIGKILL in the middle of a /predict: its job is retried on the other
worker after the job lease runs out, and every task still gets its prediction."""

from __future__ import annotations

import threading
import time

import redis
from rq.job import Job
from rq.registry import StartedJobRegistry

from backend.app import create_app
from common.jobs import QUEUE_BATCH
from common.settings import Settings
from tests.services import LabelStudioLikeFiles, png_bytes, service_env, workers
from tests.test_serving import fixture, red_circle


def test_kill_9_worker_mid_batch_every_task_still_predicted(redis_server, model_dir, tmp_path):
    url = f"redis://127.0.0.1:{redis_server.port}/12"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    files = LabelStudioLikeFiles(tmp_path / "files", delay=0.25)  # slow images: long jobs
    refs = [files.add(f"upload/1/k{i}.png", png_bytes(red_circle(seed=i))) for i in range(24)]
    env = service_env(url, model_dir, SAM2UNET_JOB_LEASE="3")
    settings = Settings.from_env(env)
    client = create_app(settings, conn).test_client()
    cfg = fixture("post_setup.json")["json"]["schema"]
    tasks = [{"id": i + 1, "data": {"image": f"{files.url}/{r}"}} for i, r in enumerate(refs)]
    out: dict = {}

    def call() -> None:
        t0 = time.monotonic()
        out["response"] = client.post("/predict", json={"tasks": tasks, "label_config": cfg})
        out["seconds"] = time.monotonic() - t0

    try:
        with workers(env, conn, 2, tmp_path) as procs:
            caller = threading.Thread(target=call)
            caller.start()
            registry = StartedJobRegistry(QUEUE_BATCH, connection=conn)
            victim = None
            deadline = time.monotonic() + 30
            while victim is None and time.monotonic() < deadline:
                for job_id in registry.get_job_ids():
                    running_on = Job.fetch(job_id, connection=conn).worker_name
                    victim = next((p for p in procs if p.name == running_on), victim)
                time.sleep(0.05)
            assert victim is not None, "no job started"
            time.sleep(0.3)  # mid-batch: the job has fetched part of its images
            victim.kill()
            caller.join(timeout=100)
            assert not caller.is_alive()
            survivor = next(p for p in procs if p is not victim)
            assert "Job OK" in survivor.log()
    finally:
        files.close()
    results = out["response"].get_json()["results"]
    assert len(results) == len(tasks)
    assert all(r["result"] for r in results), [r["model_version"] for r in results]
    assert all(not r["model_version"].endswith("/failed") for r in results)
    assert out["seconds"] < 100
    print(f"24 tasks with a worker killed mid-batch answered in {out['seconds']:.1f}s")
