"""The trainer's per-project state: what triggers a project's next round, when it is due, and
how a failed round holds the next one back.

Events add to a project's :class:`ProjectState` (:func:`take_event`): changes counted,
``START_TRAINING`` forcing a round, a scheduled firing asking for one. A round is due
(:func:`due`) after ``SAM2UNET_TRAIN_DEBOUNCE`` seconds of quiet once ``SAM2UNET_TRAIN_MIN_NEW``
changes arrived, ``SAM2UNET_TRAIN_INTERVAL_MIN`` minutes passed with a change, or it was forced
or scheduled. After a failed round (:func:`after_round`) the project keeps its triggers and
waits ``SAM2UNET_TRAIN_BACKOFF`` seconds, doubling per failure in a row up to
``SAM2UNET_TRAIN_BACKOFF_MAX``; its failing rounds are published for ``/health``
(:data:`contracts.trainer_state.FAILING_KEY`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from contracts.events import CHANGE_ACTIONS, SCHEDULED_ROUND, START_TRAINING, TrainerEvent
from contracts.schedule import ALL, Schedule
from contracts.settings import Settings
from contracts.trainer_state import FAILING_KEY
from trainer.round import RoundReport

log = logging.getLogger(__name__)


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


def take_event(
    projects: dict[int, ProjectState],
    event_id: str,
    event: TrainerEvent,
    now: float,
    schedule: Schedule,
    known: Callable[[], Iterable[int]],
) -> bool:
    """Add one event to the project states; whether a state now holds it (until its round).
    ``known``: the projects of the dataset cache, for a scheduled round of ``all``."""
    action, target = event.action, event.project
    if action == SCHEDULED_ROUND:
        return _take_scheduled(projects, event_id, event, schedule, known)
    project = event.project_id
    if project is None or (action not in CHANGE_ACTIONS and action != START_TRAINING):
        log.info("event %s (%r, project %r) asks for no round", event_id, action[:40], target[:40])
        return False
    st = projects.setdefault(project, ProjectState())
    st.last_event = now
    if action == START_TRAINING:
        st.forced = True
    else:
        st.changes += event.changes
    if now < st.retry_at:
        # the project backs off after failed rounds: its retry carries this trigger, and the
        # event is not kept pending for what may be an hour
        log.debug("event %s: project %s backs off; acknowledged", event_id, project)
        return False
    st.event_ids.append(event_id)
    return True


def _take_scheduled(
    projects: dict[int, ProjectState],
    event_id: str,
    event: TrainerEvent,
    schedule: Schedule,
    known: Callable[[], Iterable[int]],
) -> bool:
    """A scheduled firing for one project, or for every known project (``all``) that has
    no schedule entry of its own. It does not restart the webhook debounce."""
    target = event.project
    if target == ALL:
        every = set(known()) | set(projects)
        chosen = sorted(p for p in every if schedule.covers_by_default(p))
    else:
        project = event.project_id
        chosen = [project] if project is not None else []
    if not chosen:
        log.info("scheduled round for %s: no project to train", target[:40] or "?")
        return False
    for project in chosen:
        st = projects.setdefault(project, ProjectState())
        st.scheduled = True
        st.event_ids.append(event_id)
    return True


def round_reason(st: ProjectState, settings: Settings) -> tuple[str, bool]:
    """Why a due round runs, and whether it is a scheduled one that skips a project with
    nothing new (other triggers do not skip)."""
    scheduled = st.scheduled and not st.forced and st.changes < settings.train_min_new
    if st.forced:
        reason = "START_TRAINING"
    elif st.scheduled:
        reason = "scheduled" + (f", {st.changes} change(s)" if st.changes else "")
    else:
        reason = f"{st.changes} change(s)"
    if st.failures:
        reason += f", after {st.failures} failed round(s)"
    return reason, scheduled


def after_round(
    connection: redis.Redis,
    settings: Settings,
    project: int,
    st: ProjectState,
    report: RoundReport,
) -> ProjectState:
    """The project's state after a round: fresh after one that worked; after a failed one,
    its triggers kept and the next round held back (back-off)."""
    now = time.monotonic()
    if report.status != "failed":
        if st.failures:
            log.info(
                "rounds of project %s work again after %d failed round(s)", project, st.failures
            )
            set_failing(connection, project, None)
        return ProjectState(last_round=now)
    failures = st.failures + 1
    s = settings
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
    set_failing(connection, project, {"failures": failures, "reason": report.reason,
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


def set_failing(connection: redis.Redis, project: int, row: dict[str, Any] | None) -> None:
    """Publish (or, ``row`` None, clear) a project's failing rounds for /health."""
    try:
        if row is None:
            connection.hdel(FAILING_KEY, str(project))
            return
        old = connection.hget(FAILING_KEY, str(project))
        since = json.loads(old).get("since") if old else None
        row = {**row, "since": since or time.time()}
        connection.hset(FAILING_KEY, str(project), json.dumps(row))
    except (redis.exceptions.RedisError, ValueError, AttributeError) as e:
        log.warning("project %s: could not record its failing rounds: %s", project, e)
