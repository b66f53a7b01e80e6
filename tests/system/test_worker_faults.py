"""A worker killed with SIGKILL in the middle of a /predict: its job is retried on the other
worker after the job lease runs out, and every task still gets its prediction."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from rq.job import Job
from rq.registry import StartedJobRegistry

from backend.app import create_app
from contracts.jobs import QUEUE_BATCH
from contracts.settings import Settings
from tests.support.protocol import fixture, red_circle
from tests.support.services import (
    LabelStudioLikeFiles,
    fresh_redis_db,
    png_bytes,
    service_env,
    workers,
)


def test_kill_9_worker_mid_batch_every_task_still_predicted(redis_server, model_dir, tmp_path):
    url, conn = fresh_redis_db(redis_server, 12)
    files = LabelStudioLikeFiles(tmp_path / "files", delay=0.6)  # slow images: long jobs
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
            time.sleep(0.2)  # mid-job: its images are still being fetched
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


LEASE_WORKER = """
import sys, redis
from rq import Queue
from worker.process import AssistWorker
conn = redis.Redis.from_url(sys.argv[1])
w = AssistWorker([Queue(q, connection=conn) for q in sys.argv[3:]], connection=conn)
w.lease = int(sys.argv[2])
w.work(burst=True, with_scheduler=False)
"""


def run_leased_job(redis_url: str, lease: int, queues: list[str], seconds: float, during=None):
    """Run one ``time.sleep(seconds)`` job (one retry allowed) on a burst AssistWorker with
    ``lease``, reaping abandoned jobs every 0.1 s meanwhile, as a waiting backend does;
    ``during(conn, registry, job)`` is called on every pass while the job is running.
    Returns the job, the worker's output and the passes that saw it running."""
    import subprocess
    import sys

    from rq import Queue, Retry

    from contracts.jobs import reap_abandoned
    from tests.support.services import ROOT

    conn = redis.Redis.from_url(redis_url)
    job = Queue(queues[0], connection=conn).enqueue("time.sleep", seconds, retry=Retry(max=1))
    proc = subprocess.Popen(
        [sys.executable, "-c", LEASE_WORKER, redis_url, str(lease), *queues],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = StartedJobRegistry(queues[0], connection=conn)
    running = 0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if job.id in started.get_job_ids(cleanup=False):
            running += 1
            if during is not None:
                during(conn, started, job)
        reap_abandoned(conn, tuple(queues))
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate(timeout=10)[0]
    job.refresh()
    return job, out, running


@contextlib.contextmanager
def registry_changes(conn: redis.Redis, key: str) -> Iterator[list[str]]:
    """The commands that changed the sorted set ``key`` while the block ran, in order, from
    Redis's keyspace notifications (a ZADD that changes no score notifies nothing)."""
    db = conn.connection_pool.connection_kwargs.get("db", 0)
    conn.config_set("notify-keyspace-events", "Kz")
    pubsub = conn.pubsub()
    pubsub.subscribe(f"__keyspace@{db}__:{key}")
    changes: list[str] = []
    try:
        yield changes
        while (m := pubsub.get_message(timeout=0.5)) is not None:
            if m["type"] == "message":
                changes.append(m["data"].decode())
    finally:
        pubsub.close()
        conn.config_set("notify-keyspace-events", "")


@pytest.mark.timeout(180)  # a hang guard
def test_a_job_longer_than_its_lease_keeps_it_and_runs_once(redis_url):
    """The lease (2 s, the shortest allowed) is renewed while the job runs: a backend reaping
    abandoned jobs all along neither retries nor fails a 4 s job; once it has ended, nothing
    of it stays in the started-job registry (no renewal after the end)."""
    from rq.job import JobStatus

    conn = redis.Redis.from_url(redis_url)
    started = StartedJobRegistry("lease-a", connection=conn)
    with registry_changes(conn, started.key) as changes:
        job, out, running = run_leased_job(redis_url, 2, ["lease-a"], 4.0)
        assert out.count("Job OK") == 1, out
        assert job.get_status() == JobStatus.FINISHED and job.retries_left == 1
        assert running > 0
        time.sleep(2.5)  # longer than the lease: a late renewal would have put it back
    assert started.count == 0
    # Redis saw the entry added, its expiry moved on (rq scores whole seconds: the renewals
    # within one second change nothing) at least twice, as a 4 s job on a 2 s lease needs,
    # then removed once the job had ended, and nothing after that
    assert changes[0] == "zadd" and changes[-1] == "zrem", changes
    assert changes.count("zrem") == 1 and changes.count("zadd") >= 3, changes


@pytest.mark.parametrize("queues", [["lease-b"], ["lease-c", "lease-d"]])
def test_a_job_requeued_while_it_still_ran_is_not_run_twice(redis_url, queues):
    """A stalled worker can miss its lease: the registry cleanup then requeues the job while it
    still runs. Once it has finished, its requeued copy is dropped instead of run again (rq
    would run it again, and again: the success of the first run restores its retry count).
    With one queue rq dequeues through an intermediate list: the copy leaves that too."""
    from rq.job import JobStatus

    # The job runs 5 s so that the expiry lands well before it ends even on a loaded machine
    # (if the job had already ended, there would be nothing to requeue).
    def expire_once(conn, started, job):  # as if the renewals had stalled for 15 s
        if not getattr(expire_once, "done", False):
            for member in conn.zrange(started.key, 0, -1):
                conn.zadd(started.key, {member: 1})
            expire_once.done = True

    job, out, running = run_leased_job(redis_url, 15, queues, 5.0, during=expire_once)
    assert running > 0 and expire_once.done
    assert out.count("Job OK") == 1, out
    assert "has already finished; its requeued copy is not run" in out
    assert job.get_status() == JobStatus.FINISHED
    conn = redis.Redis.from_url(redis_url)
    from rq import Queue

    q = Queue(queues[0], connection=conn)
    assert q.count == 0 and conn.llen(q.intermediate_queue_key) == 0


def test_redis_gone_in_the_middle_of_a_job_the_worker_reconnects(model_dir, tmp_path):
    """Redis stops while a production worker runs a job (3 s) and comes back after the job has
    ended (4 s later, on the same port): the worker process survives the job's failed ending,
    reconnects under its name and runs the next job."""
    from rq import Queue
    from rq.job import JobStatus

    from launcher.redis_server import EmbeddedRedis

    server = EmbeddedRedis(data_dir=tmp_path / "redis").start()
    conn = redis.Redis.from_url(server.url)
    try:
        with workers(service_env(server.url, model_dir), conn, 1, tmp_path) as (proc,):
            queue = Queue(QUEUE_BATCH, connection=conn)
            job = queue.enqueue("time.sleep", 3.0)
            started = StartedJobRegistry(QUEUE_BATCH, connection=conn)
            deadline = time.monotonic() + 30
            while job.id not in started.get_job_ids() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert job.id in started.get_job_ids()
            server.stop()
            time.sleep(4.0)
            server.start()
            deadline = time.monotonic() + 60
            while "Redis is reachable again" not in proc.log() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.proc.poll() is None, proc.log()[-2000:]
            assert "reconnecting to Redis" in proc.log(), proc.log()[-2000:]
            assert "Redis is reachable again" in proc.log()
            after = queue.enqueue("time.sleep", 0.1)
            deadline = time.monotonic() + 30
            while after.get_status(refresh=True) != JobStatus.FINISHED:
                assert time.monotonic() < deadline, proc.log()[-2000:]
                time.sleep(0.1)
    finally:
        server.close()


def test_a_job_taken_by_a_worker_that_died_before_starting_it_is_requeued(
    redis_url, model_dir, tmp_path, caplog
):
    """A worker killed between popping a job and starting it leaves the job "queued" in no
    queue, with no lease to expire. The waiting /predict notices it on two checks a second
    apart, puts it back, and a live worker answers it."""
    conn = redis.Redis.from_url(redis_url)
    files = LabelStudioLikeFiles(tmp_path / "files")
    refs = [files.add(f"upload/1/l{i}.png", png_bytes(red_circle(seed=70 + i))) for i in range(3)]
    env = service_env(redis_url, model_dir)
    client = create_app(Settings.from_env(env), conn).test_client()
    cfg = fixture("post_setup.json")["json"]["schema"]
    tasks = [{"id": i + 1, "data": {"image": f"{files.url}/{r}"}} for i, r in enumerate(refs)]
    out: dict = {}
    caller = threading.Thread(
        target=lambda: out.update(
            r=client.post("/predict", json={"tasks": tasks, "label_config": cfg})
        )
    )
    queue_key = f"rq:queue:{QUEUE_BATCH}"
    try:
        with caplog.at_level("WARNING", logger="contracts.jobs"):
            caller.start()
            deadline = time.monotonic() + 10
            while not conn.llen(queue_key) and time.monotonic() < deadline:
                time.sleep(0.01)
            (job_id,) = [j.decode() for j in conn.lrange(queue_key, 0, -1)]
            assert conn.lpop(queue_key).decode() == job_id  # the worker that died after its pop
            with workers(env, conn, 1, tmp_path):
                caller.join(timeout=60)
            assert not caller.is_alive()
    finally:
        files.close()
    results = out["r"].get_json()["results"]
    assert [bool(r["result"]) for r in results] == [True] * 3
    assert all(not r["model_version"].endswith("/failed") for r in results)
    assert f"job {job_id} was taken off {QUEUE_BATCH} by a worker" in caplog.text
