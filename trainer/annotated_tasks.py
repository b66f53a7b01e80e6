"""Reading a project's annotated tasks from Label Studio: in pages by task id (a task added or
deleted meanwhile shifts no other out of a page), with the latest submitted annotation of each."""

from __future__ import annotations

import datetime as dt
from typing import Any


def latest_submitted(annotations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The task's most recently updated annotation that was not cancelled (skipped)."""
    kept = [a for a in annotations or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (str(a.get("updated_at") or ""), int(a.get("id") or 0)))


def annotated_query(after: int, since: str | None = None) -> dict[str, Any]:
    """The data manager query of annotated tasks after task id ``after`` (updated after
    ``since``), in order of id."""
    items = [
        {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after},
        {
            "filter": "filter:tasks:total_annotations",
            "operator": "greater",
            "type": "Number",
            "value": 0,
        },
    ]
    if since is not None:
        items.append(
            {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
             "value": since}
        )  # fmt: skip
    return {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}


def read_by_id(
    client: Any, project: int, since: str | None, page_size: int, **kw: Any
) -> list[dict[str, Any]]:
    """The project's annotated tasks (updated after ``since``), read in pages by task id."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        tasks, _ = client.task_page(
            project, 1, page_size, query=annotated_query(after, since), **kw
        )
        out += tasks
        ids = [t["id"] for t in tasks if isinstance(t.get("id"), int)]
        if len(tasks) < page_size or not ids:
            return out
        after = max(ids)


def parse_time(value: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo is not None else None


def iso_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
