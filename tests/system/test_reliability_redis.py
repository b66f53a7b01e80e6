"""Redis faults with real processes: Redis stopped and restarted during traffic (same port, AOF
persistence), and Redis losing everything (FLUSHALL).

While Redis is down the backend answers at once with a 503 JSON error (no hang, no traceback);
when it is back, backend and worker reconnect by themselves and predictions flow again. Webhook
events recorded before the stop survive the restart (AOF); after FLUSHALL the current model
version is recovered from the registry's promotion log.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
from rq.registry import StartedJobRegistry

from backend.app import create_app
from contracts.connections import redis_client
from contracts.events import EVENTS_STREAM
from contracts.jobs import QUEUE_BATCH
from contracts.settings import Settings
from launcher.redis_server import EmbeddedRedis
from modelstore.registry import POINTER_KEY, ModelRegistry
from tests.support.protocol import fixture, red_circle
from tests.support.services import LabelStudioLikeFiles, png_bytes, service_env, workers

CFG = fixture("post_setup.json")["json"]["schema"]


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory):
    """A Redis of its own with AOF in a data directory (so that it can be stopped and started
    on the same port), one real worker, the app and Label Studio-like image paths."""
    data = tmp_path_factory.mktemp("redis-data")
    server = EmbeddedRedis(data_dir=data).start()
    files = LabelStudioLikeFiles(tmp_path_factory.mktemp("files"), delay=0.3)  # jobs last
    refs = [files.add(f"upload/1/r{i}.png", png_bytes(red_circle(seed=i))) for i in range(4)]
    env = service_env(server.url, model_dir)
    settings = Settings.from_env(env)
    conn = redis.Redis.from_url(server.url)
    try:
        with workers(env, conn, 1, tmp_path_factory.mktemp("logs")) as procs:
            app = create_app(settings, redis_client(server.url))
            yield {
                "server": server,
                "conn": conn,
                "client": app.test_client(),
                "worker": procs[0],
                "urls": [f"{files.url}/{r}" for r in refs],
                "model_dir": model_dir,
            }
    finally:
        files.close()
        server.close()


def predict_body(urls: list[str], first_id: int = 1) -> dict:
    tasks = [{"id": first_id + i, "data": {"image": u}} for i, u in enumerate(urls)]
    return {"tasks": tasks, "label_config": CFG, "project": "1.1"}


def predicted(response) -> bool:
    """Every task of a 200 /predict answer has a real prediction."""
    if response.status_code != 200:
        return False
    results = response.get_json()["results"]
    return all(r["result"] and not r["model_version"].endswith("/failed") for r in results)


class Traffic(threading.Thread):
    """Sends /predict, /setup, /webhook and /health in a loop and records every answer."""

    def __init__(self, client, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.client, self.urls = client, urls
        self.stop = threading.Event()
        self.log: list[dict] = []

    def run(self) -> None:
        n = 0
        calls = {
            "predict": lambda: self.client.post("/predict", json=predict_body(self.urls[:2])),
            "setup": lambda: self.client.post("/setup", json={"schema": CFG, "project": "1.1"}),
            "webhook": lambda: self.client.post(
                "/webhook",
                json={
                    "action": "ANNOTATION_UPDATED",
                    "project": {"id": 1},
                    "annotation": {"id": n},
                },
            ),
            "health": lambda: self.client.get("/health"),
        }
        while not self.stop.is_set():
            for name, call in calls.items():
                n += 1
                t0 = time.monotonic()
                r = call()
                self.log.append(
                    {
                        "call": name,
                        "at": t0,
                        "seconds": time.monotonic() - t0,
                        "status": r.status_code,
                        "body": r.get_data(as_text=True),
                        "ok": predicted(r) if name == "predict" else r.status_code == 200,
                    }
                )
            time.sleep(0.05)


def test_redis_stopped_and_restarted_during_traffic(stack):
    client, conn, server = stack["client"], stack["conn"], stack["server"]
    recorded = []
    for i in range(5):
        r = client.post(
            "/webhook",
            json={"action": "ANNOTATION_CREATED", "project": {"id": 7}, "annotation": {"id": i}},
        )
        assert r.status_code == 200
        recorded.append(r.get_json()["event"])
    assert predicted(client.post("/predict", json=predict_body(stack["urls"])))

    traffic = Traffic(client, stack["urls"])
    traffic.start()
    time.sleep(1.0)
    started = StartedJobRegistry(QUEUE_BATCH, connection=conn)
    deadline = time.monotonic() + 20
    while not started.get_job_ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started.get_job_ids(), "no job running"
    stopped_at = time.monotonic()
    server.stop()  # SIGTERM, in the middle of a job: redis-server flushes its AOF and exits
    time.sleep(4.0)
    server.start()
    restarted_at = time.monotonic()
    deadline = restarted_at + 60
    while time.monotonic() < deadline:
        after = [e for e in traffic.log if e["at"] > restarted_at and e["call"] == "predict"]
        if sum(e["ok"] for e in after) >= 3:
            break
        time.sleep(0.2)
    traffic.stop.set()
    traffic.join(timeout=30)
    log = traffic.log

    during = [e for e in log if stopped_at + 0.5 < e["at"] < restarted_at - 0.5]
    assert during, "no request was sent while Redis was down"
    for e in log:
        assert e["status"] in (200, 503), e
        assert "Traceback" not in e["body"], e
        assert e["seconds"] < 15, e  # no hang
    for e in during:
        assert e["status"] == 503 or e["call"] == "health", e
    failed = [e for e in log if e["status"] == 503]
    assert len(failed) >= 3
    for e in failed:
        body = __import__("json").loads(e["body"])
        assert body["error"] == "redis_unavailable" and body["message"], body
    slowest_503 = max(e["seconds"] for e in failed)
    # backend and worker reconnected by themselves
    after = [e for e in log if e["at"] > restarted_at]
    ok_predicts = [e for e in after if e["call"] == "predict" and e["ok"]]
    assert len(ok_predicts) >= 3, [(e["call"], e["status"]) for e in after][-20:]
    recovery = min(e["at"] + e["seconds"] for e in ok_predicts) - restarted_at
    worker_log = stack["worker"].log()
    assert stack["worker"].proc.poll() is None, worker_log[-2000:]
    # mid-job (or between a job and the next dequeue) rq's loop quits and the worker
    # reconnects itself; waiting in its dequeue, rq retries the connection on its own
    ours = "reconnecting to Redis" in worker_log and "Redis is reachable again" in worker_log
    assert ours or "could not connect to Redis instance" in worker_log, worker_log[-3000:]
    last_503 = max(e["at"] for e in failed) - restarted_at
    # events recorded before the stop are still there (AOF)
    ids = {eid.decode() for eid, _ in conn.xrange(EVENTS_STREAM)}
    assert set(recorded) <= ids
    print(
        f"\nRedis down {restarted_at - stopped_at:.1f}s: {len(during)} requests meanwhile, "
        f"{len(failed)} answered 503 (slowest {slowest_503:.2f}s); first full prediction "
        f"{recovery:.1f}s after the restart, last 503 {last_503:+.1f}s from it; "
        f"{len(log)} requests in all"
    )


def test_redis_loses_everything_pointer_recovered_from_promotion_log(stack):
    client, conn = stack["client"], stack["conn"]
    registry = ModelRegistry(stack["model_dir"], None)  # no Redis: the log is the pointer
    expected = registry.promotions()[-1]["version"]
    conn.flushall()
    assert conn.get(POINTER_KEY) is None
    r = client.post("/setup", json={"schema": CFG, "project": "1.1"})
    assert r.status_code == 200 and r.get_json()["model_version"] == expected
    assert conn.get(POINTER_KEY).decode() == expected
    assert client.get("/versions").get_json()["current"] == expected
    # /predict reads the pointer together with the project's host: restored from the log too
    conn.delete(POINTER_KEY)
    # the worker keeps serving on the emptied Redis, with the same version
    deadline = time.monotonic() + 60
    r = None
    while time.monotonic() < deadline:
        r = client.post("/predict", json=predict_body(stack["urls"][2:], first_id=50))
        if predicted(r):
            break
    assert predicted(r), r.get_json()
    assert {p["model_version"] for p in r.get_json()["results"]} == {expected}
    assert conn.get(POINTER_KEY).decode() == expected


def test_retries_with_an_interval_run_without_a_scheduler_process(stack):
    """Pre-annotation pages are retried after an interval (``Retry(interval=...)``): such a
    retry waits in rq's scheduled registry, and the workers (which start no scheduler
    process) must still move it back to its queue when it is due."""
    from rq import Queue, Retry
    from rq.job import JobStatus

    from contracts.jobs import PREDICT_FUNC, QUEUE_BACKGROUND

    conn = stack["conn"]
    queue = Queue(QUEUE_BACKGROUND, connection=conn)
    # a payload of an unknown version: the job fails each time it runs
    job = queue.enqueue(PREDICT_FUNC, {"v": 999}, retry=Retry(max=1, interval=1))
    deadline = time.monotonic() + 45
    statuses = []
    while time.monotonic() < deadline:
        job.refresh()
        status = job.get_status()
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        if status == JobStatus.FAILED and job.retries_left == 0:
            break
        time.sleep(0.1)
    assert job.get_status() == JobStatus.FAILED and job.retries_left == 0, statuses
    assert JobStatus.SCHEDULED in statuses  # it really went through the scheduled registry
    assert "unsupported job payload version 999" in (job.latest_result().exc_string or "")
