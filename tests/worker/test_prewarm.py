"""Prewarming an image's SAM2 features when an annotator opens its task, the prompt lane that
lets cache hits overtake encodes, and one computation per image at a time.

Label Studio 1.23 tells the backend that a task was opened by a ``/predict`` for that one task
(when it has no prediction of the project's model version) and, with Auto-Annotation on, by
interactive calls whose context holds no prompt (``{"result": []}``, after each Submit as the
next task loads; these come whether or not the task has a prediction)."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rq import Queue, Worker

from contracts.routing import remember_route
from contracts.settings import Settings
from sam2unet.random_weights import write_random_sam2_checkpoint
from tests.support.services import png_bytes
from tests.support.sockets import LoopbackServer, QuietHandler
from tests.worker.test_pipeline import LABEL_CONFIG, image, kp, make_runtime, predict


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sam2-prewarm")
    write_random_sam2_checkpoint(d / "base" / "sam2.1_hiera_test.pt", "test")
    make_runtime(d, "test")  # the registry's first version, on the official base
    return d


class GatedFiles(LoopbackServer):
    """Task images on loopback; a path holding ``slow`` is answered once ``gate`` is set."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.gate = threading.Event()
        self.requests: list[str] = []
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                if "slow" in self.path:
                    owner.gate.wait(60)
                data = owner.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_body(data)

        super().__init__(Handler)

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.url}/{name}"

    def close(self) -> None:
        self.gate.set()
        super().close()


def _body(url: str, context=None) -> dict:
    return {
        "tasks": [{"id": 1, "data": {"image": url}}],
        "label_config": LABEL_CONFIG,
        "params": {"context": context},
    }


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --------------------------------------------------------------------------- routing


def test_prewarm_goes_to_the_routed_worker_once_while_pending(redis_conn):
    from contracts.jobs import QUEUE_PREWARM
    from contracts.routing import prewarm, worker_prewarm_queue

    settings = Settings()
    shared = Queue(QUEUE_PREWARM, connection=redis_conn)
    job = prewarm(redis_conn, None, "http://x/a.png", 3, settings)
    assert job is not None and shared.job_ids == [job.id]
    assert job.args[0] == {"url": "http://x/a.png", "ls_base": None, "task_id": 3, "v": 1}
    assert prewarm(redis_conn, None, "http://x/a.png", 3, settings) is None  # pending
    # an image whose route names a live worker: that worker's own prewarm queue
    Worker([shared], connection=redis_conn, name="holder").register_birth()
    remember_route(redis_conn, None, "http://x/b.png", "holder")
    job = prewarm(redis_conn, None, "http://x/b.png", 4, settings)
    assert Queue(worker_prewarm_queue("holder"), connection=redis_conn).job_ids == [job.id]
    # a route to a worker that is gone: the shared queue
    remember_route(redis_conn, None, "http://x/c.png", "gone")
    job = prewarm(redis_conn, None, "http://x/c.png", 5, settings)
    assert shared.job_ids[-1] == job.id


# --------------------------------------------------------------------------- one computation


def test_a_click_during_a_prewarm_waits_for_its_features(official_dir):
    """The prewarm's encode is held; a click on the same image arrives meanwhile: the trunk
    runs once, and the click's answer is that of the prewarmed features."""
    rt = make_runtime(official_dir, "test")
    img = image(45, 67, seed=7)
    digest = hashlib.sha256(png_bytes(img)).hexdigest()
    embed, started, release = rt.promptable.embed, threading.Event(), threading.Event()

    def held(x):
        started.set()
        release.wait(30)
        return embed(x)

    rt.promptable.embed = held
    runs = rt.promptable.trunk_runs
    with ThreadPoolExecutor(2) as pool:
        warm = pool.submit(rt.image_features, img, digest)
        assert started.wait(30)
        click = pool.submit(predict, rt, img, {"result": [kp(40.0, 45.0)]})
        time.sleep(0.3)  # the click is waiting, not computing
        assert not click.done()
        release.set()
        (_, hit), res = warm.result(30), click.result(30)
    assert hit is False and res.result
    assert rt.promptable.trunk_runs == runs + 1, "the features were computed twice"


# --------------------------------------------------------------------------- real workers
