"""Races between processes that share Redis and the model registry: a rollback during a round,
two pre-annotation requests at once, a worker reloading its model between taking a job and
starting it, a version that fails to load once."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest
import redis

from contracts import preannotate as runs
from modelstore.registry import ModelRegistry
from tests.support.services import ROOT, round_settings


def own_registry(model_dir, tmp_path, redis_url):
    """A copy of the session's registry for one test: (its folder, Redis, the registry, the
    current version, the older one)."""
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    conn = redis.Redis.from_url(redis_url)
    registry = ModelRegistry(models, conn)
    current = registry.current()
    (older,) = [v.name for v in registry.versions() if v.name != current]
    return models, conn, registry, current, older


# --------------------------------------------------------------------------- rollback in a round


def test_a_rollback_during_a_round_is_not_undone_by_its_promotion(redis_url, model_dir, tmp_path):
    """An operator rolls back while a round trains from the current version: the round's
    candidate would have been promoted, but its parent is no longer current, so it is recorded
    as superseded (kept on disk, not current) and the rollback stands."""
    from contracts.settings import Settings  # noqa: F401  (settings type of round_settings)
    from modelstore.versions import versions_json
    from sam2unet.synthetic import generate
    from trainer.round import run_round

    models, conn, registry, parent, older = own_registry(model_dir, tmp_path, redis_url)
    # any candidate passes the gate: what is tested is the pointer, not the decision
    settings = round_settings(models, promote_tolerance=1.0)
    samples = [(i + 1, img, m) for i, (img, m) in enumerate(generate(8, 64, seed=3))]
    rolled = []

    def progress(_: object) -> None:  # called while the round trains
        if not rolled:
            ModelRegistry(models, redis.Redis.from_url(redis_url)).rollback(older)  # the CLI's
            rolled.append(older)

    report = run_round(registry, settings, samples, ("object",), project=1, progress=progress)
    assert rolled, "the round reported no progress"
    assert report.parent == parent and report.candidate is not None
    assert registry.current() == older, f"rollback undone: {report.status} {report.candidate}"
    assert report.status == "superseded", report
    assert older in report.reason and parent in report.reason
    assert report.candidate in [v.name for v in registry.versions()]  # kept on disk
    assert [e["version"] for e in registry.promotions()][-1] == older
    (row,) = [r for r in versions_json(registry, settings) if r["version"] == report.candidate]
    assert row["superseded"] and not row["current"] and not row["promoted"]
    # Redis losing the pointer restores the rollback, not the candidate
    conn.delete("sam2unet:registry:current")
    assert ModelRegistry(models, conn).current() == older


# --------------------------------------------------------------------------- two runs at once


def test_concurrent_starts_make_one_run_per_project(redis_url):
    """Eight requests for each of 12 projects, released together: one run per project; every
    caller gets that run's id, and exactly one of them started it."""
    threads_per_project, projects = 8, range(101, 113)
    answers: dict[int, list[tuple[str, bool]]] = {p: [] for p in projects}
    barrier = threading.Barrier(threads_per_project * len(projects))
    errors: list[BaseException] = []

    def start(project: int) -> None:
        conn = redis.Redis.from_url(redis_url)
        try:
            barrier.wait(timeout=30)
            answers[project].append(runs.start_run(conn, project))
        except BaseException as e:  # reported below, with the others
            errors.append(e)
        finally:
            conn.close()

    threads = [
        threading.Thread(target=start, args=(p,))
        for p in projects
        for _ in range(threads_per_project)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    conn = redis.Redis.from_url(redis_url)
    made = {p: [r["id"] for r in runs.list_runs(conn, 1000) if r["project"] == p] for p in projects}
    assert all(len(ids) == 1 for ids in made.values()), {p: len(i) for p, i in made.items()}
    for p in projects:
        assert {run_id for run_id, _ in answers[p]} == set(made[p])
        assert sum(started for _, started in answers[p]) == 1
        # the run's first page job, once
        assert runs.status(conn, made[p][0])["status"] == runs.RUNNING
    pages = [j for j in conn.lrange("rq:queue:sam2unet-background", 0, -1)]
    assert len(pages) == len(projects)


def test_a_finished_run_lets_the_next_one_start(redis_url):
    conn = redis.Redis.from_url(redis_url)
    first, started = runs.start_run(conn, 7)
    assert started
    assert runs.start_run(conn, 7) == (first, False)
    runs.cancel(conn, first)
    second, started = runs.start_run(conn, 7)
    assert started and second != first
    assert runs.start_run(conn, 7) == (second, False)
    # the run's hash gone (expired, or deleted by hand): the project is free again
    conn.delete(runs.RUN_PREFIX + second)
    third, started = runs.start_run(conn, 7)
    assert started and third not in (first, second)


# --------------------------------------------------------------------------- a failed load


@pytest.mark.timeout(120)
def test_a_version_that_failed_to_load_once_is_loaded_when_the_error_clears(
    redis_url, model_dir, tmp_path, caplog
):
    """The current version's file is unreadable when the worker first reloads (a network file
    system hiccup): the worker keeps serving the version it holds, and loads the new one on a
    later job once the file is back, without a restart; the failure is logged once, not per job."""
    from contracts.settings import Settings
    from worker.runtime import ModelRuntime

    models, _, registry, held, older = own_registry(model_dir, tmp_path, redis_url)
    runtime = ModelRuntime(
        Settings(model_size="test", image_size=64, model_dir=models, device="cpu"), registry
    )
    assert runtime.begin_job() == held
    runtime.end_job()

    registry.rollback(older)
    path = registry.model_path(older)
    path.rename(path.with_suffix(".away"))  # the load fails while it is away
    with caplog.at_level("INFO", logger="worker.runtime"):
        for _ in range(5):
            assert runtime.begin_job() == held  # still serving, with the version it holds
            runtime.end_job()
        path.with_suffix(".away").rename(path)
        deadline = time.monotonic() + 30
        while runtime.version != older and time.monotonic() < deadline:
            runtime.begin_job()
            runtime.end_job()
            time.sleep(0.1)
    assert runtime.version == older, "the worker stays pinned to the version it held"
    assert runtime.predictor is not None and runtime.info.name == older
    failures = [r for r in caplog.records if f"cannot load model version {older}" in r.message]
    assert len(failures) == 1, [r.message for r in failures]
    assert f"loaded model version {older}" in caplog.text


# --------------------------------------------------------------------------- a job run twice

RELOADING_WORKER = """
import logging, sys, time, redis
from rq import Queue
from modelstore.registry import ModelRegistry
from contracts.settings import Settings
from worker.process import AssistWorker
from worker.runtime import ModelRuntime

url, models, delay, name, *queues = sys.argv[1:]


class SlowLoads(ModelRegistry):
    slow = False

    def load(self, version, trunk_cache=None):  # a reload from a slow disk
        if self.slow:
            time.sleep(float(delay))
        return super().load(version, trunk_cache=trunk_cache)


logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
conn = redis.Redis.from_url(url)
registry = SlowLoads(models, conn)
settings = Settings(model_size="test", image_size=64, model_dir=models, device="cpu")
runtime = ModelRuntime(settings, registry)
runtime.ensure_current()
registry.slow = True
print("ready with", runtime.version, flush=True)
w = AssistWorker([Queue(q, connection=conn) for q in queues], connection=conn, name=name)
w.lease = 2
w.runtime = runtime if name.endswith("reloading") else None
w.work(max_jobs=1, with_scheduler=False)
"""


def record_run(key: str) -> None:
    """The job: notes which worker ran it."""
    from rq import get_current_job

    job = get_current_job()
    job.connection.rpush(key, job.worker_name or "?")


@pytest.mark.timeout(180)  # a hang guard
def test_a_job_taken_by_a_worker_that_then_reloads_its_model_runs_once(
    redis_url, model_dir, tmp_path
):
    """A worker takes a job and then reloads its model (the pointer moved) before running it;
    the reload takes 8 s, longer than the 2 s lease. Meanwhile a waiting request checks its
    jobs every second (reaping abandoned ones, requeueing lost ones) and another worker is
    idle. The job runs once, on the worker that took it, with the new version."""
    from rq import Queue
    from rq.job import Job, JobStatus

    from contracts.jobs import reap_abandoned, requeue_lost

    models, conn, registry, _, older = own_registry(model_dir, tmp_path, redis_url)
    queues = ["races-interactive", "races-batch"]

    def start(name: str) -> subprocess.Popen:
        args = [sys.executable, "-c", RELOADING_WORKER, redis_url, str(models), "8", name]
        with open(tmp_path / f"{name}.log", "w") as out:
            return subprocess.Popen([*args, *queues], cwd=ROOT, stdout=out, stderr=out)

    def output(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()

    taker = start("worker-reloading")
    other = None
    try:
        deadline = time.monotonic() + 60
        while "ready with" not in output("worker-reloading") and time.monotonic() < deadline:
            assert taker.poll() is None, output("worker-reloading")
            time.sleep(0.1)
        registry.rollback(older)  # the taker reloads before its next job
        job = Queue(queues[1], connection=conn).enqueue(
            "tests.system.test_races.record_run", "races:runs"
        )
        deadline = time.monotonic() + 30
        while conn.llen(f"rq:queue:{queues[1]}") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not conn.llen(f"rq:queue:{queues[1]}"), "the job was not taken"
        other = start("worker-idle")
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while taker.poll() is None and time.monotonic() < deadline:
            reap_abandoned(conn, tuple(queues))  # what a waiting /predict does every second
            requeue_lost(conn, [Job.fetch(job.id, connection=conn)], seen)
            time.sleep(1.0)
        time.sleep(3.0)  # the idle worker's chance to run a copy
    finally:
        for proc in (taker, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
    taker.wait(timeout=10)
    out, out_other = output("worker-reloading"), output("worker-idle") if other else ""
    runs_of = [r.decode() for r in conn.lrange("races:runs", 0, -1)]
    assert runs_of == ["worker-reloading"], (
        f"the job ran {len(runs_of)} times: {runs_of}\n{out[-2000:]}\n{out_other[-2000:]}"
    )
    assert f"loaded model version {older}" in out, out[-3000:]
    assert job.get_status(refresh=True) == JobStatus.FINISHED
