"""Prometheus metrics of the whole system, kept in Redis and served by the backend at ``/metrics``.

Every process adds to counters and histograms stored in Redis hashes: the backend's gunicorn
processes (requests), the prediction workers (jobs, stages, predictions, failures, cache hits)
and the trainer (rounds). ``GET /metrics`` reads them back in one round trip and adds gauges read
from the live state: queue depths, live workers, the current model version, the last training
round and the pre-annotation runs. Nothing is held in process memory, so a scrape gives the same
numbers whichever gunicorn process answers it, and covers workers on other machines.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import redis

if TYPE_CHECKING:
    from flask import Flask
    from prometheus_client.registry import Collector

    from common.jobs import ItemResult
    from common.registry import ModelRegistry

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
    "Training rounds by outcome: promoted, rejected or skipped.",
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
    from datetime import datetime, timezone

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


# ---------------------------------------------------------------------------------- collecting


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _fmt_bound(b: float) -> str:
    return repr(float(b))


class RedisCollector:
    """A prometheus_client collector reading everything from Redis at each scrape."""

    def __init__(self, conn: redis.Redis, registry: ModelRegistry | None = None) -> None:
        self.conn = conn
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        with self.conn.pipeline(transaction=False) as pipe:
            for d in (*COUNTERS, *HISTOGRAMS):
                pipe.hgetall(d.key)
            pipe.lindex(ROUNDS_KEY, 0)
            pipe.hgetall(TRAINER_STATUS_KEY)
            raw = pipe.execute()
        stored = dict(zip((*COUNTERS, *HISTOGRAMS), raw, strict=False))
        last_round, trainer_status = raw[-2], _decode(raw[-1])

        for d in COUNTERS:
            fam = CounterMetricFamily(d.name, d.doc, labels=list(d.labels))
            for field, value in sorted(_decode(stored[d]).items()):
                fam.add_metric(json.loads(field), float(value))
            yield fam
        for h in HISTOGRAMS:
            yield self._histogram(h, _decode(stored[h]), HistogramMetricFamily)
        yield from self._live()
        yield from self._training(last_round, trainer_status)
        yield from self._preannotation()

    @staticmethod
    def _histogram(h: HistogramDef, fields: dict[str, str], family: Any) -> Any:
        series: dict[str, tuple[list[float], list[float]]] = {}
        for field, value in fields.items():
            labels, _, part = field.rpartition("|")
            counts, total = series.setdefault(labels, ([0.0] * (len(h.buckets) + 1), [0.0]))
            if part == "sum":
                total[0] = float(value)
            else:
                counts[min(int(part), len(h.buckets))] += float(value)
        fam = family(h.name, h.doc, labels=list(h.labels))
        for labels in sorted(series):
            counts, total = series[labels]
            cumulative, acc = [], 0.0
            for bound, n in zip((*map(_fmt_bound, h.buckets), "+Inf"), counts, strict=True):
                acc += n
                cumulative.append((bound, acc))
            fam.add_metric(json.loads(labels), cumulative, total[0])
        return fam

    def _live(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        from rq import Queue, Worker
        from rq.registry import FailedJobRegistry

        from common.exceptions import NotFound
        from common.jobs import QUEUES

        depth = GaugeMetricFamily(
            "sam2unet_queue_depth", "Jobs waiting per queue.", labels=["queue"]
        )
        failed = GaugeMetricFamily(
            "sam2unet_queue_failed_jobs",
            "Jobs in each queue's failed-job registry (see rq-dashboard).",
            labels=["queue"],
        )
        for name in QUEUES:
            depth.add_metric([name], Queue(name, connection=self.conn).count)
            failed.add_metric([name], FailedJobRegistry(name, connection=self.conn).count)
        yield depth
        yield failed
        yield GaugeMetricFamily(
            "sam2unet_workers", "Live prediction workers.", value=Worker.count(connection=self.conn)
        )
        if self.registry is not None:
            info = GaugeMetricFamily(
                "sam2unet_model_version_info",
                "The current model version (value 1) and where it came from.",
                labels=["version", "source"],
            )
            name = self.registry.current()
            if name is not None:
                source = "missing"
                try:
                    source = self.registry.get(name).source
                except (NotFound, OSError, ValueError) as e:
                    log.warning("metrics: cannot read version %s: %s", name, e)
                info.add_metric([name, source], 1)
            yield info

    def _training(self, last_round: bytes | None, status: dict[str, str]) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        state = GaugeMetricFamily(
            "sam2unet_trainer_state_info",
            "The trainer's state (idle, syncing, training) and project, value 1.",
            labels=["state", "project"],
        )
        if status.get("state"):
            state.add_metric([status["state"], status.get("project", "")], 1)
        yield state
        for key, doc in (
            ("epoch", "Epoch of the round in progress or last run."),
            ("epochs", "Epochs of the round in progress or last run."),
            ("loss", "Training loss of the last reported epoch."),
        ):
            if _is_number(status.get(key)):
                yield GaugeMetricFamily(f"sam2unet_trainer_{key}", doc, value=float(status[key]))
        if last_round is None:
            return
        try:
            r = json.loads(last_round)
        except ValueError:
            log.warning("metrics: unreadable last training round in %s", ROUNDS_KEY)
            return
        info = GaugeMetricFamily(
            "sam2unet_training_last_round_info",
            "The last training round (value 1): outcome, project, parent and candidate version.",
            labels=["status", "project", "parent", "candidate"],
        )
        keys = ("status", "project", "parent", "candidate")
        info.add_metric([str(r.get(k) if r.get(k) is not None else "") for k in keys], 1)
        yield info
        metric = GaugeMetricFamily(
            "sam2unet_training_last_round_metric",
            "Held-out metrics of the last round: candidate and current (parent) version.",
            labels=["model", "metric"],
        )
        for model, key in (("candidate", "candidate_metrics"), ("current", "current_metrics")):
            for name, value in sorted((r.get(key) or {}).items()):
                if _is_number(value):
                    metric.add_metric([model, name], float(value))
        yield metric
        samples = GaugeMetricFamily(
            "sam2unet_training_last_round_samples",
            "Tasks the last round trained on and held out.",
            labels=["set"],
        )
        samples.add_metric(["train"], float(r.get("train_size") or 0))
        samples.add_metric(["val"], float(r.get("val_size") or 0))
        yield samples
        for key, name, doc in (
            ("at", "timestamp_seconds", "When the last round ended (Unix time)."),
            ("seconds", "duration_seconds", "How long the last round took."),
        ):
            if _is_number(r.get(key)):
                yield GaugeMetricFamily(
                    f"sam2unet_training_last_round_{name}", doc, value=float(r[key])
                )

    def _preannotation(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from common import preannotate as runs

        recent = runs.list_runs(self.conn, limit=50)
        by_status = GaugeMetricFamily(
            "sam2unet_preannotate_runs",
            "Recent project-wide pre-annotation runs (last 50) by status.",
            labels=["status"],
        )
        counts: dict[str, int] = {}
        for st in recent:
            counts[st["status"]] = counts.get(st["status"], 0) + 1
        for status in (runs.RUNNING, runs.COMPLETED, runs.CANCELLED, runs.FAILED):
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        tasks = GaugeMetricFamily(
            "sam2unet_preannotate_tasks",
            "Tasks of each running pre-annotation run: total, done, failed, skipped, queued.",
            labels=["run", "project", "state"],
        )
        eta = GaugeMetricFamily(
            "sam2unet_preannotate_eta_seconds",
            "Estimated seconds left of each running pre-annotation run.",
            labels=["run", "project"],
        )
        for st in recent:
            if st["status"] != runs.RUNNING:
                continue
            ids = [st["id"], str(st["project"])]
            for state in ("total", "done", "failed", "skipped", "queued"):
                if st.get(state) is not None:
                    tasks.add_metric([*ids, state], float(st[state]))
            if st.get("eta_seconds") is not None:
                eta.add_metric(ids, float(st["eta_seconds"]))
        yield tasks
        yield eta


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------- Flask


def make_registry(collector: Collector) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def init_app(app: Flask) -> None:
    """Count every request of ``app`` and serve ``GET /metrics`` (behind basic auth when it is
    enabled). Uses ``app.extensions["sam2unet"]`` (settings, redis, registry)."""
    from flask import Response, g, request
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from backend.auth import check_basic_auth

    ext = app.extensions["sam2unet"]
    registry = make_registry(RedisCollector(ext["redis"], ext.get("registry")))

    @app.before_request
    def _start_timer() -> None:
        g.sam2unet_t0 = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        t0 = g.pop("sam2unet_t0", None)
        if t0 is not None:
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            record_request(
                ext["redis"],
                endpoint,
                request.method,
                response.status_code,
                time.perf_counter() - t0,
            )
        return response

    def metrics() -> Response:
        s = ext["settings"]
        if s.basic_auth_enabled:
            check_basic_auth(
                request.headers.get("Authorization"), s.basic_auth_user, s.basic_auth_pass
            )
        return Response(generate_latest(registry), mimetype=None, content_type=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
