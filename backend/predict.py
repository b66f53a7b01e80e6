"""Turning a /predict request into queued jobs and the jobs' results into one answer per task.

Tasks are split into jobs of ``batch_size`` (each job is one device batch on a worker). The
request then waits on its reply list until every job answered or the deadline passed. A task that
failed or did not finish in time gets an empty result, so the answer always has exactly one entry
per task, in task order. Jobs still running at the deadline keep running: their results are
written to Label Studio through its API when they finish (when an API key is configured).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue
from rq.job import Job, JobStatus

from backend.schemas import PredictRequest
from contracts.jobs import (
    QUEUE_BATCH,
    QUEUE_INTERACTIVE,
    ItemResult,
    PredictItem,
    close_request,
    decode_reply,
    enqueue_predict,
    new_reply_key,
    reap_abandoned,
    requeue_lost,
)
from contracts.routing import prewarm, rescue_routed, routed_queue
from contracts.settings import Settings
from contracts.untrained import is_untrained
from labelstudio.labelconfig import Target, map_prompt_labels, target_to_json
from modelstore.registry import ModelRegistry

log = logging.getLogger(__name__)

HOSTNAME_PREFIX = "sam2unet:project-host:"


@dataclass
class PredictOutcome:
    results: list[ItemResult]
    elapsed: float
    late_tasks: int
    request_id: str = ""


class PredictService:
    """Enqueue prediction jobs and gather their results within a deadline."""

    def __init__(self, settings: Settings, connection: redis.Redis) -> None:
        self.settings = settings
        self.redis = connection
        self.queues = {
            QUEUE_BATCH: Queue(QUEUE_BATCH, connection=connection),
            QUEUE_INTERACTIVE: Queue(QUEUE_INTERACTIVE, connection=connection),
        }

    def remember_hostname(self, project: int | None, hostname: str | None) -> None:
        """Keep the Label Studio URL that /setup reported for a project (for relative URLs)."""
        if project is not None and hostname:
            self.redis.set(f"{HOSTNAME_PREFIX}{project}", hostname.rstrip("/"), ex=30 * 24 * 3600)

    def version_and_host(
        self, registry: ModelRegistry, project: int | None
    ) -> tuple[str | None, str | None]:
        """The current model version and the project's Label Studio URL (as /setup reported
        it), in one Redis round trip."""
        if project is None:
            return registry.current(), None
        version, (host,) = registry.current_and(f"{HOSTNAME_PREFIX}{project}")
        return version, (host.decode() if isinstance(host, bytes) else host) or None

    def predict(
        self,
        req: PredictRequest,
        target: Target,
        model_version: str | None,
        ls_base: str | None = None,
    ) -> PredictOutcome:
        """``ls_base``: the project's Label Studio URL, for tasks' relative image URLs."""
        t0 = time.monotonic()
        deadline = t0 + self.settings.predict_deadline
        results: dict[int, ItemResult] = {}
        items: list[PredictItem] = []
        for i, task in enumerate(req.tasks):
            task_id = task.get("id") if isinstance(task.get("id"), int) else None
            url = task["data"].get(target.value_key)
            if not isinstance(url, str) or not url:
                results[i] = ItemResult(
                    i, task_id, error=f"task data has no image under {target.value_key!r}"
                )
                log.warning("task %s: no image under %r", task_id, target.value_key)
                continue
            items.append(PredictItem(index=i, url=url, task_id=task_id))

        interactive = req.context is not None
        # a call with prompts; Label Studio also sends interactive calls without any (after a
        # Submit, as the next task loads): those are answered by the automatic model
        prompted = interactive and bool((req.context or {}).get("result"))
        queue = self.queues[QUEUE_INTERACTIVE if interactive else QUEUE_BATCH]
        if prompted and len(items) == 1:  # to the worker holding the image's features
            routed = routed_queue(self.redis, ls_base, items[0].url)
            if routed is not None:
                queue = Queue(routed, connection=self.redis)
        if not prompted and len(items) == 1 and self.settings.prewarm:
            # an annotator opened this task: its first click can find the features computed
            self._prewarm(items[0], ls_base)
        reply_key = new_reply_key()
        request_id = secrets.token_hex(6)  # the same in every job's worker log lines
        enqueued = enqueue_predict(
            queue,
            items,
            self.settings,
            f"predict for project {req.project}",
            ttl=max(int(self.settings.predict_deadline) * 10, 3600),
            target=target_to_json(target),
            reply_key=reply_key,
            ls_base=ls_base,
            project=req.project,
            model_version=model_version,
            # "Click: Foreground" prompts a "Foreground" mask (Target.prompt_labels)
            context=map_prompt_labels(req.context, target),
            request_id=request_id,
        )
        pending: dict[str, list[PredictItem]] = {job.id: list(chunk) for job, chunk in enqueued}
        self._wait(pending, reply_key, deadline, results)
        if pending:
            for raw in close_request(self.redis, reply_key):
                self._take_reply(raw, pending, results)
        late = sum(len(v) for v in pending.values())
        if pending:
            for chunk_items in pending.values():
                for it in chunk_items:
                    results[it.index] = ItemResult(
                        it.index,
                        it.task_id,
                        error="not finished before the deadline; computing in the background",
                    )
            log.warning(
                "%d task(s) not finished within %.0fs; they continue in the background",
                late,
                self.settings.predict_deadline,
            )
        # every reply was popped: Redis dropped the emptied list (a stray duplicate from a
        # retried job expires with the list's TTL)
        ordered = [results[i] for i in range(len(req.tasks))]
        return PredictOutcome(ordered, time.monotonic() - t0, late, request_id)

    def _prewarm(self, item: PredictItem, ls_base: str | None) -> None:
        try:
            prewarm(self.redis, ls_base, item.url, item.task_id, self.settings)
        except redis.exceptions.RedisError as e:  # the answer does not depend on it
            log.warning("task %s: could not enqueue the prewarm of its image: %s", item.task_id, e)

    def _wait(
        self,
        pending: dict[str, list[PredictItem]],
        reply_key: str,
        deadline: float,
        results: dict[int, ItemResult],
    ) -> None:
        last_check = time.monotonic()
        lost: set[str] = set()  # jobs seen taken by a worker that never started them
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            got = self.redis.blpop([reply_key], timeout=min(1.0, max(0.01, remaining)))
            if got is not None:
                self._take_reply(got[1], pending, results)
                continue
            if time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                self._check_jobs(pending, results, lost)

    @staticmethod
    def _take_reply(
        raw: bytes, pending: dict[str, list[PredictItem]], results: dict[int, ItemResult]
    ) -> None:
        job_id, items = decode_reply(raw)
        if pending.pop(job_id, None) is not None:
            for r in items:
                results[r.index] = r

    def _check_jobs(
        self,
        pending: dict[str, list[PredictItem]],
        results: dict[int, ItemResult],
        lost: set[str],
    ) -> None:
        """Retry jobs of dead workers; turn jobs that failed for good into per-task errors."""
        rescue_routed(self.redis)
        reap_abandoned(self.redis)
        jobs = Job.fetch_many(list(pending), connection=self.redis)
        requeue_lost(self.redis, jobs, lost)
        for job_id, job in zip(list(pending), jobs, strict=True):
            status = job.get_status(refresh=False) if job is not None else None
            if job is None or status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                reason = "prediction job failed" if job is not None else "prediction job vanished"
                if job is not None and job.retries_left:
                    continue
                log.error("job %s %s (status %s)", job_id, reason, status)
                for it in pending.pop(job_id):
                    results[it.index] = ItemResult(it.index, it.task_id, error=reason)


FAILED_SUFFIX = "/failed"


def answer(results: list[ItemResult], model_version: str | None) -> dict[str, Any]:
    """The /predict response body: exactly one entry per task, in task order.

    * A prediction: ``{"result": [...], "score": s, "model_version": v}``.
    * A task a version with a never-trained automatic head made no prediction for
      (:func:`contracts.untrained.is_untrained`): an empty list, no prediction at all. Label Studio
      1.23 reads each entry as the task's list of predictions, stores none, shows no prediction
      tab, and asks again whenever the task is opened (it asks only for tasks without any
      prediction), so the first trained version answers it. A stored placeholder would show as
      an empty tab and stop those requests (docs/day0.md, "An untrained version shows nothing").
    * A task without a prediction for a failure (bad image, deadline): an empty result whose
      model_version is marked ``<version>/failed``, so that a late result written back later is
      the task's only prediction of the current version. Its ``error`` says why (Label Studio
      does not store it; the reason is logged as well).
    """
    out: list[Any] = []
    for r in results:
        version = r.model_version or model_version
        if r.error:
            out.append(
                {
                    "result": [],
                    "score": 0.0,
                    "model_version": f"{version}{FAILED_SUFFIX}",
                    "error": r.error,
                }
            )
        elif is_untrained(r.model_version):
            out.append([])
        else:
            out.append({"result": r.result, "score": r.score, "model_version": version})
    return {"results": out}
