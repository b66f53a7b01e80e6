"""Request bodies of the Label Studio ML backend protocol, parsed into typed objects at the
boundary. Anything malformed is a :class:`BadRequest` with a reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contracts.errors import BadRequest


def _obj(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"{what}: the body must be a JSON object")
    return body


def _list(body: dict[str, Any], key: str, what: str) -> list[Any]:
    """``body[key]`` as a list: [] when absent or null, BadRequest when not a list."""
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{what}: {key!r} must be a list")
    return value


_MAX_ID = 2**63  # ids are 64-bit integers in Label Studio's database


def _id(value: Any) -> int | None:
    """``value`` if it is a Label Studio id (an int, not a bool, in range), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_ID:
        return value
    return None


def parse_project_id(value: Any) -> int | None:
    """Label Studio sends ``project`` as ``"<id>.<created_at>"`` (a string), sometimes an int
    or a full project object (webhooks)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest("project must be an id")
    if isinstance(value, int):
        if not 0 <= value < _MAX_ID:
            raise BadRequest(f"project id {value} is out of range")
        return value
    if isinstance(value, dict):
        return parse_project_id(value.get("id"))
    if isinstance(value, str):
        head = value.split(".", 1)[0]
        if head.isascii() and head.isdigit():  # "²".isdigit() is True, int("²") fails
            return parse_project_id(int(head))
    raise BadRequest(f"cannot read a project id from {str(value)[:40]!r}")


@dataclass(frozen=True)
class SetupRequest:
    schema: str
    project: int | None
    hostname: str | None
    extra_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: Any) -> SetupRequest:
        b = _obj(body, "/setup")
        schema = b.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise BadRequest("/setup: 'schema' (the label config XML) is required")
        hostname = b.get("hostname")
        if hostname is not None and not isinstance(hostname, str):
            raise BadRequest("/setup: 'hostname' must be a string")
        extra = b.get("extra_params") or {}
        if not isinstance(extra, dict):
            extra = {}
        return cls(schema, parse_project_id(b.get("project")), hostname or None, extra)


@dataclass(frozen=True)
class PredictRequest:
    tasks: list[dict[str, Any]]
    label_config: str
    project: int | None
    context: dict[str, Any] | None
    params: dict[str, Any]

    @classmethod
    def parse(cls, body: Any) -> PredictRequest:
        b = _obj(body, "/predict")
        tasks = b.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequest("/predict: 'tasks' must be a list")
        for i, t in enumerate(tasks):
            if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
                raise BadRequest(f"/predict: task {i} must be an object with a 'data' object")
        label_config = b.get("label_config")
        if not isinstance(label_config, str) or not label_config.strip():
            raise BadRequest("/predict: 'label_config' is required")
        params = b.get("params") or {}
        if not isinstance(params, dict):
            raise BadRequest("/predict: 'params' must be an object")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise BadRequest("/predict: 'params.context' must be an object")
        project = parse_project_id(b.get("project"))
        if project is None and tasks:
            project = parse_project_id(tasks[0].get("project"))
        return cls(tasks, label_config, project, context or None, params)


@dataclass(frozen=True)
class WebhookEvent:
    """The part of a webhook that matters: which action, which project, which annotation and
    task ids. Labels themselves are never taken from a webhook: the trainer re-reads them from
    Label Studio's API. ``annotation_count``: how many annotations the webhook named (the ids
    kept in the event stream are capped, :data:`backend.events.MAX_EVENT_IDS`)."""

    action: str
    project: int | None
    annotation_ids: tuple[int, ...] = ()
    task_ids: tuple[int, ...] = ()
    updated_at: str | None = None
    annotation_count: int = 0

    @classmethod
    def parse(cls, body: Any) -> WebhookEvent:
        b = _obj(body, "/webhook")
        action = b.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("/webhook: 'action' is required")
        project = parse_project_id(b.get("project"))
        ann_ids: list[int] = []
        task_ids: list[int] = []
        updated_at = None
        ann = b.get("annotation")
        if isinstance(ann, dict):
            if _id(ann.get("id")) is not None:
                ann_ids.append(ann["id"])
            task = ann.get("task")
            if _id(task) is not None:
                task_ids.append(task)
            elif isinstance(task, dict) and _id(task.get("id")) is not None:
                task_ids.append(task["id"])
            if isinstance(ann.get("updated_at"), str):
                updated_at = ann["updated_at"]
            if project is None:
                project = parse_project_id(ann.get("project"))
        for a in _list(b, "annotations", "/webhook"):
            if isinstance(a, dict) and _id(a.get("id")) is not None:
                ann_ids.append(a["id"])
        task = b.get("task")
        if (
            isinstance(task, dict)
            and _id(task.get("id")) is not None
            and task["id"] not in task_ids
        ):
            task_ids.append(task["id"])
        for t in _list(b, "tasks", "/webhook"):
            if isinstance(t, dict) and _id(t.get("id")) is not None:
                task_ids.append(t["id"])
        return cls(
            action[:100],
            project,
            tuple(ann_ids),
            tuple(task_ids),
            updated_at[:64] if updated_at else None,
            len(ann_ids),
        )
