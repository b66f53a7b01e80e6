"""The trainer service: consumes webhook events, schedules rounds, promotes, and feeds new
predictions back to Label Studio.

Webhooks are only triggers. Each event names a project; the service counts changes per project
and starts a round (sync from Label Studio, then train / evaluate / promote) when
``SAM2UNET_TRAIN_MIN_NEW`` changes arrived, when ``SAM2UNET_TRAIN_INTERVAL_MIN`` minutes passed
since the last round and anything changed, or at once on ``START_TRAINING``; each trigger waits
``SAM2UNET_TRAIN_DEBOUNCE`` seconds of quiet, so a burst of webhooks becomes one round. One round
runs at a time (a Redis lock also keeps several trainer processes from overlapping). Events are
acknowledged once their round ended; a trainer that dies mid-round gets them again at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from contracts.metrics import record_round
from contracts.registry import ModelRegistry
from contracts.settings import Settings
from trainer.dataset import DatasetCache, correction_rates
from trainer.plots import write_versions_png
from trainer.round import RoundReport, run_round

log = logging.getLogger(__name__)

EVENTS_STREAM = "sam2unet:events"
GROUP = "sam2unet-trainer"
LOCK_KEY = "sam2unet:trainer:round"
ROUNDS_KEY = "sam2unet:trainer:rounds"
ROUND_LOCK_TTL = 60.0  # seconds; renewed while a round runs
STATUS_KEY = "sam2unet:trainer:status"
CHANGE_ACTIONS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}
)


@dataclass
class ProjectState:
    changes: int = 0
    forced: bool = False
    last_event: float = 0.0
    last_round: float = field(default_factory=time.monotonic)
    event_ids: list[str] = field(default_factory=list)


def due(state: ProjectState, settings: Settings, now: float) -> bool:
    """Whether a project's round should start now."""
    quiet = now - state.last_event >= settings.train_debounce
    if state.forced:
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
                if project is None:
                    self.redis.xack(EVENTS_STREAM, GROUP, mid)
                    continue
                st = self.projects.setdefault(project, ProjectState())
                st.event_ids.append(mid)
                st.last_event = now
                if f.get("action") == "START_TRAINING":
                    st.forced = True
                elif f.get("action") in CHANGE_ACTIONS:
                    ann = json.loads(f.get("annotations") or "[]")
                    st.changes += max(1, len(ann))

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
                reports.append(
                    self.round(
                        project, "START_TRAINING" if st.forced else f"{st.changes} change(s)"
                    )
                )
                self.redis.xack(EVENTS_STREAM, GROUP, *st.event_ids) if st.event_ids else None
                self.projects[project] = ProjectState(last_round=time.monotonic())
        return reports

    def round(self, project: int, reason: str) -> RoundReport:
        """Sync the project from Label Studio and run one round for it, under the global lock."""
        with self.round_lock():
            self._status("syncing", project)
            report_sync = self.cache.sync(self.client, project, self.fetch)
            manifest = self.cache.load_manifest(project)
            labels = manifest.labels if manifest else []
            samples = [(s.task, img, m) for s, img, m in self.cache.samples(project)]
            self._status("training", project)
            report = run_round(
                self.registry,
                self.settings,
                samples,
                labels,
                project=project,
                reason=reason,
                progress=self._progress,
                should_stop=self.stop_event.is_set,
            )
            self._write_correction_rates()
            self.redis.lpush(
                ROUNDS_KEY,
                json.dumps({**report.to_json(), "at": time.time(), "sync": report_sync.__dict__}),
            )
            self.redis.ltrim(ROUNDS_KEY, 0, 199)
            record_round(self.redis, report)
            if report.status != "skipped":
                write_versions_png(self.registry, self.settings)
            self._status("idle", None)
        if report.status == "promoted" and self.settings.active_learning:
            self.active_learning(project)
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
        if event.kind == "epoch" or event.step == event.steps:
            log.info(
                "training epoch %d/%d step %d/%d loss %.4f lr %.2e",
                event.epoch,
                event.epochs,
                event.step,
                event.steps,
                event.loss,
                event.lr,
            )
            self.redis.hset(
                STATUS_KEY,
                mapping={"epoch": event.epoch, "epochs": event.epochs, "loss": f"{event.loss:.5f}"},
            )

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
        while not self.stop_event.is_set():
            try:
                self.poll(block_ms=1000)
                self.run_due()
                if time.monotonic() - self._last_resync >= self.settings.train_interval_min * 60:
                    self.resync_known_projects()
            except redis.exceptions.ConnectionError as e:
                log.error("Redis unavailable (%s); retrying in 2 s", e)
                self.stop_event.wait(2)
