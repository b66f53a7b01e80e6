"""Metric definitions and recording, shared by every process; the backend serves them at
``/metrics`` (:mod:`backend.metrics`).

Every process adds to counters and histograms stored in Redis hashes: the backend's gunicorn
processes (requests), the prediction workers (jobs, stages, predictions, failures, cache hits)
and the trainer (rounds). ``GET /metrics`` reads them back in one round trip and adds gauges read
from the live state: queue depths, live workers, the current model version, the last training
round and the pre-annotation runs.

Counters persist with Redis (append-only file) across restarts of the services and reset only
when Redis loses its data, which Prometheus treats as a counter reset.

Storage: counter ``name`` is the hash ``sam2unet:metrics:<name>`` with one field per label set
(the label values as a JSON list) holding the count. A histogram's hash has the fields
``<labels>|<i>`` (observations in bucket ``i``, not cumulative; ``i == len(buckets)`` is +Inf)
and ``<labels>|sum``.

Recording never fails the caller: a Redis error is logged and the observation dropped, and after
a connection error this process skips recording for a few seconds so that requests are not slowed
down by a Redis that is down.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

import redis

if TYPE_CHECKING:
    from contracts.jobs import ItemResult

log = logging.getLogger(__name__)

PREFIX = "sam2unet:metrics:"
#: Written by the trainer (trainer.service): its rounds, newest first, and its state hash.
ROUNDS_KEY = "sam2unet:trainer:rounds"
TRAINER_STATUS_KEY = "sam2unet:trainer:status"

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 100.0)
STAGE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0
)  # fmt: skip
STAGES = ("queue_wait", "fetch", "decode", "forward", "encode", "total")
#: Why a task got no prediction (label ``reason`` of ``sam2unet_failed_tasks_total``).
REASONS = ("fetch", "decode", "prompt", "no_image", "deadline", "job_failed", "other")
RETRY_AFTER_DOWN = 5.0  # seconds without recording after a Redis connection error


def _labels_field(values: Sequence[str]) -> str:
    return json.dumps([str(v) for v in values])


@dataclass(frozen=True)
class CounterDef:
    """A counter stored in Redis. ``name`` without the ``_total`` suffix."""

    name: str
    doc: str
    labels: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return PREFIX + self.name

    def inc(self, pipe: Any, *values: str, amount: int = 1) -> None:
        """Queue an increment on ``pipe`` (a Redis pipeline)."""
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: expected labels {self.labels}, got {values}")
        pipe.hincrby(self.key, _labels_field(values), amount)


@dataclass(frozen=True)
class HistogramDef:
    """A histogram stored in Redis with fixed bucket upper bounds (seconds)."""

    name: str
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]

    @property
    def key(self) -> str:
        return PREFIX + self.name

    def observe(self, pipe: Any, value: float, *values: str) -> None:
        """Queue one observation on ``pipe`` (a Redis pipeline)."""
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: expected labels {self.labels}, got {values}")
        value = max(0.0, float(value))
        field = _labels_field(values)
        pipe.hincrby(self.key, f"{field}|{bisect.bisect_left(self.buckets, value)}", 1)
        pipe.hincrbyfloat(self.key, f"{field}|sum", value)


REQUESTS = CounterDef(
    "sam2unet_http_requests",
    "HTTP requests answered by the backend, by route, method and status code.",
    ("endpoint", "method", "status"),
)
REQUEST_SECONDS = HistogramDef(
    "sam2unet_http_request_duration_seconds",
    "Seconds the backend took to answer, by route and method.",
    ("endpoint", "method"),
    HTTP_BUCKETS,
)
JOBS = CounterDef("sam2unet_jobs", "Prediction jobs run by the workers, by queue.", ("queue",))
STAGE_SECONDS = HistogramDef(
    "sam2unet_job_stage_duration_seconds",
    "Seconds per prediction job and stage: queue_wait (enqueued to started); fetch, decode, "
    "forward, encode (summed over the job's images); total (started to finished).",
    ("queue", "stage"),
    STAGE_BUCKETS,
)
PREDICTIONS = CounterDef(
    "sam2unet_predictions",
    "Tasks given a prediction by the workers (from the cache included), by model version.",
    ("model_version",),
)
CACHE_HITS = CounterDef("sam2unet_cache_hits", "Tasks answered from the worker result cache.")
FAILED_TASKS = CounterDef(
    "sam2unet_failed_tasks",
    "Tasks answered without a prediction, by reason: fetch, decode, prompt (worker side); "
    "no_image, deadline, job_failed (backend side); other.",
    ("reason",),
)
ROUNDS = CounterDef(
    "sam2unet_training_rounds",
    "Training rounds by outcome: promoted, rejected, skipped, failed or superseded.",
    ("status",),
)
COUNTERS = (REQUESTS, JOBS, PREDICTIONS, CACHE_HITS, FAILED_TASKS, ROUNDS)
HISTOGRAMS = (REQUEST_SECONDS, STAGE_SECONDS)


# ---------------------------------------------------------------------------------- recording

_down_until = 0.0


def _write(conn: redis.Redis, fill: Any) -> None:
    """Run ``fill(pipe)`` on a non-transactional pipeline and send it; never raises for Redis."""
    global _down_until
    if time.monotonic() < _down_until:
        return
    try:
        with conn.pipeline(transaction=False) as pipe:
            fill(pipe)
            pipe.execute()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        _down_until = time.monotonic() + RETRY_AFTER_DOWN
        log.warning("metrics not recorded, Redis unavailable: %s", e)
    except redis.exceptions.RedisError as e:
        log.warning("metrics not recorded: %s", e)


def record_request(
    conn: redis.Redis, endpoint: str, method: str, status: int, seconds: float
) -> None:
    """One answered HTTP request."""

    def fill(pipe: Any) -> None:
        REQUESTS.inc(pipe, endpoint, method, str(status))
        REQUEST_SECONDS.observe(pipe, seconds, endpoint, method)

    _write(conn, fill)


def failure_reason(message: str) -> str:
    """The reason class of a task's error message (one of :data:`REASONS`)."""
    m = message.lower()
    if "no image under" in m:
        return "no_image"
    if "deadline" in m:
        return "deadline"
    if m.startswith("prediction job"):
        return "job_failed"
    if m.startswith("interactive"):
        return "prompt"
    if m.startswith(
        ("empty image", "cannot decode image", "image of ", "image refused", "expected an h x w")
    ):
        return "decode"
    if "://" in m or "fetch" in m or "label studio" in m or "image url" in m:
        return "fetch"
    return "other"


