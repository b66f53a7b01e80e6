"""`sam2unet-assist up` as a real subprocess: embedded Redis, gunicorn backend, a worker; a
prediction through it; Ctrl-C stops everything with no process left; a dying service stops the
rest with a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from backend.metrics import RedisCollector
from launcher.redis_server import EmbeddedRedis, free_port
from tests.support.protocol import fixture, red_circle
from tests.support.services import (
    ROOT,
    LabelStudioLikeFiles,
    fresh_redis_db,
    png_bytes,
    service_env,
)


class Up:
    """One `sam2unet-assist up` subprocess in its own session (like a shell's foreground job),
    its output in a file."""

    def __init__(self, model_dir: Path, out_path: Path, env: dict[str, str], *args: str) -> None:
        self.model_dir = model_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out_path = out_path
        self.env = {**env, "MODEL_DIR": str(self.model_dir)}
        self._out = open(self.out_path, "wb")  # noqa: SIM115
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "cli", "up", "--host", "127.0.0.1"),
                *("--port", str(self.port), "--grace", "10", *args),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def on_copy(cls, tmp: Path, model_dir: Path, env: dict[str, str], *args: str) -> Up:
        """`up` on a copy of the ``model_dir`` fixture."""
        shutil.copytree(model_dir, tmp / "models")
        return cls(tmp / "models", tmp / "up.log", env, *args)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> float:
        while time.monotonic() - self.t0 < timeout:
            if text in self.output():
                return time.monotonic() - self.t0
            if self.proc.poll() is not None:
                raise AssertionError(f"up exited {self.proc.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} from up:\n{self.output()[-4000:]}")

    def state(self) -> dict:
        return json.loads((self.model_dir / "up.json").read_text())

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def close(self) -> None:
        """After a failed test: kill whatever is left."""
        if self.proc.poll() is None:
            procs = self.descendants()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        self._out.close()


def up_env(**extra: str) -> dict[str, str]:
    env = service_env("unused", Path("unused"), **extra)
    del env["REDIS_URL"]
    return env


def wait_gone(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """The processes of ``procs`` still running (zombies count as gone) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def counter(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_up_serves_a_prediction_and_ctrl_c_stops_everything(model_dir, tmp_path):
    files = LabelStudioLikeFiles(tmp_path / "files")
    ref = files.add("upload/1/a.png", png_bytes(red_circle(seed=3)))
    up = Up.on_copy(tmp_path, model_dir, up_env(), "--workers", "1", "--backend-processes", "2")
    try:
        ready = up.wait_for("worker(s) ready after")
        up.wait_for("Stop everything: Ctrl-C")
        out = up.output()
        assert "TRAINING IS OFF: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not set" in out
        assert f"Backend URL     http://localhost:{up.port}" in out
        assert "ML_BLOCK_LOCAL_IP=false" in out
        assert "Model: sam2unet-test-v2 (from test-fixture" in out

        cfg = fixture("post_setup.json")["json"]["schema"]
        body = {"tasks": [{"id": 1, "data": {"image": f"{files.url}/{ref}"}}], "label_config": cfg}
        r = requests.post(f"{up.url}/predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        (res,) = r.json()["results"]
        assert res["model_version"] == "sam2unet-test-v2" and res["result"]
        assert files.requests == [f"/{ref}"]

        # the worker records a job's metrics right after delivering its results
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = requests.get(f"{up.url}/metrics", timeout=10).text
            if counter(text, "sam2unet_predictions_total", model_version=res["model_version"]):
                break
            time.sleep(0.05)
        seen = counter(text, "sam2unet_http_requests_total", endpoint="/metrics") + 1
        # every gunicorn process answers the same numbers: they all come from Redis
        t0 = time.monotonic()
        scrapes = [requests.get(f"{up.url}/metrics", timeout=10).text for _ in range(6)]
        scrape_ms = (time.monotonic() - t0) / len(scrapes) * 1000
        for text in scrapes:
            assert counter(text, "sam2unet_http_requests_total", endpoint="/predict") == 1
            assert (
                counter(text, "sam2unet_predictions_total", model_version=res["model_version"]) == 1
            )
            assert counter(text, "sam2unet_workers") == 1
        assert [
            counter(t, "sam2unet_http_requests_total", endpoint="/metrics") for t in scrapes
        ] == [seen + i for i in range(6)]

        # a second `up` for the same MODEL_DIR refuses to start
        second = subprocess.run(
            [sys.executable, "-m", "cli", "up", "--port", str(free_port())],
            cwd=ROOT,
            env=up.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0 and "already runs" in second.stderr

        state = up.state()
        procs = up.descendants()
        pids = {p.pid for p in procs}
        assert {state["redis_pid"], *state["children"].values()} <= pids
        assert len(procs) >= 5  # redis, gunicorn master + 2 processes, worker
        # Ctrl-C in a terminal: SIGINT to the foreground process group (up and its Redis)
        t_stop = time.monotonic()
        os.killpg(up.proc.pid, signal.SIGINT)
        assert up.proc.wait(timeout=40) == 0, up.output()[-3000:]
        stop_s = time.monotonic() - t_stop
        assert wait_gone(procs) == []
        out = up.output()
        assert "all services stopped; no process left behind" in out
        # Redis got no SIGINT of its own: it stopped after the services, which closed cleanly
        assert "Redis unavailable" not in out and "ConnectionError" not in out
        assert not (up.model_dir / "up.json").exists()
        # Redis kept its data: the counters are there after a restart
        with EmbeddedRedis(data_dir=up.model_dir / "redis") as again:
            text = RedisCollector(redis.Redis.from_url(again.url)).collect()
            predicted = {
                tuple(s.labels.values()): s.value
                for fam in text
                if fam.name == "sam2unet_predictions"
                for s in fam.samples
            }
            assert predicted == {("sam2unet-test-v2",): 1.0}
        print(
            f"up: ready in {ready:.1f}s, /metrics {scrape_ms:.0f} ms per scrape, "
            f"stopped in {stop_s:.1f}s"
        )
    finally:
        up.close()
        files.close()


def test_a_dying_service_stops_everything_with_exit_1(model_dir, redis_server, tmp_path):
    url, conn = fresh_redis_db(redis_server, 11)
    up = Up.on_copy(tmp_path, model_dir, {**up_env(), "REDIS_URL": url}, "--backend-processes", "1")
    try:
        up.wait_for("worker(s) ready after")
        out = up.output()
        assert f"Redis: {url} (REDIS_URL)" in out
        state = up.state()
        assert state["redis_pid"] is None
        procs = up.descendants()
        assert all("redis-server" not in " ".join(p.cmdline()) for p in procs)
        worker_pid = state["children"]["worker"]
        os.kill(worker_pid, signal.SIGKILL)
        assert up.proc.wait(timeout=40) == 1
        assert wait_gone(procs) == []
        out = up.output()
        assert f"worker (pid {worker_pid}) exited unexpectedly with code -9" in out
        assert "all services stopped; no process left behind" in out
        assert conn.ping()  # an external Redis is left alone
    finally:
        up.close()
        conn.flushdb()


def test_services_die_with_a_killed_up_and_the_next_up_stops_its_redis(model_dir, tmp_path):
    up = Up.on_copy(tmp_path, model_dir, up_env(), "--backend-processes", "1")
    again, leftover = None, []
    try:
        up.wait_for("worker(s) ready after")
        state = up.state()
        procs = up.descendants()
        services = [p for p in procs if p.pid != state["redis_pid"]]
        assert len(services) == 3  # gunicorn master and process, worker
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait(timeout=10)
        assert wait_gone(services, timeout=20) == []  # SIGTERM from the kernel (Linux)
        old_redis = psutil.Process(state["redis_pid"])
        leftover.append(old_redis)
        assert old_redis.is_running()  # the one process left: the next `up` stops it

        again = Up(up.model_dir, tmp_path / "up2.log", up_env(), "--backend-processes", "1")
        again.wait_for("worker(s) ready after")
        assert f"left its Redis (pid {old_redis.pid}): stopping it" in again.output()
        assert wait_gone([old_redis]) == []
        procs = again.descendants()
        os.kill(again.proc.pid, signal.SIGTERM)
        assert again.proc.wait(timeout=40) == 0
        assert wait_gone(procs) == []
    finally:
        up.close()
        if again is not None:
            again.close()
        for p in leftover:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
