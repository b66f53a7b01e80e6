"""Writing predictions to Label Studio through its API, in bulk.

Pre-annotation runs (the re-prediction after a promotion is one) and the results that a waiting
/predict request could not return in time are written through Label Studio's bulk import
(``POST /api/projects/<id>/import/predictions``), ``SAM2UNET_WRITE_BATCH`` predictions a call.

Exactly once per (task, model version) within a write scope (a run, or the /predict request
whose results these are), across retries and killed workers:

- each task is marked *pending* in Redis before its call and *written* after it, both in sets
  under the scope (:data:`WRITTEN_TTL`);
- a task already *written* is not sent again;
- a task still *pending* (its call's outcome is unknown: the worker was killed, the connection
  dropped) is looked up in Label Studio, and only sent when it holds no prediction of the
  version.

Label Studio refuses a whole call when one item's task is not in the project (deleted
meanwhile): the call is split in halves until the refused item is alone, which is logged with
its task id and Label Studio's reason and counted failed. An item Label Studio leaves out
silently (a result that does not fit the labelling config) is found by looking the call's
tasks up, and counted failed too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from contracts.errors import AssistError
from contracts.jobs import ItemResult, PredictPayload
from contracts.untrained import is_untrained
from labelstudio.predictions_api import PredictionsRefused

log = logging.getLogger(__name__)

WRITTEN_PREFIX = "sam2unet:written:"
PENDING_PREFIX = "sam2unet:writing:"
REFUSED_PREFIX = "sam2unet:refused:"
WRITTEN_TTL = 2 * 24 * 3600  # longer than any retry of the jobs that write
LS_IMPORT_PART = 500  # Label Studio's PREDICTION_IMPORT_BATCH_SIZE
DEFAULT_BATCH = LS_IMPORT_PART
ATTEMPTS = (0.0, 1.0, 4.0)  # seconds before each attempt of a call that could not get through


@dataclass
class WriteReport:
    """Task ids written (now or by an earlier attempt of the same scope) and failed ones with
    the reason: refused by Label Studio, or not sent because it could not be reached."""

    written: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)  # of failed: those Label Studio refused


def prediction_of(r: ItemResult) -> dict[str, Any]:
    """The bulk-import item of a result."""
    return {
        "task": int(r.task_id),
        "result": r.result,
        "score": r.score,
        "model_version": r.model_version,
    }


class PredictionWriter:
    """Writes predictions of one project through the bulk import, exactly once per task and
    version within ``scope`` (see the module doc). ``conn`` None: no Redis bookkeeping (a retry
    may then write a task again)."""

    def __init__(
        self,
        ls_client: Any,
        conn: redis.Redis | None,
        batch_size: int = DEFAULT_BATCH,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ls = ls_client
        self.conn = conn
        self.batch_size = max(1, int(batch_size))
        self.sleep = sleep
        self.calls = 0  # bulk calls made (refused ones included)

    def counts(self, scope: str, version: str) -> tuple[int, int]:
        """(tasks written, tasks refused) so far in ``scope`` for ``version``, each task once."""
        if self.conn is None:
            return 0, 0
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.scard(f"{WRITTEN_PREFIX}{scope}:{version}")
            pipe.scard(f"{REFUSED_PREFIX}{scope}:{version}")
            written, refused = pipe.execute()
        return int(written), int(refused)

    def write(self, project: int, scope: str, predictions: Sequence[dict[str, Any]]) -> WriteReport:
        report = WriteReport()
        by_version: dict[str, list[dict[str, Any]]] = {}
        for p in predictions:
            by_version.setdefault(str(p["model_version"]), []).append(p)
        for version, items in by_version.items():
            keys = (f"{WRITTEN_PREFIX}{scope}:{version}", f"{PENDING_PREFIX}{scope}:{version}")
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                self._write_batch(project, version, keys, batch, report)
        return report

    # ---------------------------------------------------------------- stages
    def _write_batch(
        self,
        project: int,
        version: str,
        keys: tuple[str, str],
        batch: list[dict[str, Any]],
        report: WriteReport,
    ) -> None:
        tasks = [p["task"] for p in batch]
        try:
            done = self._already_written(project, version, keys, tasks)
        except AssistError as e:
            for t in tasks:  # left as they were: a later attempt looks again
                report.failed[t] = e.message
            log.error(
                "project %s: %d prediction(s) of %s not written: %s",
                project,
                len(tasks),
                version,
                e.message,
            )
            return
        report.written |= done
        todo = [p for p in batch if p["task"] not in done]
        if todo:
            self._import(project, version, keys, todo, report)

    def _already_written(
        self, project: int, version: str, keys: tuple[str, str], tasks: list[int]
    ) -> set[int]:
        """Tasks of this scope written by an earlier attempt, asking Label Studio about those
        whose earlier call has no known outcome."""
        if self.conn is None or not tasks:
            return set()
        written_key, pending_key = keys
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.smismember(written_key, tasks)
            pipe.smismember(pending_key, tasks)
            written, pending = pipe.execute()
        done = {t for t, w in zip(tasks, written, strict=True) if w}
        unsure = [t for t, w, p in zip(tasks, written, pending, strict=True) if p and not w]
        if unsure:
            held = self.ls.tasks_with_prediction_of(project, version, unsure)
            log.info(
                "project %s: %d task(s) of an interrupted write of %s; %d already in Label Studio",
                project,
                len(unsure),
                version,
                len(held),
            )
            self._mark_written(keys, held)
            done |= held
        return done

    def _import(
        self,
        project: int,
        version: str,
        keys: tuple[str, str],
        items: list[dict[str, Any]],
        report: WriteReport,
    ) -> None:
        tasks = [p["task"] for p in items]
        self._mark_pending(keys, tasks)
        try:
            created = self._call(project, items)
        except PredictionsRefused as e:
            if len(items) == 1:
                self._refused(keys, tasks[0], e.message, report)
                return
            if len(items) > LS_IMPORT_PART:
                # Label Studio may store a long call in parts of 500 (its memory-efficient
                # import): what a refused call stored is looked up, not sent again
                stored = self.ls.tasks_with_prediction_of(project, version, tasks)
                self._mark_written(keys, stored)
                report.written |= stored
                items = [p for p in items if p["task"] not in stored]
                if not items:
                    return
            # nothing of a refused call was stored: find the item Label Studio refuses
            half = len(items) // 2
            self._import(project, version, keys, items[:half], report)
            self._import(project, version, keys, items[half:], report)
            return
        except AssistError as e:
            # no answer after every attempt: counted failed, left pending, so that a later
            # attempt of this scope looks them up before writing
            for t in tasks:
                report.failed[t] = e.message
            log.error(
                "project %s: %d prediction(s) of %s not written: %s",
                project,
                len(tasks),
                version,
                e.message,
            )
            return
        if created == len(items):
            stored = set(tasks)
        else:  # Label Studio left some out without saying which
            stored = self.ls.tasks_with_prediction_of(project, version, tasks)
        self._mark_written(keys, stored)
        report.written |= stored
        for t in tasks:
            if t not in stored:
                self._refused(keys, t, "Label Studio did not store it (result refused)", report)

    def _call(self, project: int, items: list[dict[str, Any]]) -> int:
        last: AssistError | None = None
        for wait in ATTEMPTS:
            if wait:
                self.sleep(wait)
            self.calls += 1
            try:
                return self.ls.import_predictions(project, items)
            except PredictionsRefused:
                raise
            except AssistError as e:
                last = e
        assert last is not None
        raise last

    def _refused(self, keys: tuple[str, str], task: int, reason: str, report: WriteReport) -> None:
        report.failed[task] = reason
        report.refused.add(task)
        if self.conn is not None:
            refused_key = REFUSED_PREFIX + keys[0][len(WRITTEN_PREFIX) :]
            with self.conn.pipeline(transaction=True) as pipe:
                pipe.sadd(refused_key, task)
                pipe.srem(keys[1], task)
                pipe.expire(refused_key, WRITTEN_TTL)
                pipe.execute()
        log.error("task %s: prediction refused by Label Studio: %s", task, reason)

    def _mark_pending(self, keys: tuple[str, str], tasks: list[int]) -> None:
        if self.conn is None or not tasks:
            return
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.sadd(keys[1], *tasks)
            pipe.expire(keys[1], WRITTEN_TTL)
            pipe.execute()

    def _mark_written(self, keys: tuple[str, str], tasks: set[int]) -> None:
        if self.conn is None or not tasks:
            return
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.sadd(keys[0], *tasks)
            pipe.srem(keys[1], *tasks)
            pipe.expire(keys[0], WRITTEN_TTL)
            pipe.execute()


def writable(results: list[ItemResult]) -> list[ItemResult]:
    """The results to store: successful ones of a task, not the empty answers of a version
    whose automatic head was never trained."""
    return [
        r
        for r in results
        if not r.error and r.task_id is not None and not is_untrained(r.model_version)
    ]


def make_write_back(
    ls_client: Any,
) -> Callable[..., int] | None:
    """A function ``write_back(payload, results, conn=None, batch_size=DEFAULT_BATCH)`` that
    stores each successful result as a prediction of its task and returns how many are stored;
    None when no Label Studio API is configured. Results of a payload with a project go through
    the bulk import (:class:`PredictionWriter`, scoped by the payload's run or request); without
    a project, they are written one by one (``POST /api/predictions``)."""
    if ls_client is None:
        return None

    def write_back(
        payload: PredictPayload,
        results: list[ItemResult],
        conn: redis.Redis | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> int:
        todo = writable(results)
        if payload.project is None:
            return write_one_by_one(ls_client, todo)
        writer = PredictionWriter(ls_client, conn, batch_size)
        scope = payload.run_id or f"request:{payload.request_id}"
        report = writer.write(payload.project, scope, [prediction_of(r) for r in todo])
        return sum(1 for r in todo if r.task_id in report.written)

    return write_back


def write_one_by_one(ls_client: Any, results: list[ItemResult]) -> int:
    """``POST /api/predictions`` per result (each gets its ``prediction_id``); how many stored."""
    written = 0
    for r in results:
        try:
            stored = ls_client.create_prediction(r.task_id, r.result, r.score, r.model_version)
            r.prediction_id = stored.get("id") if isinstance(stored, dict) else None
            written += 1
        except AssistError as e:
            log.error("task %s: could not write the prediction back: %s", r.task_id, e.message)
    return written
