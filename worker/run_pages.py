"""The pages of a pre-annotation run (see :mod:`contracts.preannotate`): each page job reads the
next tasks of the run's project and enqueues predictions for those that need one."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rq import Queue

from contracts import preannotate as runs
from contracts.errors import AssistError
from contracts.jobs import QUEUE_BACKGROUND, PredictItem, enqueue_predict
from labelstudio.labelconfig import Target, parse_label_config, target_to_json
from modelstore.version_heads import untrained_warning
from worker.diverse_order import remember_labelled
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


@dataclass(frozen=True)
class _RunOptions:
    """What a run was started with (kept in its Redis hash)."""

    project: int
    page_size: int
    unlabeled_only: bool
    acquisition: str


@dataclass
class _Page:
    """One page read from Label Studio: its tasks, those holding the version already, and
    whether it is the run's last."""

    version: str
    target: Target
    tasks: list[dict[str, Any]]
    remaining: int | None
    ids: list[int]
    held: set[int]
    last: bool = False


def process_page(ctx: WorkerContext, run_id: str, page: int) -> dict[str, Any]:
    """Read page ``page`` of the run, enqueue predictions for its tasks that need one, then
    enqueue the next page (or, after the last, write what the run's jobs left buffered)."""
    conn = ctx.redis
    if not runs.is_running(conn, run_id):
        return {"skipped": "run not running"}
    if ctx.ls_client is None:
        runs.fail(
            conn, run_id, "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set on the workers"
        )
        return {"error": "no Label Studio API"}
    opts = _run_options(ctx, run_id)
    cursor = _cursor(conn, run_id, page)
    if cursor is None:
        reason = f"page {page} has no cursor: the page before it never completed"
        log.error("pre-annotation %s: %s", run_id, reason)
        runs.fail(conn, run_id, reason)
        return {"error": reason}
    after, read_before = cursor
    try:
        read = _read_page(ctx, run_id, opts, after)
    except _NotRun as e:
        runs.fail(conn, run_id, str(e))
        return {"error": str(e)}
    except AssistError as e:
        if page == 1:
            runs.fail(conn, run_id, e.message)
            return {"error": e.message}
        raise  # a later page: rq retries it
    todo, skipped, labelled = _sort_tasks(ctx, run_id, opts, read)
    runs.update(conn, run_id, **_progress_fields(read, opts, page, read_before))
    if opts.acquisition == "diverse":
        remember_labelled(conn, run_id, labelled)
    _enqueue_predictions(ctx, run_id, opts, read, todo)
    record(ctx, run_id, queued=len(todo), skipped=skipped)
    _save_cursor(conn, run_id, page, read)
    _next_page(ctx, run_id, page, read.last)
    log.info(
        "pre-annotation %s page %d (ids after %d): %d task(s), %d queued, %d already predicted "
        "by %s",
        run_id,
        page,
        after,
        len(read.tasks),
        len(todo),
        skipped,
        read.version,
    )
    return {"tasks": len(read.tasks), "queued": len(todo), "skipped": skipped}


class _NotRun(Exception):
    """The run cannot go on (the reason is the message)."""


def _run_options(ctx: WorkerContext, run_id: str) -> _RunOptions:
    conn = ctx.redis
    key = runs.RUN_PREFIX + run_id
    project = runs.status(conn, run_id)["project"]
    page_size = int(conn.hget(key, "page_size") or 1000)
    unlabeled_only = (conn.hget(key, "unlabeled_only") or b"1") == b"1"
    acquisition = (conn.hget(key, "acquisition") or b"").decode()
    return _RunOptions(project, page_size, unlabeled_only, acquisition or ctx.settings.acquisition)


