"""Interactive prompts go to the worker process holding the image's features (SAM2's own head)."""

from __future__ import annotations

import time

from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from tests.support.services import fresh_redis_db, png_bytes
from tests.worker.test_pipeline import (
    LABEL_CONFIG,
    image,
    kp,
    make_runtime,
    official,
    rect,
)

__all__ = ["official"]  # the module fixture, used here


def test_prompts_go_to_the_worker_holding_the_features(redis_server, official, tmp_path):
    """Two real workers: every later prompt on an image runs on the worker that embedded it,
    from its cache; once that worker is killed, the prompt still completes on the other."""
    from backend.app import create_app
    from contracts.routing import route_key, worker_queue
    from tests.support.services import LabelStudioLikeFiles, service_env, workers

    model_dir, _ = official("test")
    make_runtime(model_dir, "test")  # the registry's first version, on the official base
    url, conn = fresh_redis_db(redis_server, 11)
    ModelRegistry(model_dir, conn).current()  # the pointer, from the promotion log
    files = LabelStudioLikeFiles(tmp_path / "files")
    env = service_env(url, model_dir, SAM2UNET_JOB_LEASE="3")
    client = create_app(Settings.from_env(env), conn).test_client()
    refs = [files.add(f"upload/1/p{i}.png", png_bytes(image(45, 67, seed=i))) for i in range(3)]

    def ask(ref: str, items: list[dict]) -> dict:
        body = {
            "tasks": [{"id": 1, "data": {"image": f"{files.url}/{ref}"}}],
            "label_config": LABEL_CONFIG,
            "params": {"context": {"result": items}},
        }
        r = client.post("/predict", json=body)
        assert r.status_code == 200, r.data
        (out,) = r.get_json()["results"]
        assert not out["model_version"].endswith("/failed"), out
        assert out["result"] and out["result"][0]["type"] == "brushlabels"
        return out

    def routed_jobs(proc, at_least: int = 0) -> int:
        """Jobs the worker took from its own queue (rq's log line per finished job, written
        just after the reply: waited for up to 10 s until there are ``at_least``)."""
        deadline = time.monotonic() + 10
        while True:
            n = proc.log().count(f"{worker_queue(proc.name)}: Job OK")
            if n >= at_least or time.monotonic() > deadline:
                return n
            time.sleep(0.05)

    try:
        with workers(env, conn, 2, tmp_path) as procs:
            by_name = {p.name: p for p in procs}
            holders = {}
            for ref in refs:
                ask(ref, [kp(40.0, 45.0)])
                holder = conn.get(route_key(None, f"{files.url}/{ref}")).decode()
                assert holder in by_name
                holders[ref] = holder
            for ref in refs:
                holder = by_name[holders[ref]]
                before = routed_jobs(holder)
                ask(ref, [rect(20.0, 20.0, 60.0, 60.0), kp(40.0, 45.0)])
                assert routed_jobs(holder, before + 1) == before + 1
            for name, proc in by_name.items():
                n = sum(1 for h in holders.values() if h == name)
                assert proc.log().count("image features from the cache") == n
                assert proc.log().count("image features computed") == n
            # the holder of the first image dies: its prompt still completes, on the other
            victim = by_name[holders[refs[0]]]
            survivor = next(p for p in procs if p is not victim)
            victim.kill()
            cached_before = survivor.log().count("image features computed")
            t0 = time.monotonic()
            ask(refs[0], [kp(60.0, 30.0)])
            elapsed = time.monotonic() - t0
            assert survivor.log().count("image features computed") == cached_before + 1
            assert conn.get(route_key(None, f"{files.url}/{refs[0]}")).decode() == survivor.name
            print(f"prompt routed to a killed worker answered by the other in {elapsed:.1f}s")
    finally:
        files.close()
        conn.close()
