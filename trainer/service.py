"""The trainer service: consumes webhook events, schedules rounds, promotes, and feeds new
predictions back to Label Studio.

Webhooks are only triggers. Each event names a project; the service counts changes per project
and starts a round (sync from Label Studio, then train / evaluate / promote) when
``SAM2UNET_TRAIN_MIN_NEW`` changes arrived, when ``SAM2UNET_TRAIN_INTERVAL_MIN`` minutes passed
since the last round and anything changed, or at once on ``START_TRAINING``; each trigger waits
``SAM2UNET_TRAIN_DEBOUNCE`` seconds of quiet, so a burst of webhooks becomes one round.
``SAM2UNET_TRAIN_CRON`` adds rounds on a schedule (:mod:`trainer.schedule`); a scheduled round
of a project with nothing new since its last round is skipped. One round runs at a time (a Redis lock also keeps several trainer processes from overlapping). Events are
acknowledged once their round ended; a trainer that dies mid-round gets them again at start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from contracts.metrics import ROUNDS_KEY, record_round
from contracts.metrics import TRAINER_STATUS_KEY as STATUS_KEY
from contracts.registry import ModelRegistry
from contracts.schedule import ALL, parse_schedule
from contracts.settings import Settings
from sam2unet.distributed import DistributedRunError, parse_devices
from sam2unet.exceptions import ConfigError
from trainer.cluster import ClusterDataError, RoundPublisher, report_progress
from trainer.dataset import DatasetCache, correction_rates
from trainer.plots import write_versions_png
from trainer.round import RoundReport, run_round
from trainer.schedule import SCHEDULED_ACTION, ScheduleRunner

log = logging.getLogger(__name__)

EVENTS_STREAM = "sam2unet:events"
GROUP = "sam2unet-trainer"
LOCK_KEY = "sam2unet:trainer:round"
ROUND_LOCK_TTL = 60.0  # seconds; renewed while a round runs
TRAINED_KEY = "sam2unet:trainer:trained"  # project -> fingerprint of its last round's data
CHANGE_ACTIONS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}
)


@dataclass
class ProjectState:
    changes: int = 0
    forced: bool = False
    scheduled: bool = False
    last_event: float = 0.0
    last_round: float = field(default_factory=time.monotonic)
    event_ids: list[str] = field(default_factory=list)


def due(state: ProjectState, settings: Settings, now: float) -> bool:
    """Whether a project's round should start now."""
    quiet = now - state.last_event >= settings.train_debounce
    if state.forced or state.scheduled:
        return quiet
    if state.changes <= 0:
        return False
    if state.changes >= settings.train_min_new:
        return quiet
    return now - state.last_round >= settings.train_interval_min * 60 and quiet


