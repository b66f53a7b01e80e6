"""Sections 2 to 4: pre-annotation through the Flask app, Redis and real worker processes.

Requests go through ``create_app(settings).test_client()`` (the whole /predict route:
parsing, :class:`backend.predict.PredictService`, enqueueing, waiting on the reply list);
workers are ``python -m bench.worker`` subprocesses; images come from a loopback HTTP server.

Times of one job, all wall-clock on this machine: ``enqueued`` (rq's stamp), ``start`` and
``work_end`` (the job function began / finished computing, from the worker's timers),
``reply`` (the backend popped the job's reply). Queue time in = start - enqueued; queue time
out = reply - work_end (reply push, wake-up).
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timezone
from typing import Any

import redis
from flask.testing import FlaskClient

from bench.measure import summary
from bench.stack import LABEL_CONFIG
from bench.worker import ECHO_FUNC, ECHO_QUEUE, RAW_FORWARD_FUNC, STAGES_PREFIX

log = logging.getLogger(__name__)

# worker-side stages of one job, in pipeline order (seconds, summed over the job's images)
WORK_STAGES = ("fetch", "decode", "preprocess", "model", "upsample", "threshold_score", "rle")


@contextmanager
def reply_clock() -> Iterator[dict[str, float]]:
    """While active: job id -> wall-clock time the backend received that job's reply."""
    import backend.predict as predict_mod

    original = predict_mod.decode_reply
    seen: dict[str, float] = {}

    def timed(raw: bytes | str):  # type: ignore[no-untyped-def]
        job_id, items = original(raw)
        seen[job_id] = time.time()
        return job_id, items

    predict_mod.decode_reply = timed
    try:
        yield seen
    finally:
        predict_mod.decode_reply = original


def predict_body(urls: list[str], first_id: int = 1) -> dict[str, Any]:
    """A Label Studio /predict body for one task per image URL."""
    return {
        "tasks": [{"id": first_id + i, "data": {"image": u}} for i, u in enumerate(urls)],
        "label_config": LABEL_CONFIG,
        "project": "1.1700000000",
        "params": {"context": None},
    }


def post_predict(client: FlaskClient, urls: list[str]) -> dict[str, Any]:
    """POST /predict; the answer with its wall-clock start/end and duration."""
    t0, p0 = time.time(), time.perf_counter()
    r = client.post("/predict", json=predict_body(urls))
    seconds = time.perf_counter() - p0
    if r.status_code != 200:
        raise RuntimeError(f"/predict answered {r.status_code}: {r.get_data(as_text=True)[:500]}")
    results = r.get_json()["results"]
    failed = sum(1 for x in results if x["model_version"].endswith("/failed"))
    return {"t0": t0, "t1": t0 + seconds, "seconds": seconds, "results": results, "failed": failed}


