"""Real processes for service tests: workers started as `sam2unet-assist worker` subprocesses
against a real Redis, and a loopback HTTP server for task images."""

from __future__ import annotations

import functools
import http.server
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis
from PIL import Image
from rq import Worker

from launcher.redis_server import free_port
from tests.support.sockets import LoopbackServer, QuietHandler
from tests.support.tier import require_system_test

ROOT = Path(__file__).resolve().parents[2]


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def annotate_brush(ls, label_config: str, ids, masks, label: str) -> None:
    """Submit one brush annotation per task of Label Studio ``ls``: task ``ids[i]`` gets
    ``masks[i]`` (boolean H x W) as ``label`` of the config's brush control."""
    from labelstudio.codecs import brush_result
    from labelstudio.labelconfig import parse_label_config

    target = parse_label_config(label_config)
    for tid, mask in zip(ids, masks, strict=True):
        item = brush_result(mask, target, label, 1.0)
        item.pop("score", None)
        ls.annotate(tid, [item])


def round_settings(model_dir: Path, **overrides: object):
    """Settings for a fast training round of the test-size model on a CPU."""
    from contracts.settings import Settings

    fields = {
        "model_dir": model_dir,
        "model_size": "test",
        "image_size": 64,
        "device": "cpu",
        "train_epochs": 1,
        "train_batch_size": 4,
        "train_min_samples": 4,
        "train_holdout": 0.25,
        "active_learning": False,
    }
    return Settings(**{**fields, **overrides})


def fresh_redis_db(server, n: int) -> tuple[str, redis.Redis]:
    """Database ``n`` of the running Redis ``server`` (its ``port``), emptied: its URL and a
    connection to it."""
    url = f"redis://127.0.0.1:{server.port}/{n}"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    return url, conn


def service_env(redis_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM2UNET_", "LABEL_STUDIO"))}
    env.update(
        REDIS_URL=redis_url,
        MODEL_DIR=str(model_dir),
        SAM2UNET_MODEL_SIZE="test",
        SAM2UNET_IMAGE_SIZE="64",
        SAM2UNET_BATCH_SIZE="4",
        SAM2UNET_ALLOW_HOSTS="127.0.0.1,localhost",
        SAM2UNET_JOB_LEASE="3",
        SAM2UNET_TORCH_THREADS="1",
        OMP_NUM_THREADS="1",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def label_studio_env(
    redis_url: str,
    model_dir: Path,
    ls,
    auth: tuple[str, str] | None = None,
    **extra: str,
) -> dict[str, str]:
    """:func:`service_env` for services talking to a running Label Studio ``ls`` (its URL and
    personal access token), with the backend's basic auth ``auth`` when one is given."""
    if auth is not None:
        extra = {"BASIC_AUTH_USER": auth[0], "BASIC_AUTH_PASS": auth[1], **extra}
    return service_env(
        redis_url, model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.pat, **extra
    )


def backend_process(env: dict[str, str], port: int, log_dir: Path) -> ServiceProcess:
    """`sam2unet-assist backend` (gunicorn, one worker) on 127.0.0.1:``port``."""
    require_system_test("a backend process")
    return ServiceProcess(
        ["backend", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env,
        "backend",
        log_dir,
    )


@contextmanager
def connected_stack(
    ls, redis_url: str, model_dir: Path, auth: tuple[str, str], log_dir: Path, worker_name: str,
    ready_timeout: float = 120.0,
) -> Iterator[tuple[str, ServiceProcess, ServiceProcess]]:  # fmt: skip
    """A backend and one worker talking to the running Label Studio ``ls``, both ready: yields
    (the backend's URL, the backend, the worker); both stopped on the way out."""
    port = free_port()
    env = label_studio_env(redis_url, model_dir, ls, auth)
    log_dir.mkdir(parents=True, exist_ok=True)
    backend = backend_process(env, port, log_dir)
    worker = ServiceProcess(["worker", "--name", worker_name], env, "worker", log_dir)
    try:
        url = f"http://127.0.0.1:{port}"
        backend.wait_http(f"{url}/health")
        worker.wait_log("worker ready", timeout=ready_timeout)
        yield url, backend, worker
    finally:
        worker.stop()
        backend.stop()


def worker_process(env: dict[str, str], name: str, log_dir: Path) -> ServiceProcess:
    """One `sam2unet-assist worker` subprocess."""
    require_system_test("a worker process")
    return ServiceProcess(["worker", "--name", name], env, name, log_dir)


@contextmanager
def workers(
    env: dict[str, str], conn: redis.Redis, n: int, log_dir: Path
) -> Iterator[list[ServiceProcess]]:
    procs = [
        worker_process(env, f"w{i}-{os.getpid()}-{time.time_ns() % 10**6}", log_dir)
        for i in range(n)
    ]
    try:
        for p in procs:
            p.wait_ready(conn)
        yield procs
    finally:
        for p in procs:
            p.stop()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def folder_server(directory: Path) -> LoopbackServer:
    """A :class:`LoopbackServer` answering GETs with the files of ``directory``."""
    return LoopbackServer(functools.partial(_QuietHandler, directory=str(directory)))


@contextmanager
def file_server(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1; yields the base URL."""
    with folder_server(directory) as server:
        yield server.url


class LabelStudioLikeFiles(LoopbackServer):
    """A loopback server answering Label Studio's image paths from a folder:
    ``/data/upload/<path>`` -> ``root/upload/<path>``, ``/data/local-files/?d=<path>`` ->
    ``root/local/<path>``, any other path -> ``root/<path>``. ``delay`` slows every answer."""

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        self.root = root
        self.delay = delay
        self.requests: list[str] = []
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                from urllib.parse import parse_qs, unquote, urlsplit

                owner.requests.append(self.path)
                if owner.delay:
                    time.sleep(owner.delay)
                parts = urlsplit(self.path)
                if parts.path.startswith("/data/upload/"):
                    rel = "upload/" + unquote(parts.path[len("/data/upload/") :])
                elif parts.path.rstrip("/") == "/data/local-files":
                    rel = "local/" + parse_qs(parts.query).get("d", [""])[0]
                else:
                    rel = unquote(parts.path.lstrip("/"))
                path = (owner.root / rel).resolve()
                if owner.root.resolve() not in path.parents or not path.is_file():
                    self.send_error(404)
                    return
                self.send_body(path.read_bytes())

        super().__init__(Handler)

    def add(self, rel: str, data: bytes) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return rel


class ServiceProcess:
    """A `sam2unet-assist <args>` subprocess (own process group), its log in a file; ``module``
    names another ``python -m`` entry point to run instead of the command line's."""

    #: Seconds :meth:`stop` waits after SIGTERM, then after SIGKILL.
    stop_waits: tuple[float, float] = (20.0, 10.0)
    #: Seconds between two looks of :meth:`wait_ready`.
    ready_poll = 0.1

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        name: str,
        log_dir: Path,
        *,
        module: tuple[str, ...] = ("cli",),
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *module, *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()[-3000:]}")
            try:
                if requests.get(url, timeout=2).status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not answer {url}:\n{self.log()[-3000:]}")

    def wait_ready(self, conn: redis.Redis, timeout: float = 60.0) -> None:
        """For a worker: wait until it registered with rq under its name."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log()[-3000:]}")
            if any(w.name == self.name for w in Worker.all(connection=conn)):
                return
            time.sleep(self.ready_poll)
        raise TimeoutError(f"worker {self.name} not ready:\n{self.log()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def wait_log(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {text!r} in the log:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_waits[0])
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=self.stop_waits[1])
        self._log.close()