class TrainerService:
    """One trainer process. ``client`` is a :class:`labelstudio.client.LabelStudioClient`."""

    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        client: Any,
        fetch: Any,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = connection
        self.client = client
        self.fetch = fetch
        self.registry = ModelRegistry(settings.model_dir, connection)
        self.cache = DatasetCache(settings.dataset_dir)
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.projects: dict[int, ProjectState] = {}
        self.stop_event = threading.Event()
        self.round_lock_ttl = ROUND_LOCK_TTL
        self._last_resync = time.monotonic()
        self._recovered = False
        try:
            self.schedule = parse_schedule(settings.train_cron)
        except ValueError as e:
            raise ValueError(f"invalid SAM2UNET_TRAIN_CRON: {e}") from None
        try:
            plan = parse_devices(settings.train_devices)
        except ConfigError as e:
            raise ValueError(f"invalid SAM2UNET_TRAIN_DEVICES: {e}") from None
        if plan is not None and settings.train_batch_size % plan.nprocs:
            raise ValueError(
                f"SAM2UNET_TRAIN_BATCH_SIZE {settings.train_batch_size} does not divide among "
                f"the {plan.nprocs} training processes of SAM2UNET_TRAIN_DEVICES"
            )
        self.publisher: RoundPublisher | None = None
        if settings.train_nodes > 1:
            try:
                self.publisher = RoundPublisher(settings, connection, self.cache)
            except ConfigError as e:
                raise ValueError(f"invalid SAM2UNET_TRAIN_RDZV: {e}") from None
        self.scheduler: ScheduleRunner | None = None
        self.last_sync: Any = None

    # ------------------------------------------------------------------ events
    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(EVENTS_STREAM, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _take(self, entries: list[Any]) -> None:
        now = time.monotonic()
        for _, messages in entries or []:
            for msg_id, fields in messages:
                mid = msg_id.decode() if isinstance(msg_id, bytes) else str(msg_id)
                f = {k.decode(): v.decode() for k, v in fields.items()}
                project = int(f["project"]) if f.get("project", "").isdigit() else None
                if project is None and f.get("action") != SCHEDULED_ACTION:
                    self.redis.xack(EVENTS_STREAM, GROUP, mid)
                    continue
                if f.get("action") == SCHEDULED_ACTION:
                    self._take_scheduled(mid, f.get("project", ""))
                    continue
                st = self.projects.setdefault(project, ProjectState())
                st.event_ids.append(mid)
                st.last_event = now
                if f.get("action") == "START_TRAINING":
                    st.forced = True
                elif f.get("action") in CHANGE_ACTIONS:
                    ann = json.loads(f.get("annotations") or "[]")
                    st.changes += max(1, len(ann))

    def _take_scheduled(self, event_id: str, target: str) -> None:
        """A scheduled firing for one project, or for every known project (``all``) that has
        no schedule entry of its own. It does not restart the webhook debounce."""
        if target == ALL:
            known = set(self.cache.projects()) | set(self.projects)
            projects = sorted(p for p in known if self.schedule.covers_by_default(p))
        else:
            projects = [int(target)] if target.isdigit() else []
        if not projects:
            log.info("scheduled round for %s: no project to train", target or "?")
            self.redis.xack(EVENTS_STREAM, GROUP, event_id)
            return
        for project in projects:
            st = self.projects.setdefault(project, ProjectState())
            st.scheduled = True
            st.event_ids.append(event_id)

    def poll(self, block_ms: int = 1000) -> None:
        """Read new events (and, first, events this consumer got but never acknowledged)."""
        if not self._recovered:
            # once per process: what this consumer read before it died without acknowledging
            self._ensure_group()
            self._take(self.redis.xreadgroup(GROUP, self.consumer, {EVENTS_STREAM: "0"}))
            self._recovered = True
        try:
            entries = self.redis.xreadgroup(
                GROUP, self.consumer, {EVENTS_STREAM: ">"}, count=1000, block=block_ms
            )
        except redis.exceptions.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("the event stream is gone (Redis lost its data?); recreating it")
            self._ensure_group()
            self._last_resync = 0.0  # changes may have been missed: resync soon
            return
        self._take(entries)

    # ------------------------------------------------------------------ rounds
    def run_due(self) -> list[RoundReport]:
        reports = []
        now = time.monotonic()
        for project, st in list(self.projects.items()):
            if due(st, self.settings, now):
                # a scheduled round skips a project with nothing new; other triggers do not
                scheduled = (
                    st.scheduled and not st.forced and st.changes < self.settings.train_min_new
                )
                if st.forced:
                    reason = "START_TRAINING"
                elif st.scheduled:
                    reason = "scheduled" + (f", {st.changes} change(s)" if st.changes else "")
                else:
                    reason = f"{st.changes} change(s)"
                report = self.round(project, reason, scheduled=scheduled)
                reports.append(report)
                shared = {i for p, o in self.projects.items() if p != project for i in o.event_ids}
                done = [i for i in st.event_ids if i not in shared]
                self.redis.xack(EVENTS_STREAM, GROUP, *done) if done else None
                # a failed round is tried again by the interval trigger
                retry = max(st.changes, 1) if report.status == "failed" else 0
                self.projects[project] = ProjectState(changes=retry, last_round=time.monotonic())
        return reports

    def training_set(self, project: int) -> tuple[list[str], list[tuple[int, Any, Any]], str]:
        """Sync the project from Label Studio; its labels, annotated samples and a fingerprint
        of them (which annotations, which revisions)."""
        self.last_sync = self.cache.sync(self.client, project, self.fetch)
        manifest = self.cache.load_manifest(project)
        labels = manifest.labels if manifest else []
        samples = [(s.task, img, m) for s, img, m in self.cache.samples(project)]
        revisions = sorted(
            (s.task, s.annotation, s.updated_at)
            for s in (manifest.samples.values() if manifest else [])
        )
        digest = hashlib.sha256(json.dumps([labels, revisions]).encode()).hexdigest()
        return labels, samples, digest

    def round(self, project: int, reason: str, scheduled: bool = False) -> RoundReport:
        """Sync the project from Label Studio and run one round for it, under the global lock.
        ``scheduled``: skip it when the project's annotations are those of its last round."""
        with self.round_lock():
            self._status("syncing", project)
            labels, samples, fingerprint = self.training_set(project)
            last = self.redis.hget(TRAINED_KEY, str(project))
            if scheduled and last is not None and last.decode() == fingerprint:
                report = RoundReport(
                    "skipped",
                    "scheduled: nothing new since the last round",
                    project,
                    self.registry.current(),
                )
                log.info(
                    "project %s: scheduled round skipped: nothing new since the last round", project
                )
            else:
                report = self._run_round(project, reason, labels, samples)
            if report.status in ("promoted", "rejected"):
                self.redis.hset(TRAINED_KEY, str(project), fingerprint)
            self._write_correction_rates()
            sync = self.last_sync.__dict__ if self.last_sync is not None else None
            self.redis.lpush(
                ROUNDS_KEY, json.dumps({**report.to_json(), "at": time.time(), "sync": sync})
            )
            self.redis.ltrim(ROUNDS_KEY, 0, 199)
            record_round(self.redis, report)
            if report.status in ("promoted", "rejected"):
                write_versions_png(self.registry, self.settings)
            self._status("idle", None)
        if report.status == "promoted" and self.settings.active_learning:
            self.active_learning(project)
        return report

    def _run_round(
        self, project: int, reason: str, labels: list[str], samples: list[Any]
    ) -> RoundReport:
        self._status("training", project)
        sides = self.cache.load_sides(project)
        try:
            report = run_round(
                self.registry,
                self.settings,
                samples,
                labels,
                project=project,
                reason=reason,
                progress=self._progress,
                should_stop=self.stop_event.is_set,
                sides=sides,
                cluster=self.publisher,
            )
        except (DistributedRunError, ClusterDataError) as e:
            why = self.publisher.explain(e) if self.publisher is not None else str(e)
            log.error("round for project %s failed, nothing promoted: %s", project, why)
            return RoundReport("failed", why, project, self.registry.current())
        finally:
            if self.publisher is not None:
                self.publisher.withdraw()
        if report.sides:
            self.cache.save_sides(project, {**sides, **report.sides})
        return report

    @contextlib.contextmanager
    def round_lock(self) -> Iterator[None]:
        """Hold the global round lock (one round at a time across trainer processes).

        The lock has a short TTL (``round_lock_ttl`` seconds) that a thread renews while the
        round runs, so that a trainer killed mid-round frees it within that time instead of
        blocking every later round.
        """
        lock = self.redis.lock(
            LOCK_KEY, timeout=self.round_lock_ttl, blocking_timeout=6 * 3600, thread_local=False
        )
        with lock:
            stop = threading.Event()

            def renew() -> None:
                while not stop.wait(self.round_lock_ttl / 3):
                    try:
                        lock.reacquire()
                    except redis.exceptions.RedisError as e:  # LockError too
                        log.warning("could not renew the round lock: %s", e)

            renewer = threading.Thread(target=renew, name="round-lock", daemon=True)
            renewer.start()
            try:
                yield
            finally:
                stop.set()
                renewer.join()

    def active_learning(self, project: int) -> str | None:
        """Re-predict the project's tasks with the new version (through the workers); the
        predictions' scores rank the most uncertain tasks first (sort by score, ascending)."""
        from contracts.preannotate import start_run

        run_id, _ = start_run(self.redis, project, reason="active learning after promotion")
        log.info("project %s: re-predicting with the new version (run %s)", project, run_id)
        return run_id

    def _write_correction_rates(self) -> None:
        rates = correction_rates(self.cache)
        path = self.settings.model_dir / "correction_rates.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rates, indent=2))
        tmp.replace(path)

    def _progress(self, event: Any) -> None:
        report_progress(self.redis, event)

    def _status(self, state: str, project: int | None) -> None:
        self.redis.hset(
            STATUS_KEY,
            mapping={
                "state": state,
                "project": "" if project is None else project,
                "at": time.time(),
            },
        )

    # ------------------------------------------------------------------ main loop
    def resync_known_projects(self) -> None:
        """Sync every project of the dataset cache; one whose annotations changed while no event
        said so (events lost with Redis, or the trainer was down) is marked for a round."""
        for project in self.cache.projects():
            try:
                rep = self.cache.sync(self.client, project, self.fetch)
            except Exception as e:  # one unreachable project must not stop the others
                log.error("project %s: resync failed: %s", project, e)
                continue
            changed = rep.added + rep.updated + rep.removed
            if changed:
                st = self.projects.setdefault(project, ProjectState())
                st.changes += changed
                log.info("project %s: %d change(s) found by resync", project, changed)
        self._last_resync = time.monotonic()

    def run_forever(self) -> None:
        log.info("trainer %s listening for webhook events", self.consumer)
        self.resync_known_projects()
        self.start_schedule()
        try:
            self._serve()
        finally:
            if self.scheduler is not None:
                self.scheduler.stop()

    def start_schedule(self) -> None:
        """Run rq's cron scheduler for ``SAM2UNET_TRAIN_CRON`` (if set) in a thread."""
        if self.schedule and self.scheduler is None:
            self.scheduler = ScheduleRunner(self.redis, self.schedule)
            self.scheduler.start()

    def step(self, block_ms: int = 1000) -> list[RoundReport]:
        """One turn of the main loop: scheduled jobs due, new events, rounds due."""
        if self.scheduler is not None:
            self.scheduler.perform_due()
        self.poll(block_ms=block_ms)
        return self.run_due()

    def _serve(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.step(block_ms=1000)
                if time.monotonic() - self._last_resync >= self.settings.train_interval_min * 60:
                    self.resync_known_projects()
            except redis.exceptions.ConnectionError as e:
                log.error("Redis unavailable (%s); retrying in 2 s", e)
                self.stop_event.wait(2)
