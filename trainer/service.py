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

from contracts.events import (
    CHANGE_ACTIONS,
    EVENTS_STREAM,
    SCHEDULED_ROUND,
    START_TRAINING,
    TrainerEvent,
)
from contracts.metrics import ROUNDS_KEY, record_round
from contracts.metrics import TRAINER_STATUS_KEY as STATUS_KEY
from contracts.schedule import ALL, parse_schedule
from contracts.settings import Settings
from contracts.trainer_state import FAILING_KEY
from modelstore.registry import ModelRegistry
from sam2unet.distributed.launcher import DistributedRunError, parse_devices
from sam2unet.exceptions import ConfigError
from trainer.cluster import ClusterDataError, RoundPublisher, report_progress
from trainer.dataset import DatasetCache, correction_rates
from trainer.plots import write_versions_png
from trainer.prompt_masks import PromptMasks
from trainer.round import RoundReport, run_round
from trainer.schedule import ScheduleRunner

log = logging.getLogger(__name__)

GROUP = "sam2unet-trainer"
LOCK_KEY = "sam2unet:trainer:round"
ROUND_LOCK_TTL = 60.0  # seconds; renewed while a round runs
TRAINED_KEY = "sam2unet:trainer:trained"  # project -> fingerprint of its last round's data


@dataclass
class ProjectState:
    changes: int = 0
    forced: bool = False
    scheduled: bool = False
    last_event: float = 0.0
    last_round: float = field(default_factory=time.monotonic)
    event_ids: list[str] = field(default_factory=list)
    failures: int = 0  # failed rounds in a row
    retry_at: float = 0.0  # no round before this (monotonic time): the back-off
    failure: str = ""  # the last failed round's reason


