"""The worker side of project-wide pre-annotation runs (see :mod:`contracts.preannotate`): the
run's counters, its write buffer and a diverse run's ordering job. The pages that enqueue a
run's predictions are :mod:`worker.run_pages`."""

from __future__ import annotations

import json
import logging
import secrets
import time
import zlib
from typing import Any

import redis

from contracts import preannotate as runs
from contracts.errors import AssistError
from contracts.untrained import is_untrained
from labelstudio.writeback import PredictionWriter, prediction_of, writable
from worker.diverse_order import ordering, rank_scores, remember
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)


def record(ctx: WorkerContext, run_id: str, **counts: int) -> None:
    """Add to a run's counters (:func:`contracts.preannotate.record`); the call that completes
    the run also points its project at the run's version (:func:`point_project_at_run`)."""
    if runs.record(ctx.redis, run_id, **counts):
        point_project_at_run(ctx, run_id)


def point_project_at_run(ctx: WorkerContext, run_id: str) -> None:
    """Once a run is completed (see :func:`record`): point the project's model version at the
    run's version, so that Label Studio shows the new predictions as pre-labels and fills the
    prediction-score column (sorting by it lists the acquisition order). Not when the run
    wrote nothing, or with ``SAM2UNET_SET_PROJECT_VERSION=false``; a refusal is logged and kept
    in the run's ``project_version_error``, the run stays completed."""
    st = runs.status(ctx.redis, run_id)
    version = st.get("model_version")
    if not ctx.settings.set_project_version or not version or st["done"] <= 0:
        return
    if ctx.ls_client is None:
        return
    try:
        ctx.ls_client.set_project_model_version(st["project"], version)
    except AssistError as e:
        log.warning(
            "pre-annotation %s: could not point project %s at %s: %s",
            run_id,
            st["project"],
            version,
            e.message,
        )
        runs.update(ctx.redis, run_id, project_version_error=e.message)
        return
    runs.update(ctx.redis, run_id, project_model_version=version)
    log.info("pre-annotation %s: project %s now shows %s", run_id, st["project"], version)


# ------------------------------------------------------------------- the run's write buffer
# Predict jobs hold a device batch (SAM2UNET_BATCH_SIZE tasks); Label Studio's bulk import is
# fastest with hundreds per call. A run's predictions therefore wait in a Redis hash (task id
# -> compressed bulk-import item) until SAM2UNET_WRITE_BATCH of them are there, or until every
# task of the run is predicted; one worker at a time (a lock with an expiry) writes them with
# a PredictionWriter scoped by the run, which writes each task at most once, and removes what
# was written or refused. A worker killed while writing leaves the items in the buffer and
# marked pending: the next write looks them up in Label Studio first.
BUFFER_PREFIX = "sam2unet:preannotate:buffer:"
FLUSH_LOCK_PREFIX = "sam2unet:preannotate:flushing:"
FLUSH_LOCK_TTL = 30  # renewed before each bulk call; a killed writer's lock lapses soon
BUFFER_TTL = 2 * 24 * 3600
AUTO_BATCH_MAX = 5000  # predictions per bulk call at most when sized from the run (~10 MB)
ORDER_WRITE_WAIT = 600.0  # the ordering job waits this long for another worker's write
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def after_predict(
    ctx: WorkerContext, run_id: str, results: list[Any], acquired: dict | None = None
) -> None:
    """A run's predict job is done predicting: its results join the run's write buffer, the
    job's tasks are counted, and the buffer is written when full or when the run is
    predicted. ``acquired`` (a ``diverse`` run): each result's (uncertainty, feature), stored
    for the order of the whole run, which is applied before the run's predictions are
    written."""

    todo = writable(results)
    untrained = sum(1 for r in results if is_untrained(r.model_version))
    if acquired is not None:
        remember(
            ctx.redis,
            run_id,
            ((r.task_id, *acquired[r.index]) for r in todo if r.index in acquired),
        )
    buffer_results(ctx.redis, run_id, todo)
    record(
        ctx,
        run_id,
        predicted=len(todo),
        failed=len(results) - len(todo) - untrained,
        skipped=untrained,
    )
    flush(ctx, run_id)


def buffer_results(conn: Any, run_id: str, results: list[Any]) -> None:

    if not results:
        return
    key = BUFFER_PREFIX + run_id
    items = {str(r.task_id): zlib.compress(json.dumps(prediction_of(r)).encode()) for r in results}
    with conn.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=items)
        pipe.expire(key, BUFFER_TTL)
        pipe.execute()