def job_stats(
    conn: redis.Redis, replies: dict[str, float], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Per job of ``replies``: the worker's stage seconds and the wall-clock stamps, sorted
    by start. Derived stages: ``upsample`` (the rest of ``Predictor.predict``: upsampling to
    the image size, copy out) and ``threshold_score`` (encoding minus RLE)."""
    from rq.job import Job

    ids = list(replies)
    deadline = time.monotonic() + timeout
    raw: list[Any] = [None] * len(ids)
    while True:
        raw = conn.mget([STAGES_PREFIX + i for i in ids]) if ids else []
        if all(x is not None for x in raw) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    jobs = Job.fetch_many(ids, connection=conn)
    out = []
    for job_id, blob, job in zip(ids, raw, jobs, strict=True):
        if blob is None or job is None:
            log.warning("no stage times for job %s", job_id)
            continue
        s = json.loads(blob)
        enq = job.enqueued_at
        if enq.tzinfo is None:
            enq = enq.replace(tzinfo=timezone.utc)
        s["enqueued"] = enq.timestamp()
        s["reply"] = replies[job_id]
        # fetch: the wall time of the job's (parallel) fetch phase when the pool was timed
        s["fetch_sum"] = s["fetch"]
        s["fetch"] = s.get("fetch_wall", s["fetch"])
        s.setdefault("preprocess", 0.0)
        s.setdefault("model", 0.0)
        s.setdefault("rle", 0.0)
        s["upsample"] = max(0.0, s["predict"] - s["preprocess"] - s["model"])
        s["threshold_score"] = max(0.0, s["encode"] - s["rle"])
        out.append(s)
    return sorted(out, key=lambda s: s["start"])


def single_task_runs(
    client: FlaskClient, conn: redis.Redis, urls: list[str]
) -> list[dict[str, Any]]:
    """One 1-task /predict after another; per request its stages and queue times (seconds)."""
    runs = []
    for url in urls:
        with reply_clock() as replies:
            r = post_predict(client, [url])
        if r["failed"]:
            raise RuntimeError(f"the task of {url} failed: {r['results']}")
        (s,) = job_stats(conn, replies)
        run = {stage: s[stage] for stage in WORK_STAGES}
        run.update(
            total=r["seconds"],
            backend_in=s["enqueued"] - r["t0"],
            queue_in=s["start"] - s["enqueued"],
            work=s["work_end"] - s["start"],
            queue_out=s["reply"] - s["work_end"],
            backend_out=r["t1"] - s["reply"],
        )
        run["job_other"] = run["work"] - sum(s[k] for k in WORK_STAGES)
        run["overhead"] = run["total"] - sum(run[k] for k in WORK_STAGES)
        runs.append(run)
    return runs


def stage_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per key of the runs: n, mean, p50, p90, p99, min, max in milliseconds."""
    return {k: summary([r[k] for r in runs], 1000.0) for k in runs[0]} if runs else {}


def throughput_run(
    client: FlaskClient, conn: redis.Redis, urls: list[str], batch: int
) -> dict[str, Any]:
    """All ``urls`` as one /predict request: the backend splits it into jobs of ``batch``
    tasks, enqueued at once; the worker(s) drain them back to back."""
    with reply_clock() as replies:
        r = post_predict(client, urls)
    jobs = job_stats(conn, replies)
    n = len(urls)
    per_task = {k: sum(j[k] for j in jobs) / n for k in WORK_STAGES}
    work = sum(j["work_end"] - j["start"] for j in jobs)
    gaps = []  # per worker: from one job's end of work to the start of its next job
    for pid in {j["pid"] for j in jobs}:
        mine = [j for j in jobs if j["pid"] == pid]
        gaps += [b["start"] - a["work_end"] for a, b in itertools.pairwise(mine)]
    per_task["job_other"] = (work - sum(sum(j[k] for k in WORK_STAGES) for j in jobs)) / n
    lead = jobs[0]["start"] - r["t0"] if jobs else 0.0
    tail = r["t1"] - max(j["work_end"] for j in jobs) if jobs else 0.0
    per_task["queue_between_jobs"] = sum(gaps) / n
    per_task["request_lead_tail"] = (lead + tail) / n
    return {
        "tasks": n,
        "jobs": len(jobs),
        "failed": r["failed"],
        "seconds": r["seconds"],
        "images_per_s": n / r["seconds"],
        "work_seconds": work,
        "gap_ms": summary(gaps, 1000.0),
        "lead_s": lead,
        "tail_s": tail,
        "per_task_ms": {k: v * 1000.0 for k, v in per_task.items()},
        "model_seconds": sum(j["model"] for j in jobs),
    }


def raw_forward_in_worker(
    conn: redis.Redis, batch: int, repeats: int, warmup: int, timeout: float = 7200.0
) -> dict[str, Any]:
    """:func:`bench.worker.raw_forward` run by one of the workers on ``conn``."""
    from rq import Queue
    from rq.job import JobStatus

    from contracts.jobs import QUEUE_INTERACTIVE

    job = Queue(QUEUE_INTERACTIVE, connection=conn).enqueue(
        RAW_FORWARD_FUNC, batch, repeats, warmup, job_timeout=int(timeout), result_ttl=600
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.get_status(refresh=True)
        if status == JobStatus.FINISHED:
            return job.return_value()
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            raise RuntimeError(f"the raw forward job ended {status}")
        time.sleep(0.2)
    raise TimeoutError("the raw forward job did not finish")


def rq_echo_round_trips(conn: redis.Redis, n: int, warmup: int = 5) -> list[float]:
    """Seconds from enqueueing a bare rq job to popping the reply it pushes."""
    from rq import Queue

    q = Queue(ECHO_QUEUE, connection=conn)
    out = []
    for i in range(n + warmup):
        key = f"bench:echo:{i}"
        t0 = time.perf_counter()
        q.enqueue(ECHO_FUNC, key, result_ttl=60)
        got = conn.blpop([key], timeout=30)
        dt = time.perf_counter() - t0
        if got is None:
            raise RuntimeError("the rq echo worker did not answer within 30 s")
        if i >= warmup:
            out.append(dt)
    return out


def mean_ms(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs) * 1000.0 if runs else float("nan")
