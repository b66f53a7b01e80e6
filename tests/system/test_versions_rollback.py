"""``sam2unet-assist versions rollback``: the command moves the current version back, and a
running worker process serves the rolled-back version from its next job on, without restart."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import redis

from backend.app import create_app
from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from tests.support.protocol import fixture, red_circle
from tests.support.services import ROOT, LabelStudioLikeFiles, png_bytes, service_env, workers

CFG = fixture("post_setup.json")["json"]["schema"]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(300)  # a hang guard
def test_rollback_then_a_running_worker_serves_the_rolled_back_version(
    redis_url, model_dir, tmp_path
):
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)  # the fixture's registry: v1 (random), v2 (trained)
    conn = redis.Redis.from_url(redis_url)
    registry = ModelRegistry(models, conn)
    newest = registry.current()
    (older,) = [v.name for v in registry.versions() if v.name != newest]
    env = service_env(redis_url, models)
    client = create_app(Settings.from_env(env), conn).test_client()
    files = LabelStudioLikeFiles(tmp_path / "files")
    images = [files.add(f"upload/1/{i}.png", png_bytes(red_circle(seed=i))) for i in range(3)]

    def served(i: int) -> str:
        """The model version of task i's prediction; "" when the answer holds none (a version
        whose automatic head was never trained)."""
        tasks = [{"id": i + 1, "data": {"image": f"{files.url}/{images[i]}"}}]
        r = client.post("/predict", json={"tasks": tasks, "label_config": CFG})
        assert r.status_code == 200, r.get_data(as_text=True)
        (result,) = r.get_json()["results"]
        return result["model_version"] if result else ""

    try:
        with workers(env, conn, 1, tmp_path) as (worker,):
            assert served(0) == newest

            done = cli(env, "versions", "rollback", older)
            assert done.returncode == 0, done.stderr
            assert f"current version: {older}" in done.stdout
            assert registry.current() == older
            last = registry.promotions()[-1]
            assert (last["version"], last["reason"]) == (older, "rollback")
            assert client.get("/versions").get_json()["current"] == older

            # the same worker process, its next job; v1's decoder was never trained, so its
            # automatic answer is no prediction at all
            assert served(1) == ""
            assert f"loaded model version {older}" in worker.log()

            # an unknown version: a clear error, and nothing moves
            bad = cli(env, "versions", "rollback", "sam2unet-test-v99")
            assert bad.returncode != 0
            assert "no model version 'sam2unet-test-v99'" in bad.stderr
            assert "Traceback" not in bad.stderr
            assert registry.current() == older and served(2) == ""
            assert worker.proc.poll() is None
    finally:
        files.close()
    listed = json.loads(cli(env, "versions", "--json").stdout)
    assert [v["version"] for v in listed if v.get("current")] == [older]
