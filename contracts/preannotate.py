"""Project-wide pre-annotation runs, beyond Label Studio's 100 s /predict limit.

A run pages through a project's tasks with the Label Studio API (one small job per page, so no
worker is held for the whole run), skips tasks that already have a prediction of the current
model version, and enqueues prediction jobs whose results the workers write back through
``POST /api/predictions``. Its state lives in a Redis hash; everything it does is idempotent, so
after a restart a new run of the same project only does what is left.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import redis
from rq import Queue, Retry

from contracts.errors import NotFound
from contracts.jobs import QUEUE_BACKGROUND

log = logging.getLogger(__name__)

RUN_PREFIX = "sam2unet:preannotate:run:"
ACTIVE_PREFIX = "sam2unet:preannotate:active:"
RUNS_KEY = "sam2unet:preannotate:runs"
PAGE_FUNC = "worker.jobs.preannotate_page"
ORDER_FUNC = "worker.jobs.preannotate_order"
RUN_TTL = 30 * 24 * 3600
ORDER_TIMEOUT = 3600

RUNNING, COMPLETED, CANCELLED, FAILED = "running", "completed", "cancelled", "failed"


def _key(run_id: str) -> str:
    return RUN_PREFIX + run_id


# The active run of a project, or a new one made its active run, in one step. Returns the
# active run's id, or nil when the new run was made.
_START_LUA = """
local active = redis.call('GET', KEYS[1])
if active and redis.call('HGET', ARGV[1] .. active, 'status') == ARGV[5] then
  return active
