"""The worker side of project-wide pre-annotation runs (see :mod:`contracts.preannotate`)."""

from __future__ import annotations

import json
import logging
import secrets
import time
import zlib
from typing import Any

from rq import Queue

from contracts import preannotate as runs
from contracts.errors import AssistError
from contracts.heads import untrained_warning
from contracts.jobs import (
    QUEUE_BACKGROUND,
    PredictItem,
    enqueue_predict,
)
from labelstudio.labelconfig import parse_label_config, target_to_json
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)


def is_labeled(task: dict[str, Any]) -> bool:
    """Whether the task already has a submitted (not cancelled) annotation."""
    if task.get("is_labeled"):
        return True
    total = task.get("total_annotations") or 0
    cancelled = task.get("cancelled_annotations") or 0
    return isinstance(total, int) and isinstance(cancelled, int) and total - cancelled > 0


def has_prediction_of(task: dict[str, Any], version: str) -> bool:
    """Whether Label Studio already holds a prediction of ``version`` for the task."""
    for p in task.get("predictions") or []:
        if isinstance(p, dict) and p.get("model_version") == version:
            return True
    return False


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


def process_page(ctx: WorkerContext, run_id: str, page: int) -> dict[str, Any]:
    conn = ctx.redis
    if not runs.is_running(conn, run_id):
        return {"skipped": "run not running"}
    if ctx.ls_client is None:
        runs.fail(
            conn, run_id, "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set on the workers"
        )
        return {"error": "no Label Studio API"}
    st = runs.status(conn, run_id)
    project = st["project"]
    page_size = int(conn.hget(runs.RUN_PREFIX + run_id, "page_size") or 100)
    unlabeled_only = (conn.hget(runs.RUN_PREFIX + run_id, "unlabeled_only") or b"1") == b"1"
    acquisition = (conn.hget(runs.RUN_PREFIX + run_id, "acquisition") or b"").decode()
    acquisition = acquisition or ctx.settings.acquisition
    try:
        version = ctx.runtime.ensure_current()
        if not ctx.runtime.decoder_trained and ctx.runtime.info is not None:
            # nothing but noise to write: the run stops with the reason instead
            reason = untrained_warning(ctx.runtime.info)
            log.warning("pre-annotation %s not run: %s", run_id, reason)
            runs.fail(conn, run_id, reason)
            return {"error": reason}
        target = parse_label_config(ctx.ls_client.get_project(project)["label_config"])
        r = ctx.ls_client.request(
            "GET",
            "/api/tasks",
            params={"project": project, "page": page, "page_size": page_size, "fields": "all"},
            ok=(200, 404),
        )
    except AssistError as e:
        if page == 1:
            runs.fail(conn, run_id, e.message)
            return {"error": e.message}
        raise  # a later page: rq retries it
    body = r.json() if r.status_code == 200 else {"tasks": [], "total": None}
    tasks = body.get("tasks", []) if isinstance(body, dict) else body
    total = body.get("total") if isinstance(body, dict) else None
    fields: dict[str, Any] = {"model_version": version, "pages": page, "strategy": acquisition}
    if isinstance(total, int):
        fields["total"] = total
    last = (
        not tasks
        or len(tasks) < page_size
        or (isinstance(total, int) and (page - 1) * page_size + len(tasks) >= total)
    )
    todo, skipped, labelled = [], 0, []
    for i, task in enumerate(tasks):
        if is_labeled(task) and isinstance(task.get("id"), int):
            labelled.append(task["id"])
        url = (task.get("data") or {}).get(target.value_key)
        if has_prediction_of(task, version) or (unlabeled_only and is_labeled(task)):
            skipped += 1
        elif not isinstance(url, str) or not url:
            record(ctx, run_id, failed=1)
        else:
            todo.append(PredictItem(index=i, url=url, task_id=task.get("id")))
    if not isinstance(total, int) and last:
        fields["total"] = (page - 1) * page_size + len(tasks)
    runs.update(conn, run_id, **fields)
    if acquisition == "diverse":
        from worker.run_order import remember_labelled

        remember_labelled(conn, run_id, labelled)
    queue = Queue(QUEUE_BACKGROUND, connection=conn)
    enqueue_predict(
        queue,
        todo,
        ctx.settings,
        f"pre-annotation {run_id}",
        target=target_to_json(target),
        reply_key=None,
        project=project,
        model_version=version,
        write_back=True,
        run_id=run_id,
        acquisition=acquisition,
    )
    record(ctx, run_id, queued=len(todo), skipped=skipped)
    if last:
        runs.update(conn, run_id, paged=1)
        record(ctx, run_id)  # nothing to add: completes the run if every task is accounted for
    else:
        runs.enqueue_page(conn, run_id, page + 1)
    log.info(
        "pre-annotation %s page %d: %d task(s), %d queued, %d already predicted by %s",
        run_id,
        page,
        len(tasks),
        len(todo),
        skipped,
        version,
    )
    return {"tasks": len(tasks), "queued": len(todo), "skipped": skipped}


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
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def after_predict(ctx: WorkerContext, run_id: str, results: list[Any]) -> None:
    """A run's predict job is done predicting: its results join the run's write buffer, the
    job's tasks are counted, and the buffer is written when full or when the run is
    predicted."""
    from contracts.heads import is_untrained
    from labelstudio.writeback import writable

    todo = writable(results)
    untrained = sum(1 for r in results if is_untrained(r.model_version))
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
    from labelstudio.writeback import prediction_of

    if not results:
        return
    key = BUFFER_PREFIX + run_id
    items = {str(r.task_id): zlib.compress(json.dumps(prediction_of(r)).encode()) for r in results}
    with conn.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=items)
        pipe.expire(key, BUFFER_TTL)
        pipe.execute()


def flush(ctx: WorkerContext, run_id: str, wait: float | None = None) -> int:
    """Write the run's buffered predictions: full batches, or all of them once every task of
    the run is predicted (then waiting up to ``wait`` seconds, default half the job timeout,
    for another worker's write to finish). Returns how many were written by this call."""
    conn = ctx.redis
    key = BUFFER_PREFIX + run_id
    batch = max(1, ctx.settings.write_batch)
    final = runs.all_predicted(conn, run_id)
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
            n, progressed = write_buffered(ctx, run_id, batch, final)
            written += n
            if not progressed:
                break
    finally:
        conn.eval(_UNLOCK, 1, lock, token)
    record(ctx, run_id)  # completes the run once everything is written or refused
    return written


def write_buffered(ctx: WorkerContext, run_id: str, batch: int, final: bool) -> tuple[int, bool]:
    """One bulk call's worth of the buffer: (written, whether anything left the buffer)."""
    from labelstudio.writeback import PredictionWriter

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
