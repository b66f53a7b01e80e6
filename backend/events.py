"""Webhook events, recorded in the trainer's event stream (:mod:`contracts.events`); never
acted on inline."""

from __future__ import annotations

import redis

from backend.schemas import WebhookEvent
from contracts.events import TrainerEvent, append

#: Annotation and task ids kept in one event (the trainer needs the project and how many
#: annotations changed, kept in ``count``; it re-reads the annotations from Label Studio).
MAX_EVENT_IDS = 100

#: Actions Label Studio sends without basic auth (plain webhooks); everything else needs it.
UNAUTHENTICATED_ACTIONS = frozenset(
    {
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATIONS_DELETED",
        "TASKS_CREATED",
        "TASKS_DELETED",
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
    }
)


def record_event(connection: redis.Redis, event: WebhookEvent) -> str:
    """Append the event to the stream; return its id. At most :data:`MAX_EVENT_IDS` annotation
    and task ids are kept; ``count`` is how many annotations the event named."""
    return append(
        connection,
        TrainerEvent(
            action=event.action,
            project="" if event.project is None else str(event.project),
            annotations=tuple(event.annotation_ids[:MAX_EVENT_IDS]),
            count=event.annotation_count,
            tasks=tuple(event.task_ids[:MAX_EVENT_IDS]),
            updated_at=event.updated_at or "",
        ),
    )