end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return nil
"""


def start_run(
    conn: redis.Redis,
    project: int,
    *,
    page_size: int = 1000,
    reason: str = "requested",
    job_timeout: int = 300,
    unlabeled_only: bool = True,
    acquisition: str | None = None,
) -> tuple[str, bool]:
    """Start pre-annotating ``project``, or return its run in progress: (run id, started).
    Atomic: of concurrent calls for one project, one starts a run and the others get its id.

    With ``unlabeled_only`` (the default), tasks that already have a submitted annotation are
    skipped: their label is known, a prediction would only be noise for annotators."""
    run_id = f"{project}-{int(time.time())}-{secrets.token_hex(3)}"
    now = time.time()
    fields = {
        "id": run_id,
        "project": project,
        "status": RUNNING,
        "reason": reason,
        "created_at": now,
        "updated_at": now,
        "total": -1,
        "pages": 0,
        "paged": 0,
        "queued": 0,
        "done": 0,
        "failed": 0,
        "skipped": 0,
        "error": "",
        "model_version": "",
        "page_size": page_size,
        "unlabeled_only": int(bool(unlabeled_only)),
        "acquisition": acquisition or "",
    }
    flat = [str(x) for kv in fields.items() for x in kv]
    # one script: two requests at once never both see "no active run" and make two
    active = conn.eval(
        _START_LUA,
        3,
        ACTIVE_PREFIX + str(project),
        _key(run_id),
        RUNS_KEY,
        RUN_PREFIX,
        run_id,
        RUN_TTL,
        now,
        RUNNING,
        *flat,
    )
    if active is not None:
        log.info("pre-annotation of project %s: run %s is in progress", project, active.decode())
        return active.decode(), False
    enqueue_page(conn, run_id, 1, job_timeout)
    return run_id, True


def enqueue_page(conn: redis.Redis, run_id: str, page: int, job_timeout: int = 300) -> None:
    Queue(QUEUE_BACKGROUND, connection=conn).enqueue(
        PAGE_FUNC,
        run_id,
        page,
        job_timeout=job_timeout,
        result_ttl=600,
        failure_ttl=24 * 3600,
        retry=Retry(max=3, interval=[5, 30, 120]),
        description=f"pre-annotation {run_id} page {page}",
    )


def _field(conn: redis.Redis, run_id: str, name: str) -> str | None:
    v = conn.hget(_key(run_id), name)
    return v.decode() if v is not None else None


def _num(d: dict[str, str], name: str) -> float:
    try:
        return float(d.get(name, 0))
    except ValueError:
        return 0.0


def status(conn: redis.Redis, run_id: str) -> dict[str, Any]:
    """Progress of a run: counts, rate (tasks/s), ETA (s) and state."""
    raw = conn.hgetall(_key(run_id))
    if not raw:
        raise NotFound(f"no pre-annotation run {run_id!r}")
    d = {k.decode(): v.decode() for k, v in raw.items()}
    total = int(_num(d, "total"))
    done, failed, skipped = (int(_num(d, k)) for k in ("done", "failed", "skipped"))
    failed += int(_num(d, "write_failed"))
    elapsed = max(
        1e-6,
        (time.time() if d["status"] == RUNNING else _num(d, "updated_at")) - _num(d, "created_at"),
    )
    finished = done + failed + skipped
    remaining = max(0, total - finished) if total >= 0 else None
    rate = done / elapsed
    eta = (remaining / rate) if (remaining is not None and rate > 0) else None
    return {
        "id": run_id,
        "project": int(_num(d, "project")),
        "status": d["status"],
        "model_version": d.get("model_version") or None,
        "total": total if total >= 0 else None,
        "done": done,
        "failed": failed,
        "skipped": skipped,
        "queued": int(_num(d, "queued")),
        "remaining": remaining,
        "rate": round(rate, 3),
        "eta_seconds": None if eta is None else round(eta, 1),
        "elapsed_seconds": round(elapsed, 1),
        "error": d.get("error") or None,
        "reason": d.get("reason"),
        "acquisition": d.get("strategy") or d.get("acquisition") or None,
        # diverse runs: pending, running, done or failed; how many scores were rewritten
        "ordering": d.get("ordering") or None,
        "ordered": int(_num(d, "ordered")),
    }


def cancel(conn: redis.Redis, run_id: str) -> dict[str, Any]:
    """Stop a run: pages not yet read are not read, queued jobs of the run do nothing."""
    if not conn.exists(_key(run_id)):
        raise NotFound(f"no pre-annotation run {run_id!r}")
    if _field(conn, run_id, "status") == RUNNING:
        conn.hset(_key(run_id), mapping={"status": CANCELLED, "updated_at": time.time()})
    return status(conn, run_id)


def list_runs(conn: redis.Redis, limit: int = 50) -> list[dict[str, Any]]:
    out = []
    for run_id in conn.zrevrange(RUNS_KEY, 0, limit - 1):
        try:
            out.append(status(conn, run_id.decode()))
        except NotFound:
            conn.zrem(RUNS_KEY, run_id)
    return out


def is_running(conn: redis.Redis, run_id: str) -> bool:
    return _field(conn, run_id, "status") == RUNNING


def record(conn: redis.Redis, run_id: str, **increments: int) -> bool:
    """Add to a run's counters; mark it completed when every task is accounted for (True when
    this call did)."""
    key = _key(run_id)
    with conn.pipeline() as pipe:
        for name, n in increments.items():
            if n:
                pipe.hincrby(key, name, n)
        pipe.hset(key, "updated_at", time.time())
        pipe.execute()
    return maybe_complete(conn, run_id)


def maybe_complete(conn: redis.Redis, run_id: str) -> bool:
    """Mark the run completed when every task is accounted for; True for the one call that
    did. (A ``diverse`` run's order is computed and applied before its predictions are
    written, by :data:`ORDER_FUNC`: see :func:`enqueue_order`.)"""
    d = {k.decode(): v.decode() for k, v in conn.hgetall(_key(run_id)).items()}
    if not d or d.get("status") != RUNNING:
        return False
    total = int(_num(d, "total"))
    finished = sum(int(_num(d, k)) for k in ("done", "failed", "skipped", "write_failed"))
    if not (total >= 0 and d.get("paged") == "1" and finished >= total):
        return False
    if not conn.hsetnx(_key(run_id), "completed_at", time.time()):
        return False  # another worker's call got there first
    conn.hset(_key(run_id), mapping={"status": COMPLETED, "updated_at": time.time()})
    conn.delete(ACTIVE_PREFIX + d["project"])
    return True


def enqueue_order(conn: redis.Redis, run_id: str) -> bool:
    """Once every task of a ``diverse`` run is predicted: its ordering job (:data:`ORDER_FUNC`),
    which ranks the whole run and writes its predictions with the scores of their ranks.
    Enqueued once per run (the run's ``ordering`` becomes ``pending``); True when this call
    did."""
    if not conn.hsetnx(_key(run_id), "ordering", "pending"):
        return False
    Queue(QUEUE_BACKGROUND, connection=conn).enqueue(
        ORDER_FUNC,
        run_id,
        job_timeout=ORDER_TIMEOUT,
        result_ttl=600,
        failure_ttl=24 * 3600,
        retry=Retry(max=3, interval=[5, 30, 120]),
        description=f"pre-annotation {run_id}: diverse ordering",
    )
    return True


def all_predicted(conn: redis.Redis, run_id: str) -> bool:
    """Whether every task of the run was read and predicted (or failed, or skipped): what is
    left is writing the predictions waiting in the run's write buffer."""
    d = {k.decode(): v.decode() for k, v in conn.hgetall(_key(run_id)).items()}
    total = int(_num(d, "total"))
    finished = sum(int(_num(d, k)) for k in ("predicted", "failed", "skipped"))
    return total >= 0 and d.get("paged") == "1" and finished >= total


def set_written(conn: redis.Redis, run_id: str, written: int, write_failed: int) -> None:
    """The run's written and write-refused task counts, as absolute numbers (the sizes of the
    run's written and refused sets, so that a retried write never counts a task twice)."""
    update(conn, run_id, done=written, write_failed=write_failed)


def fail(conn: redis.Redis, run_id: str, error: str) -> None:
    conn.hset(_key(run_id), mapping={"status": FAILED, "error": error, "updated_at": time.time()})


def update(conn: redis.Redis, run_id: str, **fields: Any) -> None:
    conn.hset(_key(run_id), mapping={**fields, "updated_at": time.time()})