def due(state: ProjectState, settings: Settings, now: float) -> bool:
    """Whether a project's round should start now."""
    if now < state.retry_at:
        return False
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
        self.cache = DatasetCache(
            settings.dataset_dir,
            settings.sync_margin,
            settings.sync_full_every,
            prompt_masks=PromptMasks(self.registry, settings),
            derive_prompt_masks=settings.derive_prompt_masks,
        )
        self.consumer = consumer or settings.trainer_consumer or socket.gethostname()
        self.projects: dict[int, ProjectState] = {}
        self._held: set[str] = set()  # ids of the events the project states hold
        self._last_claim = 0.0
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
        """Take stream entries into the project states; acknowledge at once those that ask for
        nothing (unknown action, no project) or cannot be read."""
        now = time.monotonic()
        for _, messages in entries or []:
            for msg_id, fields in messages or []:
                if msg_id is None:  # deleted from the stream while pending (Redis 6)
                    continue
                mid = _text(msg_id)
                if mid in self._held:
                    continue
                try:
                    held = self._take_one(mid, fields, now)
                except Exception as e:  # a malformed entry must not stop the trainer
                    log.warning("event %s unreadable (%s); acknowledged and dropped", mid, e)
                    held = False
                if not held:
                    self._ack([mid])

    def _take_one(self, mid: str, raw: Any, now: float) -> bool:
        """One entry; whether a project state now holds it."""
        event = TrainerEvent.from_fields(raw)
        action, target = event.action, event.project
        if action == SCHEDULED_ROUND:
            return self._take_scheduled(mid, event)
        project = event.project_id
        if project is None or (action not in CHANGE_ACTIONS and action != START_TRAINING):
            log.info("event %s (%r, project %r) asks for no round", mid, action[:40], target[:40])
            return False
        st = self.projects.setdefault(project, ProjectState())
        st.last_event = now
        if action == START_TRAINING:
            st.forced = True
        else:
            st.changes += event.changes
        if now < st.retry_at:
            # the project backs off after failed rounds: its retry carries this trigger, and the
            # event is not kept pending for what may be an hour
            log.debug("event %s: project %s backs off; acknowledged", mid, project)
            return False
        st.event_ids.append(mid)
        self._held.add(mid)
        return True

    def _take_scheduled(self, event_id: str, event: TrainerEvent) -> bool:
        """A scheduled firing for one project, or for every known project (``all``) that has
        no schedule entry of its own. It does not restart the webhook debounce."""
        target = event.project
        if target == ALL:
            known = set(self.cache.projects()) | set(self.projects)
            projects = sorted(p for p in known if self.schedule.covers_by_default(p))
        else:
            project = event.project_id
            projects = [project] if project is not None else []
        if not projects:
            log.info("scheduled round for %s: no project to train", target[:40] or "?")
            return False
        for project in projects:
            st = self.projects.setdefault(project, ProjectState())
            st.scheduled = True
            st.event_ids.append(event_id)
        self._held.add(event_id)
        return True

    def _ack(self, ids: list[str]) -> None:
        """Acknowledge events. They leave ``_held`` first: should Redis fail here, they stay
        pending and come back through :meth:`claim_stale`."""
        if not ids:
            return
        self._held.difference_update(ids)
        self.redis.xack(EVENTS_STREAM, GROUP, *ids)

    def held_events(self) -> set[str]:
        """Ids of the events this trainer holds for rounds to come."""
        return set(self._held)

    def _touch_held(self) -> None:
        """Reset the idle time of the events this trainer holds (XCLAIM to itself), so that no
        other trainer takes them over while this one lives."""
        held = list(self._held)
        for i in range(0, len(held), 500):
            self.redis.xclaim(
                EVENTS_STREAM, GROUP, self.consumer, 0, held[i : i + 500], justid=True
            )

    def claim_stale(self) -> int:
        """Take over the events other consumers (a dead trainer, this one's predecessor under
        another name) left unacknowledged for ``SAM2UNET_TRAINER_CLAIM_IDLE`` seconds; how many
        were taken."""
        self._touch_held()
        idle_ms = max(1, int(self.settings.trainer_claim_idle * 1000))
        start: Any = "0-0"
        taken = 0
        for _ in range(100):  # at most 10,000 entries per call
            answer = self.redis.xautoclaim(
                EVENTS_STREAM, GROUP, self.consumer, idle_ms, start_id=start, count=100
            )
            start, messages = answer[0], answer[1]
            fresh = [(i, f) for i, f in messages if i is not None and _text(i) not in self._held]
            if fresh:
                log.info("took over %d event(s) left unacknowledged by another trainer", len(fresh))
                taken += len(fresh)
                self._take([(EVENTS_STREAM, fresh)])
            if _text(start) == "0-0":
                break
        return taken

    def poll(self, block_ms: int = 1000) -> None:
        """Read new events (and, first, events this consumer got but never acknowledged)."""
        if not self._recovered:
            # once per process: what this consumer read before it died without acknowledging
            self._ensure_group()
            self._take(self.redis.xreadgroup(GROUP, self.consumer, {EVENTS_STREAM: "0"}))
            self._recovered = True
        now = time.monotonic()
        if now - self._last_claim >= min(self.settings.trainer_claim_idle / 3, 60.0):
            self._last_claim = now
            try:
                self.claim_stale()
            except redis.exceptions.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
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
                if st.failures:
                    reason += f", after {st.failures} failed round(s)"
                report = self._round_safely(project, reason, scheduled)
                reports.append(report)
                shared = {i for p, o in self.projects.items() if p != project for i in o.event_ids}
                done = [i for i in st.event_ids if i not in shared]
                self.projects[project] = self._after_round(project, st, report)
                self._ack(done)
        return reports

    def _round_safely(self, project: int, reason: str, scheduled: bool) -> RoundReport:
        """:meth:`round`, and a ``failed`` report for what escapes it (the lock or Redis)."""
        try:
            return self.round(project, reason, scheduled=scheduled)
        except Exception as e:
            why = _reason(e)
            log.error("round for project %s failed: %s", project, why, exc_info=_unexpected(e))
            return RoundReport("failed", why, project, None)

    def _after_round(self, project: int, st: ProjectState, report: RoundReport) -> ProjectState:
        """The project's state after a round: fresh after one that worked; after a failed one,
        its triggers kept and the next round held back (back-off)."""
        now = time.monotonic()
        if report.status != "failed":
            if st.failures:
                log.info(
                    "rounds of project %s work again after %d failed round(s)", project, st.failures
                )
                self._set_failing(project, None)
            return ProjectState(last_round=now)
        failures = st.failures + 1
        s = self.settings
        delay = min(s.train_backoff_max, s.train_backoff * 2.0 ** min(failures - 1, 60))
        if failures == 1:
            log.warning(
                "rounds of project %s fail: %s; trying again in %.0f s, then backing off up to "
                "%.0f s (SAM2UNET_TRAIN_BACKOFF_MAX)",
                project,
                report.reason,
                delay,
                s.train_backoff_max,
            )
        elif report.reason != st.failure:
            log.warning("rounds of project %s still fail, now: %s", project, report.reason)
        else:
            log.debug(
                "project %s: round failed again (%d in a row); next try in %.0f s",
                project,
                failures,
                delay,
            )
        self._set_failing(project, {"failures": failures, "reason": report.reason,
                                    "next_try": time.time() + delay})  # fmt: skip
        return ProjectState(
            changes=st.changes if (st.forced or st.scheduled) else max(st.changes, 1),
            forced=st.forced,
            scheduled=st.scheduled,
            last_round=now,
            failures=failures,
            retry_at=now + delay,
            failure=report.reason,
        )

    def _set_failing(self, project: int, row: dict[str, Any] | None) -> None:
        """Publish (or, ``row`` None, clear) a project's failing rounds for /health."""
        try:
            if row is None:
                self.redis.hdel(FAILING_KEY, str(project))
                return
            old = self.redis.hget(FAILING_KEY, str(project))
            since = json.loads(old).get("since") if old else None
            row = {**row, "since": since or time.time()}
            self.redis.hset(FAILING_KEY, str(project), json.dumps(row))
        except (redis.exceptions.RedisError, ValueError, AttributeError) as e:
            log.warning("project %s: could not record its failing rounds: %s", project, e)

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
                # the failing state's changes are logged once each (_after_round); a bug each time
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
                prompt_masks=self.last_sync.prompts if self.last_sync is not None else None,
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
        if not lock.acquire():
            raise redis.exceptions.LockError("the round lock stayed taken for 6 hours")
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.round_lock_ttl / 3):
                try:
                    lock.reacquire()
                    self._touch_held()  # a long round must not lose its events to a claim
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
    from contracts.errors import AssistError

    expected = (AssistError, redis.exceptions.RedisError, OSError, DistributedRunError,
                ClusterDataError)  # fmt: skip
    return not isinstance(e, expected)


def _reason(e: BaseException) -> str:
    """A failed round's reason: the error's message, with its kind when it is unexpected."""
    text = str(e) or type(e).__name__
    if _unexpected(e) or isinstance(e, redis.exceptions.RedisError):
        text = f"{type(e).__name__}: {text}"
    return text[:500]