class StageTimesLike(Protocol):
    fetch: float
    decode: float
    forward: float
    encode: float
    cache_hits: int


def _seconds(start: Any, end: Any) -> float | None:
    if start is None or end is None:
        return None
    try:
        return max(0.0, (end - start).total_seconds())
    except TypeError:  # one naive, one aware datetime
        return None


def record_job(
    conn: redis.Redis, job: Any, times: StageTimesLike, results: Sequence[ItemResult]
) -> None:
    """One finished prediction job (``job``: the rq job, or None outside a worker): its stage
    times, the predictions per model version, the cache hits and the failed tasks by reason."""
    queue = getattr(job, "origin", None) or "local"
    started = getattr(job, "started_at", None)
    wait = _seconds(getattr(job, "enqueued_at", None), started)
    total = _seconds(started, datetime.now(timezone.utc))

    def fill(pipe: Any) -> None:
        JOBS.inc(pipe, queue)
        stages = {
            "fetch": times.fetch,
            "decode": times.decode,
            "forward": times.forward,
            "encode": times.encode,
            "queue_wait": wait,
            "total": total,
        }
        for stage, value in stages.items():
            if value is not None:
                STAGE_SECONDS.observe(pipe, value, queue, stage)
        if times.cache_hits:
            CACHE_HITS.inc(pipe, amount=times.cache_hits)
        for r in results:
            if r.error:
                FAILED_TASKS.inc(pipe, failure_reason(r.error))
            else:
                PREDICTIONS.inc(pipe, r.model_version or "unknown")

    _write(conn, fill)


def record_answer(conn: redis.Redis, results: Iterable[ItemResult]) -> None:
    """The failures a /predict answer adds on the backend side: tasks without an image, tasks
    not finished by the deadline, failed jobs. These are the results without a model version
    (every result computed by a worker carries the version that computed it, and the worker
    counts those itself)."""
    failed = [failure_reason(r.error) for r in results if r.error and r.model_version is None]

    def fill(pipe: Any) -> None:
        for reason in failed:
            FAILED_TASKS.inc(pipe, reason)

    if failed:
        _write(conn, fill)


def record_round(conn: redis.Redis, report: Any) -> None:
    """One training round (a :class:`trainer.round.RoundReport`)."""
    _write(conn, lambda pipe: ROUNDS.inc(pipe, str(report.status)))
