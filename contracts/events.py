"""The trainer's event stream: what the backend (webhooks) and the training schedule append,
and what the trainer reads.

Each entry of the Redis stream :data:`EVENTS_STREAM` is one :class:`TrainerEvent`, written by
:meth:`TrainerEvent.to_fields` through :func:`append` and read back by
:meth:`TrainerEvent.from_fields`, which raises :class:`ValueError` for an entry it cannot read
(the trainer logs and acknowledges such an entry; it never stops on one).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

EVENTS_STREAM = "sam2unet:events"
#: Entries the stream keeps at most (approximate trimming on each append).
EVENTS_MAXLEN = 100_000

#: Annotation changes: the trainer counts them per project.
CHANGE_ACTIONS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}
)
#: Label Studio's "Start Training": a round at once.
START_TRAINING = "START_TRAINING"
#: A firing of ``SAM2UNET_TRAIN_CRON`` (appended by the trainer's own schedule).
SCHEDULED_ROUND = "SCHEDULED_ROUND"
#: Webhook actions the trainer acts on; the backend records only these.
TRAINER_ACTIONS = CHANGE_ACTIONS | {START_TRAINING}

#: Changes one event counts for at most.
MAX_CHANGES = 1_000_000
_MAX_PROJECT = 2**63


@dataclass(frozen=True)
class TrainerEvent:
    """One entry of the event stream.

    ``project``: a project id, ``all`` (:data:`contracts.schedule.ALL`, scheduled rounds of
    every project without a schedule of its own) or empty;
    ``annotations`` and ``tasks``: the ids the webhook named (capped by the backend);
    ``count``: how many annotations it named (None: not recorded, the ids count);
    ``updated_at``: the annotation's time stamp as Label Studio sent it; ``received_at``: Unix
    seconds when it was appended."""

    action: str
    project: str = ""
    annotations: tuple[int, ...] = ()
    count: int | None = None
    tasks: tuple[int, ...] = ()
    updated_at: str = ""
    received_at: float = field(default_factory=time.time)

    @property
    def project_id(self) -> int | None:
        """The project as an id, or None (empty, ``all``, not a number, out of range)."""
        p = self.project
        if p.isascii() and p.isdigit() and int(p) < _MAX_PROJECT:
            return int(p)
        return None

    @property
    def changes(self) -> int:
        """How many annotations the event changed: ``count`` when recorded, else the listed
        ids; at least 1, at most :data:`MAX_CHANGES`."""
        n = self.count if self.count is not None else len(self.annotations)
        return max(1, min(n, MAX_CHANGES))

    def to_fields(self) -> dict[str, str]:
        """The stream entry's fields (all text)."""
        return {
            "action": self.action,
            "project": self.project,
            "annotations": json.dumps(list(self.annotations)),
            "count": "" if self.count is None else str(self.count),
            "tasks": json.dumps(list(self.tasks)),
            "updated_at": self.updated_at,
            "received_at": repr(self.received_at),
        }

    @classmethod
    def from_fields(cls, raw: Any) -> TrainerEvent:
        """The event of a stream entry's fields (bytes or text). :class:`ValueError` naming
        the field for an entry that is no event: no fields, no action, ids that are not a
        JSON list of integers, a count that is not a whole number, a time that is not one."""
        if not isinstance(raw, Mapping):
            raise ValueError("no fields (deleted from the stream?)")
        f = {_text(k): _text(v) for k, v in raw.items()}
        action = f.get("action", "")
        if not action:
            raise ValueError("no action")
        count = f.get("count", "")
        if count and not (count.isascii() and count.isdigit()):
            raise ValueError(f"count {count[:40]!r} is not a whole number")
        return cls(
            action=action,
            project=f.get("project", ""),
            annotations=_ids(f, "annotations"),
            count=int(count) if count else None,
            tasks=_ids(f, "tasks"),
            updated_at=f.get("updated_at", ""),
            received_at=_time(f.get("received_at", "")),
        )


def append(connection: redis.Redis, event: TrainerEvent) -> str:
    """Append ``event`` to the stream (trimmed to about :data:`EVENTS_MAXLEN` entries); its
    id."""
    event_id = connection.xadd(
        EVENTS_STREAM, event.to_fields(), maxlen=EVENTS_MAXLEN, approximate=True
    )
    return _text(event_id)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _ids(f: dict[str, str], name: str) -> tuple[int, ...]:
    text = f.get(name, "")
    if not text:
        return ()
    try:
        ids = json.loads(text)
    except ValueError:
        raise ValueError(f"{name} is not JSON") from None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise ValueError(f"{name} is not a list of integers")
    return tuple(ids)


def _time(text: str) -> float:
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"received_at {text[:40]!r} is not a time") from None
    if not math.isfinite(value):
        raise ValueError(f"received_at {text[:40]!r} is not a time")
    return value
