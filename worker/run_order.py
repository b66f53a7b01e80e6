"""The ``diverse`` order of a whole pre-annotation run.

Each predict job of a ``diverse`` run sees one page of images, so it can only write each
prediction's uncertainty. It also stores, per task, what the order of the whole run needs: the
prediction's Label Studio id and uncertainty (12 bytes) in one hash, the pooled trunk feature as
float16 (2 bytes per channel of the coarsest Hiera stage: 1.5 KiB for tiny/small, 1.75 KiB for
base-plus, 2.25 KiB for large) in another, both under the run's keys with :data:`TTL`. Once the
run is completed, one ordering job (:data:`contracts.preannotate.ORDER_FUNC`) ranks the run's
tasks with :func:`sam2unet.acquisition.run_order` (labelled tasks of the run, whose features are
known when the run predicted them too, count as centres) and rewrites each prediction's score
so that rank ``r`` of ``n`` gets ``(r + 1) / (n + 1)``: sorting by prediction score ascending
then lists batch after batch of uncertain, mutually distant tasks. Only the uncertainties of the
whole run and the features of its ``depth + 4 x batch`` most uncertain tasks are loaded.
A score that cannot be rewritten is logged and keeps its uncertainty score; no prediction is
ever removed.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import redis

from contracts import preannotate as runs
from contracts.errors import AssistError
from sam2unet.acquisition import CANDIDATES, run_order

log = logging.getLogger(__name__)

PREFIX = "sam2unet:preannotate:diverse:"
TTL = 7 * 24 * 3600
_ENTRY = struct.Struct("<qf")  # prediction id, uncertainty
PROGRESS_EVERY = 200


def _keys(run_id: str) -> tuple[str, str, str]:
    base = PREFIX + run_id
    return base + ":tasks", base + ":features", base + ":labelled"


def remember(
    conn: redis.Redis, run_id: str, entries: Iterable[tuple[int, int, float, np.ndarray]]
) -> int:
    """Store (task id, prediction id, uncertainty, feature) of a run's written predictions."""
    tasks_key, feats_key, _ = _keys(run_id)
    n = 0
    with conn.pipeline(transaction=False) as pipe:
        for task, pred, u, feature in entries:
            pipe.hset(tasks_key, str(task), _ENTRY.pack(int(pred), float(u)))
            pipe.hset(feats_key, str(task), np.asarray(feature, dtype="<f2").tobytes())
            n += 1
        if n:
            pipe.expire(tasks_key, TTL)
            pipe.expire(feats_key, TTL)
            pipe.execute()
    return n


def remember_labelled(conn: redis.Redis, run_id: str, tasks: Iterable[int]) -> None:
    """Note the run's tasks that already have an annotation (their features, if the run
    predicts them, are centres of the order)."""
    ids = [str(t) for t in tasks]
    if ids:
        _, _, key = _keys(run_id)
        conn.sadd(key, *ids)
        conn.expire(key, TTL)


def stored(conn: redis.Redis, run_id: str) -> tuple[list[int], list[int], np.ndarray, set[int]]:
    """(task ids, prediction ids, uncertainties, labelled task ids) of a run, by task id."""
    tasks_key, _, labelled_key = _keys(run_id)
    raw = conn.hgetall(tasks_key)
    tasks = sorted(int(t) for t in raw)
    preds, u = [], []
    for t in tasks:
        p, v = _ENTRY.unpack(raw[str(t).encode()])
        preds.append(p)
        u.append(v)
    labelled = {int(t) for t in conn.smembers(labelled_key)}
    return tasks, preds, np.asarray(u, dtype=np.float64), labelled


def features(conn: redis.Redis, run_id: str, tasks: list[int]) -> np.ndarray:
    """The stored features of ``tasks`` as an N x D float32 array."""
    _, feats_key, _ = _keys(run_id)
    if not tasks:
        return np.zeros((0, 0), dtype=np.float32)
    raw = conn.hmget(feats_key, [str(t) for t in tasks])
    return np.stack([np.frombuffer(b, dtype="<f2") for b in raw]).astype(np.float32)


def ordering(conn: redis.Redis, run_id: str, batch: int, depth: int) -> tuple[list[int], list[int]]:
    """(task ids, prediction ids) of the run's unlabelled predicted tasks, most useful first."""
    tasks, preds, u, labelled = stored(conn, run_id)
    rank = [i for i, t in enumerate(tasks) if t not in labelled]
    centres_of = [i for i, t in enumerate(tasks) if t in labelled]
    u_rank = u[rank]
    # only the most uncertain can be candidates: load their features, not the whole run's
    head = np.argsort(-u_rank, kind="stable")[: min(len(rank), depth + CANDIDATES * batch)]
    head_tasks = [tasks[rank[j]] for j in head]
    feats = features(conn, run_id, head_tasks)
    centres = features(conn, run_id, [tasks[i] for i in centres_of]) if centres_of else None
    local = run_order(u_rank[head], feats, batch, labelled_features=centres, depth=depth)
    seen = {int(head[j]) for j in local}
    order = [int(head[j]) for j in local] + [
        int(j) for j in np.argsort(-u_rank, kind="stable") if int(j) not in seen
    ]
    return [tasks[rank[j]] for j in order], [preds[rank[j]] for j in order]


def order_run(conn: redis.Redis, ls_client: Any, run_id: str, batch: int, depth: int) -> dict:
    """Rewrite the scores of a completed ``diverse`` run in the order of the whole run."""
    t0 = time.perf_counter()
    runs.update(conn, run_id, ordering="running", ordered=0)
    try:
        tasks, preds = ordering(conn, run_id, batch, depth)
    except (redis.exceptions.RedisError, ValueError) as e:
        log.error("pre-annotation %s: no diverse order: %s", run_id, e)
        runs.update(conn, run_id, ordering="failed")
        return {"error": str(e)}
    n = len(tasks)
    log.info(
        "pre-annotation %s: diverse order of %d task(s) computed in %.1fs (batches of %d, "
        "first %d ranked by diversity)",
        run_id,
        n,
        time.perf_counter() - t0,
        batch,
        min(depth, n),
    )
    ok = failed = 0
    for r, (task, pred) in enumerate(zip(tasks, preds, strict=True)):
        score = round((r + 1) / (n + 1), 9)
        try:
            ls_client.update_prediction_score(pred, score)
            ok += 1
        except AssistError as e:
            failed += 1
            log.warning(
                "pre-annotation %s: task %s keeps its uncertainty score: %s",
                run_id,
                task,
                e.message,
            )
        if (r + 1) % PROGRESS_EVERY == 0 or r + 1 == n:
            runs.update(conn, run_id, ordered=ok)
            log.info(
                "pre-annotation %s: diverse scores %d/%d (%d failed)", run_id, r + 1, n, failed
            )
    runs.update(conn, run_id, ordering="done" if not failed else "failed", ordered=ok)
    return {"ordered": ok, "failed": failed}
