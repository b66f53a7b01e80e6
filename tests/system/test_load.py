"""Load: 100 concurrent /predict requests of 3 tasks each against a real gunicorn backend
(``sam2unet-assist backend``, default processes and threads) with two real workers running the
test-size model; three successive waves of new images (the first one warms up).

Every request must be answered with one prediction per task, in task order (each task's image
has its own size, which its result must carry), of the current version, none failed. Latency
percentiles and the RSS of the backend and the workers after each wave are printed, not
asserted: on a shared machine neither is a property of the code (the worker's memory is
measured by ``python -m bench``, docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests

from launcher.redis_server import free_port
from modelstore.registry import ModelRegistry
from tests.support.protocol import fixture, red_circle
from tests.support.services import (
    LabelStudioLikeFiles,
    ServiceProcess,
    fresh_redis_db,
    png_bytes,
    service_env,
    workers,
)

pytestmark = pytest.mark.slow

CFG = fixture("post_setup.json")["json"]["schema"]
REQUESTS = 100
TASKS = 3


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MiB."""
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    return sum(q.memory_info().rss for q in procs) / 2**20


@pytest.fixture(scope="module")
def load_stack(redis_server, model_dir, tmp_path_factory):
    url, conn = fresh_redis_db(redis_server, 8)
    root = tmp_path_factory.mktemp("load")
    files = LabelStudioLikeFiles(root / "files")
    env = service_env(url, model_dir)
    port = free_port()
    backend = ServiceProcess(
        ["backend", "--host", "127.0.0.1", "--port", str(port)], env, "backend", root
    )
    try:
        with workers(env, conn, 2, root) as procs:
            backend.wait_http(f"http://127.0.0.1:{port}/health")
            yield {
                "url": f"http://127.0.0.1:{port}",
                "files": files,
                "backend": backend,
                "workers": procs,
                "version": ModelRegistry(model_dir, conn).current(),
            }
    finally:
        backend.stop()
        files.close()
        conn.flushdb()


def make_wave(files: LabelStudioLikeFiles, wave: int) -> list[list[tuple[str, int, int]]]:
    """REQUESTS lists of TASKS (url, height, width); every image distinct, sizes varied."""
    out = []
    for i in range(REQUESTS):
        tasks = []
        for j in range(TASKS):
            k = i * TASKS + j
            h, w = 48 + (k * 7) % 41, 64 + (k * 13) % 53
            ref = files.add(
                f"upload/{wave}/{k}.png", png_bytes(red_circle(h, w, seed=wave * 1000 + k))
            )
            tasks.append((f"{files.url}/{ref}", h, w))
        out.append(tasks)
    return out


def run_wave(url: str, wave: list[list[tuple[str, int, int]]], version: str) -> list[float]:
    start = threading.Barrier(len(wave))

    def call(i: int) -> tuple[float, list[str]]:
        tasks = wave[i]
        body = {
            "tasks": [
                {"id": i * TASKS + j + 1, "data": {"image": u}} for j, (u, _, _) in enumerate(tasks)
            ],
            "label_config": CFG,
            "project": "1.1",
        }
        start.wait()
        t0 = time.monotonic()
        r = requests.post(url + "/predict", json=body, timeout=120)
        seconds = time.monotonic() - t0
        problems = []
        if r.status_code != 200:
            return seconds, [f"request {i}: HTTP {r.status_code}"]
        results = r.json()["results"]
        if len(results) != len(tasks):
            return seconds, [f"request {i}: {len(results)} results for {len(tasks)} tasks"]
        for (_, h, w), res in zip(tasks, results, strict=True):
            if res["model_version"] != version or not res["result"]:
                problems.append(f"request {i}: {res['model_version']} {len(res['result'])}")
                continue
            item = res["result"][0]
            if (item["original_height"], item["original_width"]) != (h, w):
                problems.append(f"request {i}: result of a {h}x{w} task is for another image")
        return seconds, problems

    with ThreadPoolExecutor(max_workers=len(wave)) as pool:
        outcomes = list(pool.map(call, range(len(wave))))
    problems = [p for _, ps in outcomes for p in ps]
    assert not problems, problems[:10]
    return [s for s, _ in outcomes]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def test_100_concurrent_predict_requests_all_answered(load_stack):
    url, files, version = load_stack["url"], load_stack["files"], load_stack["version"]
    pids = {"backend": load_stack["backend"].proc.pid}
    pids.update({f"worker{i}": w.proc.pid for i, w in enumerate(load_stack["workers"])})
    waves = [make_wave(files, 1), make_wave(files, 2), make_wave(files, 3)]
    run_wave(url, waves[0][:4], version)  # warm up every process
    rss = [{k: rss_mb(p) for k, p in pids.items()}]
    stats = []
    for wave in waves:
        t0 = time.monotonic()
        lat = run_wave(url, wave, version)
        stats.append((time.monotonic() - t0, lat))
        rss.append({k: rss_mb(p) for k, p in pids.items()})
    print(f"\n{REQUESTS} concurrent /predict x {TASKS} tasks, gunicorn 2x16 threads, 2 workers:")
    for n, (wall, lat) in enumerate(stats, 1):
        print(
            f"  wave {n}: {wall:.1f}s wall, {REQUESTS * TASKS / wall:.1f} tasks/s, latency "
            f"p50 {pct(lat, 50):.2f}s p90 {pct(lat, 90):.2f}s p99 {pct(lat, 99):.2f}s "
            f"max {max(lat):.2f}s mean {statistics.mean(lat):.2f}s"
        )
    for name in pids:
        series = " -> ".join(f"{r[name]:.0f}" for r in rss)
        print(f"  RSS {name} MiB: {series} (before, after each wave)")
