"""Webhook events, recorded in a Redis stream for the trainer (never acted on inline)."""

from __future__ import annotations

import json
import time

import redis

from backend.schemas import WebhookEvent

EVENTS_STREAM = "sam2unet:events"
EVENTS_MAXLEN = 100_000
#: Annotation and task ids kept in one event (the trainer needs the project and how many
#: annotations changed, kept in ``count``; it re-reads the annotations from Label Studio).
MAX_EVENT_IDS = 100

#: Actions the trainer acts on; others are acknowledged and ignored.
TRAINER_ACTIONS = frozenset(
    {
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATIONS_DELETED",
        "START_TRAINING",
    }
)
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
    fields = {
        "action": event.action,
        "project": "" if event.project is None else str(event.project),
        "annotations": json.dumps(list(event.annotation_ids[:MAX_EVENT_IDS])),
        "count": str(event.annotation_count),
        "tasks": json.dumps(list(event.task_ids[:MAX_EVENT_IDS])),
        "updated_at": event.updated_at or "",
        "received_at": f"{time.time():.3f}",
    }
    event_id = connection.xadd(EVENTS_STREAM, fields, maxlen=EVENTS_MAXLEN, approximate=True)
    return event_id.decode() if isinstance(event_id, bytes) else str(event_id)