def write_batch_for(configured: int, tasks: int | None) -> int:
    """Predictions per bulk call for a run over ``tasks`` tasks: ``SAM2UNET_WRITE_BATCH``, or
    a fifth of the run's tasks when that is more, up to :data:`AUTO_BATCH_MAX`. Label Studio's
    import recounts every task of the project on each call (3.5 s a call at 10k tasks, 0.4 s
    at 1k, whatever the call's size): calls that grow with the project keep the time per task
    nearly flat (bench.scale: 490 writes/s at 10k tasks in calls of 2000, 145/s in calls of
    500)."""
    batch = max(1, int(configured))
    if tasks:
        batch = max(batch, min(AUTO_BATCH_MAX, int(tasks) // 5))
    return batch


def _held_for_order(conn: Any, run_id: str) -> bool:
    """Whether the run is a ``diverse`` run whose order is not applied yet: its predictions
    wait in the buffer until the ordering job gives them the scores of their ranks."""
    strategy, applied = conn.hmget(runs.RUN_PREFIX + run_id, ["strategy", "order_applied"])
    return strategy == b"diverse" and applied != b"1"


def flush(ctx: WorkerContext, run_id: str, wait: float | None = None) -> int:
    """Write the run's buffered predictions: full batches, or all of them once every task of
    the run is predicted (then waiting up to ``wait`` seconds, default half the job timeout,
    for another worker's write to finish). A ``diverse`` run's predictions wait until every
    task is predicted, which enqueues its ordering job (:func:`order_and_write`) once.
    Returns how many were written by this call."""
    conn = ctx.redis
    key = BUFFER_PREFIX + run_id
    batch = write_batch_for(ctx.settings.write_batch, runs.status(conn, run_id)["total"])
    final = runs.all_predicted(conn, run_id)
    if _held_for_order(conn, run_id):
        if final and runs.enqueue_order(conn, run_id):
            log.info("pre-annotation %s: every task predicted; diverse ordering enqueued", run_id)
        return 0
    if not final and conn.hlen(key) < batch:
        return 0
    lock = FLUSH_LOCK_PREFIX + run_id
    # the holder's name in the lock: which worker is writing
    token = f"{ctx.runtime.worker_name or 'worker'}/{secrets.token_hex(6)}"
    if wait is None:
        wait = max(ctx.settings.job_timeout / 2, FLUSH_LOCK_TTL + 5.0)
    deadline = time.monotonic() + wait
    while not conn.set(lock, token, nx=True, ex=FLUSH_LOCK_TTL):
        if not final or time.monotonic() > deadline:
            return 0  # the worker holding the lock writes what is there
        time.sleep(0.1)
    written = 0
    try:
        while conn.eval(_RENEW, 1, lock, token, FLUSH_LOCK_TTL):
            # the run may have been predicted meanwhile: then the rest is written too
            final = final or runs.all_predicted(conn, run_id)
            n, progressed = write_buffered(ctx, run_id, batch, final)
            written += n
            if not progressed:
                break
    finally:
        conn.eval(_UNLOCK, 1, lock, token)
    record(ctx, run_id)  # completes the run once everything is written or refused
    return written


def order_and_write(ctx: WorkerContext, run_id: str) -> dict[str, Any]:
    """The ordering job of a ``diverse`` run whose every task is predicted: rank the whole run
    (:func:`worker.diverse_order.ordering`), give each buffered prediction the score of its rank,
    then write the buffer in bulk. Without an order (a stored feature missing, Redis refusing),
    the predictions are written with their uncertainty scores and ``ordering`` is
    ``failed``."""

    conn = ctx.redis
    s = ctx.settings
    t0 = time.perf_counter()
    runs.update(conn, run_id, ordering="running", ordered=0)
    try:
        scores = rank_scores(ordering(conn, run_id, s.diverse_batch, s.diverse_depth))
    except (redis.exceptions.RedisError, ValueError) as e:
        log.error(
            "pre-annotation %s: no diverse order, predictions keep their uncertainty scores: %s",
            run_id,
            e,
        )
        scores = None
    else:
        rescored = rescore_buffer(conn, run_id, scores)
        log.info(
            "pre-annotation %s: diverse order of %d task(s) computed and applied to %d "
            "buffered prediction(s) in %.1fs (batches of %d, first %d ranked by diversity)",
            run_id,
            len(scores),
            rescored,
            time.perf_counter() - t0,
            s.diverse_batch,
            min(s.diverse_depth, len(scores)),
        )
    runs.update(conn, run_id, order_applied=1)
    flush(ctx, run_id, wait=ORDER_WRITE_WAIT)
    st = runs.status(conn, run_id)
    ordered = st["done"] if scores is not None else 0
    runs.update(conn, run_id, ordering="done" if scores is not None else "failed", ordered=ordered)
    log.info(
        "pre-annotation %s: diverse order written %d/%d (%d failed) in %.1fs",
        run_id,
        ordered,
        len(scores) if scores is not None else 0,
        st["failed"],
        time.perf_counter() - t0,
    )
    return {"ordered": ordered, "written": st["done"], "failed": st["failed"]}


def rescore_buffer(conn: Any, run_id: str, scores: dict[int, float]) -> int:
    """Give each buffered prediction of the run the score of its rank; how many got one."""
    key = BUFFER_PREFIX + run_id
    n = 0
    chunk: dict[str, bytes] = {}
    for field, value in conn.hscan_iter(key, count=1000):
        task = int(field)
        if task not in scores:
            continue
        item = json.loads(zlib.decompress(value))
        item["score"] = scores[task]
        chunk[field.decode()] = zlib.compress(json.dumps(item).encode())
        if len(chunk) >= 1000:
            conn.hset(key, mapping=chunk)
            n, chunk = n + len(chunk), {}
    if chunk:
        conn.hset(key, mapping=chunk)
        n += len(chunk)
    return n


def write_buffered(ctx: WorkerContext, run_id: str, batch: int, final: bool) -> tuple[int, bool]:
    """One bulk call's worth of the buffer: (written, whether anything left the buffer)."""

    conn = ctx.redis
    key = BUFFER_PREFIX + run_id
    entries: dict[bytes, bytes] = {}
    for field, value in conn.hscan_iter(key, count=batch):
        entries[field] = value
        if len(entries) >= batch:
            break
    if not entries or (len(entries) < batch and not final):
        return 0, False
    preds = [json.loads(zlib.decompress(v)) for v in entries.values()]
    st = runs.status(conn, run_id)
    version = st["model_version"] or preds[0]["model_version"]
    writer = PredictionWriter(ctx.ls_client, conn, batch)
    report = writer.write(st["project"], run_id, preds)
    gone = [str(t) for t in report.written | report.refused]
    if gone:
        conn.hdel(key, *gone)
    written, refused = writer.counts(run_id, version)
    runs.set_written(conn, run_id, written, refused)
    return len(report.written), bool(gone)
