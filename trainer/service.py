"""The trainer service: consumes webhook events, schedules rounds, promotes, and feeds new
predictions back to Label Studio.

Webhooks are only triggers. Each event names a project; the service counts changes per project
and starts a round (sync from Label Studio, then train / evaluate / promote) when
``SAM2UNET_TRAIN_MIN_NEW`` changes arrived, when ``SAM2UNET_TRAIN_INTERVAL_MIN`` minutes passed
since the last round and anything changed, or at once on ``START_TRAINING``; each trigger waits
``SAM2UNET_TRAIN_DEBOUNCE`` seconds of quiet, so a burst of webhooks becomes one round.
``SAM2UNET_TRAIN_CRON`` adds rounds on a schedule (:mod:`trainer.schedule`); a scheduled round
of a project with nothing new since its last round is skipped. One round runs at a time (a Redis
lock also keeps several trainer processes from overlapping). Events are acknowledged once their
round ended; a trainer that dies mid-round gets them again at start (its consumer name on the
stream, ``SAM2UNET_TRAINER_CONSUMER``, defaults to the host name, so it stays the same), and
another trainer takes them over once they were left unacknowledged for
``SAM2UNET_TRAINER_CLAIM_IDLE`` seconds (XAUTOCLAIM); a live trainer keeps the events it holds
fresh so that no other one takes them.

No round kills the trainer: any error in a sync or a round (Label Studio unreachable or without
the project, a Redis error, a bug) makes a ``failed`` round with its reason, recorded like any
other (rounds list, metrics, ``/health``), its events are acknowledged and the round lock freed.
The project's next round then waits ``SAM2UNET_TRAIN_BACKOFF`` seconds, doubling after each
failure in a row up to ``SAM2UNET_TRAIN_BACKOFF_MAX``; the trainer logs when a project starts
failing, when the reason changes and when its rounds work again; events for a project that backs
off are acknowledged at once, their triggers kept for its retry. An event stream entry the
trainer cannot read is acknowledged and logged.

The event stream's reading, holding and claiming is :mod:`trainer.inbox`; the per-project
triggers, due times and back-off are :mod:`trainer.projects`; this module runs the rounds and
the main loop.
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
from typing import Any

import redis

from contracts.errors import AssistError
from contracts.events import TrainerEvent
from contracts.metrics import ROUNDS_KEY, record_round
from contracts.metrics import TRAINER_STATUS_KEY as STATUS_KEY
from contracts.preannotate import start_run
from contracts.schedule import parse_schedule
from contracts.settings import Settings
from contracts.trainer_state import FAILING_KEY
from modelstore.registry import ModelRegistry
from sam2unet.distributed.launcher import DistributedRunError, parse_devices
from sam2unet.exceptions import ConfigError
from trainer.cluster import ClusterDataError, RoundPublisher, report_progress
from trainer.dataset import DatasetCache, correction_rates
from trainer.inbox import EventInbox
from trainer.plots import write_versions_png
from trainer.projects import ProjectState, after_round, due, round_reason, take_event
from trainer.prompt_masks import PromptMasks
from trainer.round import RoundReport, run_round
from trainer.schedule import ScheduleRunner

log = logging.getLogger(__name__)

LOCK_KEY = "sam2unet:trainer:round"
ROUND_LOCK_TTL = 60.0  # seconds; renewed while a round runs
TRAINED_KEY = "sam2unet:trainer:trained"  # project -> fingerprint of its last round's data


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
        self.cache = DatasetCache(
            settings.dataset_dir,
            settings.sync_margin,
            settings.sync_full_every,
            prompt_masks=PromptMasks(self.registry, settings),
            derive_prompt_masks=settings.derive_prompt_masks,
        )
        self.consumer = consumer or settings.trainer_consumer or socket.gethostname()
        self.inbox = EventInbox(connection, self.consumer, settings.trainer_claim_idle)
        self.projects: dict[int, ProjectState] = {}
        self.stop_event = threading.Event()
        self.round_lock_ttl = ROUND_LOCK_TTL
        self._last_resync = time.monotonic()
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
    def _take_event(self, event_id: str, event: TrainerEvent, now: float) -> bool:
        return take_event(self.projects, event_id, event, now, self.schedule, self.cache.projects)

    def held_events(self) -> set[str]:
        """Ids of the events this trainer holds for rounds to come."""
        return set(self.inbox.held)

    def claim_stale(self) -> int:
        """Take over the events other trainers left unacknowledged for
        ``SAM2UNET_TRAINER_CLAIM_IDLE`` seconds; how many were taken."""
        return self.inbox.claim_stale(self._take_event)

    def poll(self, block_ms: int = 1000) -> None:
        """Read new events (and, first, events this consumer got but never acknowledged)."""
        if not self.inbox.poll(self._take_event, block_ms):
            self._last_resync = 0.0  # changes may have been missed: resync soon

    # ------------------------------------------------------------------ rounds
    def run_due(self) -> list[RoundReport]:
        reports = []
        now = time.monotonic()
        for project, st in list(self.projects.items()):
            if due(st, self.settings, now):
                reason, scheduled = round_reason(st, self.settings)
                report = self._round_safely(project, reason, scheduled)
                reports.append(report)
                shared = {i for p, o in self.projects.items() if p != project for i in o.event_ids}
                done = [i for i in st.event_ids if i not in shared]
                self.projects[project] = after_round(self.redis, self.settings, project, st, report)
                self.inbox.ack(done)
        return reports

    def _round_safely(self, project: int, reason: str, scheduled: bool) -> RoundReport:
        """:meth:`round`, and a ``failed`` report for what escapes it (the lock or Redis)."""
        try:
            return self.round(project, reason, scheduled=scheduled)
        except Exception as e:
            why = _reason(e)
            log.error("round for project %s failed: %s", project, why, exc_info=_unexpected(e))
            return RoundReport("failed", why, project, None)

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
            self.last_sync = None
            try:
                report = self._sync_and_run(project, reason, scheduled)
            except Exception as e:  # any failure is this round's outcome, not the trainer's end
                why = _reason(e)
                # the failing state's changes are logged once each (after_round); a bug each time
                level = logging.ERROR if _unexpected(e) else logging.DEBUG
                log.log(
                    level,
                    "round for project %s failed, nothing promoted: %s",
                    project,
                    why,
                    exc_info=_unexpected(e),
                )
                report = RoundReport("failed", why, project, self._current())
            self._record(report)
        if report.status == "promoted" and self.settings.active_learning:
            try:
                self.active_learning(project)
            except Exception as e:
                log.error("project %s: re-predicting with the new version failed: %s", project, e)
        return report

    def _sync_and_run(self, project: int, reason: str, scheduled: bool) -> RoundReport:
        self._status("syncing", project)
        labels, samples, fingerprint = self.training_set(project)
        last = self.redis.hget(TRAINED_KEY, str(project))
        if scheduled and last is not None and last.decode() == fingerprint:
            log.info(
                "project %s: scheduled round skipped: nothing new since the last round", project
            )
            return RoundReport(
                "skipped",
                "scheduled: nothing new since the last round",
                project,
                self.registry.current(),
            )
        report = self._run_round(project, reason, labels, samples)
        if report.status in ("promoted", "rejected"):
            self.redis.hset(TRAINED_KEY, str(project), fingerprint)
        return report

    def _current(self) -> str | None:
        try:
            return self.registry.current()
        except Exception:  # Redis or the registry is what failed
            return None

    def _record(self, report: RoundReport) -> None:
        """Record a round (rounds list, metrics, plots, state); a failure to record is logged,
        it does not change the round's outcome."""
        try:
            self._write_correction_rates()
        except (OSError, ValueError) as e:
            log.warning("could not write correction_rates.json: %s", e)
        sync = self.last_sync.__dict__ if self.last_sync is not None else None
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                entry = {**report.to_json(), "at": time.time(), "sync": sync}
                pipe.lpush(ROUNDS_KEY, json.dumps(entry, default=str))
                pipe.ltrim(ROUNDS_KEY, 0, 199)
                pipe.execute()
        except redis.exceptions.RedisError as e:
            log.warning("round for project %s not recorded: %s", report.project, e)
        record_round(self.redis, report)
        if report.status in ("promoted", "rejected"):
            try:
                write_versions_png(self.registry, self.settings)
            except Exception as e:
                log.warning("could not draw the versions plot: %s", e)
        try:
            self._status("idle", None)
        except redis.exceptions.RedisError as e:
            log.warning("could not record the trainer's state: %s", e)

    def _run_round(
        self, project: int, reason: str, labels: list[str], samples: list[Any]
    ) -> RoundReport:
        self._status("training", project)
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
                sides_dir=self.cache.project_dir(project),
                cluster=self.publisher,
                prompt_masks=self.last_sync.prompts if self.last_sync is not None else None,
            )
        except (DistributedRunError, ClusterDataError) as e:
            why = self.publisher.explain(e) if self.publisher is not None else str(e)
            log.error("round for project %s failed, nothing promoted: %s", project, why)
            return RoundReport("failed", why, project, self.registry.current())
        finally:
            if self.publisher is not None:
                self.publisher.withdraw()
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
        if not lock.acquire():
            raise redis.exceptions.LockError("the round lock stayed taken for 6 hours")
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.round_lock_ttl / 3):
                try:
                    lock.reacquire()
                    self.inbox.touch_held()  # a long round must not lose its events to a claim
                except redis.exceptions.RedisError as e:  # LockError too
                    log.warning("could not renew the round lock: %s", e)

        renewer = threading.Thread(target=renew, name="round-lock", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            try:
                lock.release()
            except redis.exceptions.RedisError as e:  # expired, taken over, or Redis down
                log.warning("could not release the round lock (it expires by itself): %s", e)

    def active_learning(self, project: int) -> str | None:
        """Re-predict the project's tasks with the new version (through the workers); the
        predictions' scores rank the most uncertain tasks first (sort by score, ascending)."""
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
        try:
            self.redis.delete(FAILING_KEY)  # what a previous trainer process saw fail
        except redis.exceptions.RedisError as e:
            log.warning("could not clear the failing projects: %s", e)
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
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                log.error("Redis unavailable (%s); retrying in 2 s", e)
                self.stop_event.wait(2)
            except Exception:  # the trainer goes on whatever happened in one turn
                log.exception("trainer loop: unexpected error; going on in 2 s")
                self.stop_event.wait(2)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _unexpected(e: BaseException) -> bool:
    """Whether an error is a bug rather than the world (worth a traceback in the log)."""
    expected = (AssistError, redis.exceptions.RedisError, OSError, DistributedRunError,
                ClusterDataError)  # fmt: skip
    return not isinstance(e, expected)


def _reason(e: BaseException) -> str:
    """A failed round's reason: the error's message, with its kind when it is unexpected."""
    text = str(e) or type(e).__name__
    if _unexpected(e) or isinstance(e, redis.exceptions.RedisError):
        text = f"{type(e).__name__}: {text}"
    return text[:500]
