"""Scheduled training rounds: the ``SAM2UNET_TRAIN_CRON`` syntax, and the next scheduled
rounds as rq's cron scheduler last saved them in Redis (for ``/health`` and ``versions``).

``SAM2UNET_TRAIN_CRON`` holds entries separated by ``;``:

- ``EXPR``: every project the trainer knows, on the cron expression ``EXPR``;
- ``PROJECT=EXPR``: project ``PROJECT`` on its own expression, instead of the default one;
- ``PROJECT=off``: project ``PROJECT`` is not scheduled.

``EXPR`` is a cron expression as croniter reads it (what rq's cron scheduler uses): five fields
``minute hour day month weekday`` in the trainer's local time, e.g. ``0 2 * * *`` (nightly at
02:00) or ``0 * * * 1-5`` (hourly on weekdays); a sixth field gives seconds.
Example: ``SAM2UNET_TRAIN_CRON="0 2 * * *; 7=0 * * * 1-5; 12=off"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

JOB_PREFIX = "sam2unet-train:"  # name of each cron job; then "all" or the project id
SCHEDULE_QUEUE = "sam2unet-schedule"
ALL = "all"


@dataclass(frozen=True)
class Schedule:
    """``default``: the expression for every project (None: none); ``projects``: a project's
    own expression (None: not scheduled)."""

    default: str | None = None
    projects: dict[int, str | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.default is not None or any(v for v in self.projects.values())

    def jobs(self) -> dict[str, str]:
        """``{target: expression}`` of the cron jobs to register: ``all`` and project ids."""
        out = {ALL: self.default} if self.default else {}
        out.update({str(p): e for p, e in sorted(self.projects.items()) if e})
        return out

    def covers_by_default(self, project: int) -> bool:
        return self.default is not None and project not in self.projects


def parse_schedule(text: str | None) -> Schedule:
    """Read ``SAM2UNET_TRAIN_CRON``; a bad entry raises ``ValueError`` naming it."""
    # croniter: only the trainer parses the schedule; the backend reads it without
    from croniter import croniter

    default: str | None = None
    projects: dict[int, str | None] = {}
    for raw in (text or "").split(";"):
        entry = " ".join(raw.split())
        if not entry:
            continue
        target, sep, expr = entry.partition("=")
        if sep:
            target, expr = target.strip(), expr.strip()
            if not target.isdigit():
                raise ValueError(f"train cron entry {entry!r}: PROJECT=EXPR needs a project id")
        else:
            target, expr = "", entry
        if expr.lower() == "off":
            if not target:
                raise ValueError("train cron: 'off' needs a project (PROJECT=off)")
            projects[int(target)] = None
            continue
        if not croniter.is_valid(expr):
            raise ValueError(f"train cron entry {entry!r}: {expr!r} is not a cron expression")
        if target:
            projects[int(target)] = expr
        elif default is not None:
            raise ValueError("train cron: more than one expression for every project")
        else:
            default = expr
    return Schedule(default, projects)


def scheduled_rounds(connection: Any) -> list[dict[str, Any]]:
    """The next scheduled round of each schedule entry, soonest first:
    ``{"project": "all" or id, "cron": EXPR, "next": ISO time (UTC)}``. Empty when no trainer
    runs a schedule (or Redis is unreachable)."""
    # rq: only where the schedule is read; trainer.projects reads the Schedule type without it
    import redis
    from rq.cron import CronScheduler

    try:
        schedulers = CronScheduler.all(connection)
    except redis.exceptions.RedisError as e:
        log.warning("could not read the training schedule: %s", e)
        return []
    soonest: dict[str, dict[str, Any]] = {}
    for scheduler in schedulers:
        for job in scheduler.get_jobs():
            if not job.name.startswith(JOB_PREFIX) or job.next_enqueue_time is None:
                continue
            target = job.name[len(JOB_PREFIX) :]
            row = {
                "project": int(target) if target.isdigit() else target,
                "cron": job.cron,
                "next": job.next_enqueue_time.isoformat(),
            }
            if target not in soonest or row["next"] < soonest[target]["next"]:
                soonest[target] = row
    return sorted(soonest.values(), key=lambda r: r["next"])
