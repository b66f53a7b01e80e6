"""The ``diverse`` order of a whole pre-annotation run, computed before its predictions are
written.

Each predict job of a ``diverse`` run sees one page of images. Its predictions wait in the run's
write buffer (:mod:`worker.preannotate`) and it stores, per task, what the order of the whole run
needs: the prediction's uncertainty (4 bytes) in one hash, the pooled trunk feature as float16
(2 bytes per channel of the coarsest Hiera stage: 1.5 KiB for tiny/small, 1.75 KiB for
base-plus, 2.25 KiB for large) in another, both under the run's keys with :data:`TTL`. Once every
task of the run is predicted, one ordering job (:data:`contracts.preannotate.ORDER_FUNC`) ranks
the run's tasks with :func:`sam2unet.acquisition.run_order` (labelled tasks of the run, whose
features are known when the run predicted them too, count as centres), gives each buffered
prediction the score of its rank (rank ``r`` of ``n`` gets ``(r + 1) / (n + 1)``: sorting by
prediction score ascending then lists batch after batch of uncertain, mutually distant tasks),
and writes the run's predictions through the bulk import, each once. Only the uncertainties of
the whole run and the features of its ``depth + 4 x batch`` most uncertain tasks are loaded.
When no order can be computed, the predictions are written with their uncertainty scores and
the run's ``ordering`` is ``failed``; no prediction is ever lost to the order.

Ordering before writing costs one bulk write per task; the alternative, writing as the run goes
and replacing the predictions once ordered, costs two bulk writes and a deletion (and Label
Studio's bulk deletion removes every model version's predictions of a task). bench.scale
measures both, and the old ``PATCH`` per task.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable

import numpy as np
import redis

from sam2unet.acquisition import CANDIDATES, run_order

log = logging.getLogger(__name__)

PREFIX = "sam2unet:preannotate:diverse:"
TTL = 7 * 24 * 3600
_ENTRY = struct.Struct("<f")  # uncertainty


def _keys(run_id: str) -> tuple[str, str, str]:
    base = PREFIX + run_id
    return base + ":tasks", base + ":features", base + ":labelled"


def remember(
    conn: redis.Redis, run_id: str, entries: Iterable[tuple[int, float, np.ndarray]]
) -> int:
    """Store (task id, uncertainty, feature) of a run's predicted tasks."""
    tasks_key, feats_key, _ = _keys(run_id)
    n = 0
    with conn.pipeline(transaction=False) as pipe:
        for task, u, feature in entries:
            pipe.hset(tasks_key, str(task), _ENTRY.pack(float(u)))
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


def stored(conn: redis.Redis, run_id: str) -> tuple[list[int], np.ndarray, set[int]]:
    """(task ids, uncertainties, labelled task ids) of a run, by task id."""
    tasks_key, _, labelled_key = _keys(run_id)
    raw = conn.hgetall(tasks_key)
    tasks = sorted(int(t) for t in raw)
    u = [_ENTRY.unpack(raw[str(t).encode()])[0] for t in tasks]
    labelled = {int(t) for t in conn.smembers(labelled_key)}
    return tasks, np.asarray(u, dtype=np.float64), labelled


def features(conn: redis.Redis, run_id: str, tasks: list[int]) -> np.ndarray:
    """The stored features of ``tasks`` as an N x D float32 array."""
    _, feats_key, _ = _keys(run_id)
    if not tasks:
        return np.zeros((0, 0), dtype=np.float32)
    raw = conn.hmget(feats_key, [str(t) for t in tasks])
    if any(b is None for b in raw):
        missing = sum(1 for b in raw if b is None)
        raise ValueError(f"{missing} task(s) of the run have no stored feature")
    return np.stack([np.frombuffer(b, dtype="<f2") for b in raw]).astype(np.float32)


def ordering(conn: redis.Redis, run_id: str, batch: int, depth: int) -> list[int]:
    """The run's unlabelled predicted tasks, most useful first."""
    tasks, u, labelled = stored(conn, run_id)
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
    return [tasks[rank[j]] for j in order]


def rank_scores(order: list[int]) -> dict[int, float]:
    """Task id -> the prediction score of its rank: ``(r + 1) / (n + 1)``, ascending."""
    n = len(order)
    return {t: round((r + 1) / (n + 1), 9) for r, t in enumerate(order)}