def _read_page(ctx: WorkerContext, run_id: str, opts: _RunOptions, after: int) -> _Page:
    """The page's tasks after id ``after`` with the project's target, and which of them hold
    a prediction of the current version already (a run after a restart does only what is
    left). Raises :class:`_NotRun` when the version's automatic head was never trained."""
    version = ctx.runtime.ensure_current()
    if not ctx.runtime.decoder_trained and ctx.runtime.info is not None:
        # nothing but noise to write: the run stops with the reason instead
        reason = untrained_warning(ctx.runtime.info)
        log.warning("pre-annotation %s not run: %s", run_id, reason)
        raise _NotRun(reason)
    client = ctx.ls_client
    target = parse_label_config(client.get_project(opts.project)["label_config"])
    tasks, remaining = client.task_page(
        opts.project, 1, opts.page_size, include=RUN_FIELDS, query=after_id_query(after)
    )
    ids = [t["id"] for t in tasks if isinstance(t.get("id"), int)]
    held = (
        client.tasks_with_prediction_between(opts.project, version, ids[0], ids[-1])
        if ids
        else set()
    )
    last = (
        not ids
        or len(tasks) < opts.page_size
        or (isinstance(remaining, int) and len(tasks) >= remaining)
    )
    return _Page(version, target, tasks, remaining, ids, held, last)


def _progress_fields(read: _Page, opts: _RunOptions, page: int, read_before: int) -> dict[str, Any]:
    """The run's fields after this page: its version, pages, strategy and (known) total."""
    fields: dict[str, Any] = {
        "model_version": read.version,
        "pages": page,
        "strategy": opts.acquisition,
    }
    if read.last:
        fields["total"] = read_before + len(read.tasks)
    elif isinstance(read.remaining, int):
        fields["total"] = read_before + read.remaining  # so far: tasks may come and go
    return fields


def _sort_tasks(
    ctx: WorkerContext, run_id: str, opts: _RunOptions, read: _Page
) -> tuple[list[PredictItem], int, list[int]]:
    """(the page's tasks to predict, how many are skipped, the ids of labelled tasks); a task
    without an image URL is counted failed."""
    todo, skipped, labelled = [], 0, []
    for i, task in enumerate(read.tasks):
        if is_labeled(task) and isinstance(task.get("id"), int):
            labelled.append(task["id"])
        url = (task.get("data") or {}).get(read.target.value_key)
        if task.get("id") in read.held or (opts.unlabeled_only and is_labeled(task)):
            skipped += 1
        elif not isinstance(url, str) or not url:
            record(ctx, run_id, failed=1)
        else:
            todo.append(PredictItem(index=i, url=url, task_id=task.get("id")))
    return todo, skipped, labelled


def _enqueue_predictions(
    ctx: WorkerContext, run_id: str, opts: _RunOptions, read: _Page, todo: list[PredictItem]
) -> None:
    enqueue_predict(
        Queue(QUEUE_BACKGROUND, connection=ctx.redis),
        todo,
        ctx.settings,
        f"pre-annotation {run_id}",
        target=target_to_json(read.target),
        reply_key=None,
        project=opts.project,
        model_version=read.version,
        write_back=True,
        run_id=run_id,
        acquisition=opts.acquisition,
    )


def _save_cursor(conn: Any, run_id: str, page: int, read: _Page) -> None:
    """Keep how many tasks the page read and, unless it is the last, where the next starts."""
    cursor_key = CURSOR_PREFIX + run_id
    with conn.pipeline(transaction=True) as pipe:
        pipe.hset(cursor_key, f"n:{page}", len(read.tasks))
        if not read.last:
            pipe.hset(cursor_key, f"after:{page + 1}", read.ids[-1])
        pipe.expire(cursor_key, runs.RUN_TTL)
        pipe.execute()


def _next_page(ctx: WorkerContext, run_id: str, page: int, last: bool) -> None:
    """Enqueue the next page; after the last, the run's predict jobs may all be done already:
    what they left in the write buffer is written now (or a diverse run's order starts), and
    the run completes when every task is accounted for."""
    if last:
        runs.update(ctx.redis, run_id, paged=1)
        flush(ctx, run_id, wait=0)
    else:
        runs.enqueue_page(ctx.redis, run_id, page + 1)
