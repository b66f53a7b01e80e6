"""The ``/metrics`` endpoint: a Prometheus collector that reads what every process recorded in
Redis (:mod:`contracts.metrics`) in one round trip at each scrape, and adds gauges read from the
live state: queue depths, live workers, the current model version, the last training round and
the pre-annotation runs. Nothing is held in process memory, so a scrape gives the same numbers
whichever gunicorn process answers it, and covers workers on other machines.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
from flask import Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from rq import Queue
from rq.registry import FailedJobRegistry

from backend.auth import check_basic_auth
from contracts import preannotate as runs
from contracts.errors import NotFound
from contracts.jobs import QUEUES
from contracts.metrics import (
    COUNTERS,
    HISTOGRAMS,
    ROUNDS_KEY,
    TRAINER_STATUS_KEY,
    HistogramDef,
    record_request,
)
from contracts.routing import worker_count

if TYPE_CHECKING:
    from flask import Flask
    from prometheus_client.registry import Collector

    from modelstore.registry import ModelRegistry

log = logging.getLogger(__name__)


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
            "sam2unet_workers", "Live prediction workers.", value=worker_count(self.conn)
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

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def init_app(app: Flask) -> None:
    """Count every request of ``app`` and serve ``GET /metrics`` (behind basic auth when it is
    enabled). Uses ``app.extensions["sam2unet"]`` (settings, redis, registry)."""

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
