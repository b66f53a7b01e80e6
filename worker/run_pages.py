"""The pages of a pre-annotation run (see :mod:`contracts.preannotate`): each page job reads the
next tasks of the run's project and enqueues predictions for those that need one."""

from __future__ import annotations

import logging
from typing import Any

from rq import Queue

from contracts import preannotate as runs
from contracts.errors import AssistError
from contracts.jobs import QUEUE_BACKGROUND, PredictItem, enqueue_predict
from labelstudio.labelconfig import parse_label_config, target_to_json
from modelstore.version_heads import untrained_warning
from worker.preannotate import flush, record
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)


def is_labeled(task: dict[str, Any]) -> bool:
    """Whether the task already has a submitted (not cancelled) annotation."""
    if task.get("is_labeled"):
        return True
    total = task.get("total_annotations") or 0
    cancelled = task.get("cancelled_annotations") or 0
    return isinstance(total, int) and isinstance(cancelled, int) and total - cancelled > 0


# A run reads its project's tasks in order of task id, each page the next ``page_size`` tasks
# after the last id of the page before (a data manager filter ``id > cursor`` ordered by id),
# with only the fields the run needs: a task deleted or added while the run goes on shifts no
# other task out of a page, so every task present when the run started is read exactly once.
# The cursor of each page is kept under the run (CURSOR_PREFIX), so that a retried page job
# reads the same page.
CURSOR_PREFIX = "sam2unet:preannotate:cursor:"
RUN_FIELDS = ("id", "data", "is_labeled", "total_annotations", "cancelled_annotations")


def after_id_query(after: int) -> dict[str, Any]:
    """The data manager query of the tasks after task id ``after``, in order of id."""
    return {
        "filters": {
            "conjunction": "and",
            "items": [
                {
                    "filter": "filter:tasks:id",
                    "operator": "greater",
                    "type": "Number",
                    "value": after,
                }
            ],
        },
        "ordering": ["tasks:id"],
    }


def _cursor(conn: Any, run_id: str, page: int) -> tuple[int, int] | None:
    """(the id page ``page`` reads after, tasks read by the pages before it); None when the
    page before it was never completed."""
    if page == 1:
        return 0, 0
    raw = conn.hgetall(CURSOR_PREFIX + run_id)
    after = raw.get(f"after:{page}".encode())
    if after is None:
        return None
    before = sum(int(v) for k, v in raw.items() if k.startswith(b"n:") and int(k[2:]) < page)
    return int(after), before


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
    page_size = int(conn.hget(runs.RUN_PREFIX + run_id, "page_size") or 1000)
    unlabeled_only = (conn.hget(runs.RUN_PREFIX + run_id, "unlabeled_only") or b"1") == b"1"
    acquisition = (conn.hget(runs.RUN_PREFIX + run_id, "acquisition") or b"").decode()
    acquisition = acquisition or ctx.settings.acquisition
    cursor = _cursor(conn, run_id, page)
    if cursor is None:
        reason = f"page {page} has no cursor: the page before it never completed"
        log.error("pre-annotation %s: %s", run_id, reason)
        runs.fail(conn, run_id, reason)
        return {"error": reason}
    after, read_before = cursor
    try:
        version = ctx.runtime.ensure_current()
        if not ctx.runtime.decoder_trained and ctx.runtime.info is not None:
            # nothing but noise to write: the run stops with the reason instead
            reason = untrained_warning(ctx.runtime.info)
            log.warning("pre-annotation %s not run: %s", run_id, reason)
            runs.fail(conn, run_id, reason)
            return {"error": reason}
        target = parse_label_config(ctx.ls_client.get_project(project)["label_config"])
        tasks, remaining = ctx.ls_client.task_page(
            project, 1, page_size, include=RUN_FIELDS, query=after_id_query(after)
        )
        ids = [t["id"] for t in tasks if isinstance(t.get("id"), int)]
        # which of the page's tasks hold a prediction of the version already (a run after a
        # restart does only what is left)
        held = (
            ctx.ls_client.tasks_with_prediction_between(project, version, ids[0], ids[-1])
            if ids
            else set()
        )
    except AssistError as e:
        if page == 1:
            runs.fail(conn, run_id, e.message)
            return {"error": e.message}
        raise  # a later page: rq retries it
    last = (
        not ids
        or len(tasks) < page_size
        or (isinstance(remaining, int) and len(tasks) >= remaining)
    )
    fields: dict[str, Any] = {"model_version": version, "pages": page, "strategy": acquisition}
    if last:
        fields["total"] = read_before + len(tasks)
    elif isinstance(remaining, int):
        fields["total"] = read_before + remaining  # so far: tasks may come and go
    todo, skipped, labelled = [], 0, []
    for i, task in enumerate(tasks):
        if is_labeled(task) and isinstance(task.get("id"), int):
            labelled.append(task["id"])
        url = (task.get("data") or {}).get(target.value_key)
        if task.get("id") in held or (unlabeled_only and is_labeled(task)):
            skipped += 1
        elif not isinstance(url, str) or not url:
            record(ctx, run_id, failed=1)
        else:
            todo.append(PredictItem(index=i, url=url, task_id=task.get("id")))
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
    cursor_key = CURSOR_PREFIX + run_id
    with conn.pipeline(transaction=True) as pipe:
        pipe.hset(cursor_key, f"n:{page}", len(tasks))
        if not last:
            pipe.hset(cursor_key, f"after:{page + 1}", ids[-1])
        pipe.expire(cursor_key, runs.RUN_TTL)
        pipe.execute()
    if last:
        runs.update(conn, run_id, paged=1)
        # the run's predict jobs may all be done already: what they left in the write buffer
        # is written now (or a diverse run's order starts), and the run completes when every
        # task is accounted for
        flush(ctx, run_id, wait=0)
    else:
        runs.enqueue_page(conn, run_id, page + 1)
    log.info(
        "pre-annotation %s page %d (ids after %d): %d task(s), %d queued, %d already predicted "
        "by %s",
        run_id,
        page,
        after,
        len(tasks),
        len(todo),
        skipped,
        version,
    )
    return {"tasks": len(tasks), "queued": len(todo), "skipped": skipped}
