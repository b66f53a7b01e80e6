"""The backend's OpenAPI 3 description, served at ``GET /openapi.json`` (no auth).

It documents what the endpoints accept and answer, including the error body every failure has
(``{"error": code, "message": text}``), and is what the fuzz tests generate requests from.
Request schemas describe what Label Studio sends and what the parsers in
:mod:`backend.schemas` accept; unknown fields are allowed everywhere, as Label Studio adds
fields between versions.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.0.3"
MAX_BODY_BYTES = 64 * 1024 * 1024  # the app's MAX_CONTENT_LENGTH


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_ERRORS_COMMON = {
    "400": _error("malformed request: not JSON, a missing or mistyped field"),
    "413": _error(f"request body larger than {MAX_BODY_BYTES} bytes"),
    "503": _error("the job queue (Redis) is unavailable; try again shortly"),
}
_AUTH_ERROR = {"401": _error("basic auth is configured and the credentials are missing or wrong")}
_AUTH = [{"basicAuth": []}, {}]  # basic auth only when BASIC_AUTH_USER/PASS are set

_PROJECT = {
    "description": (
        "Label Studio project: its id, the string '<id>.<created_at>' that Label Studio sends, "
        "or a project object with an 'id'"
    ),
    "nullable": True,
    "oneOf": [
        {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]*)?$"},
        {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}},
        },
    ],
}
_ID = {"type": "integer"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "machine-readable code"},
            "message": {"type": "string", "description": "reason, safe to show"},
        },
    },
    "Project": _PROJECT,
    "SetupRequest": {
        "type": "object",
        "required": ["schema"],
        "properties": {
            "schema": {
                "type": "string",
                "minLength": 1,
                "description": "the label config XML: one Image and one BrushLabels or "
                "PolygonLabels control bound to it",
            },
            "project": _ref("Project"),
            "hostname": {"type": "string", "nullable": True},
            "access_token": {"type": "string", "nullable": True},
            "extra_params": {"type": "object", "nullable": True},
        },
    },
    "SetupResponse": {
        "type": "object",
        "required": ["model_version"],
        "properties": {
            "model_version": {"type": "string"},
            "prompt_head": _ref("PromptHead"),
            "automatic_head_trained": _ref("AutomaticHeadTrained"),
        },
    },
    "PromptHead": {
        "type": "string",
        "enum": ["sam2", "crop"],
        "description": "what answers keypoint/rectangle prompts: SAM2's own prompt encoder and "
        "mask decoder ('sam2', when the base checkpoint holds them) or crop-and-segment "
        "around the U-Net ('crop')",
    },
    "AutomaticHeadTrained": {
        "type": "boolean",
        "description": "whether the U-Net decoder was ever trained; when false, /predict "
        "answers each task with no prediction (an empty list) and prompts are still served",
    },
    "Task": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "id": _ID,
            "data": {
                "type": "object",
                "description": "task data; the image URL is under the Image tag's $variable",
            },
            "project": _ref("Project"),
        },
    },
    "PredictRequest": {
        "type": "object",
        "required": ["tasks", "label_config"],
        "properties": {
            "tasks": {"type": "array", "items": _ref("Task")},
            "label_config": {"type": "string", "minLength": 1},
            "project": _ref("Project"),
            "params": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "login": {"nullable": True},
                    "password": {"nullable": True},
                    "context": {
                        "type": "object",
                        "nullable": True,
                        "description": "interactive prompts: {'result': [keypoint or "
                        "rectangle items]}",
                    },
                },
            },
        },
    },
    "Prediction": {
        "type": "object",
        "required": ["result", "score", "model_version"],
        "properties": {
            "result": {"type": "array", "items": {"type": "object"}},
            "score": {"type": "number", "nullable": True},
            "model_version": {
                "type": "string",
                "description": "the current version; '<version>/failed' for a task without "
                "a prediction (bad image, deadline); a version whose U-Net decoder was never trained "
                "answers an empty list instead of a prediction",
            },
            "error": {
                "type": "string",
                "description": "why a '<version>/failed' task has no prediction (Label Studio "
                "keeps only result, score and model_version; the reason is also logged)",
            },
        },
    },
    "PredictResponse": {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "oneOf": [
                        _ref("Prediction"),
                        {
                            "type": "array",
                            "maxItems": 0,
                            "description": "no prediction for this task: the version's "
                            "automatic head was never trained (Label Studio stores nothing, "
                            "shows no prediction tab, and asks again when the task is opened)",
                        },
                    ]
                },
                "description": "exactly one entry per task, in task order",
            }
        },
    },
    "WebhookRequest": {
        "type": "object",
        "required": ["action"],
        "properties": {
            "action": {
                "type": "string",
                "minLength": 1,
                "description": "ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED, "
                "ANNOTATIONS_DELETED and START_TRAINING are recorded; others are ignored",
            },
            "project": _ref("Project"),
            "annotation": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "id": _ID,
                    "task": {"oneOf": [_ID, {"type": "object"}]},
                    "project": _ref("Project"),
                    "updated_at": {"type": "string"},
                },
            },
            "annotations": {"type": "array", "nullable": True, "items": {"type": "object"}},
            "task": {"type": "object", "nullable": True},
            "tasks": {"type": "array", "nullable": True, "items": {"type": "object"}},
        },
    },
    "WebhookResponse": {
        "type": "object",
        "required": ["status", "action"],
        "properties": {
            "status": {"type": "string", "enum": ["recorded", "ignored"]},
            "action": {"type": "string"},
            "event": {"type": "string", "description": "the recorded event's id"},
        },
    },
    "TrainRequest": {
        "type": "object",
        "properties": {
            "project": _ref("Project"),
            "annotations": {"type": "array"},
            "label_config": {"type": "string"},
            "params": {"type": "object"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "model_class", "model_version"],
        "properties": {
            "status": {"type": "string", "enum": ["UP"]},
            "model_class": {"type": "string"},
            "model_version": {"type": "string"},
            "prompt_head": _ref("PromptHead"),
            "automatic_head_trained": _ref("AutomaticHeadTrained"),
            "queue_depth": {"type": "object", "additionalProperties": {"type": "integer"}},
            "workers": {"type": "integer"},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "scheduled_rounds": _ref("ScheduledRounds"),
            "train_agents": _ref("TrainAgents"),
            "trainer": _ref("TrainerSummary"),
        },
    },
    "TrainerSummary": {
        "type": "object",
        "description": "the trainer's state, its last round and the projects whose rounds fail",
        "properties": {
            "state": {"type": "string", "nullable": True},
            "project": {"type": "integer", "nullable": True},
            "last_round": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "status": {"type": "string", "nullable": True},
                    "reason": {"type": "string", "nullable": True},
                    "project": {"type": "integer", "nullable": True},
                    "parent": {"type": "string", "nullable": True},
                    "candidate": {"type": "string", "nullable": True},
                    "at": {"nullable": True},
                    "prompt_masks": {
                        "type": "object",
                        "nullable": True,
                        "description": "annotations holding smart keypoints/rectangles but no "
                        "mask: derived (samples trained on masks derived from them with SAM2's "
                        "head), derived_now (this round's sync), skipped (not used), enabled "
                        "(SAM2UNET_DERIVE_PROMPT_MASKS)",
                        "properties": {
                            "derived": {"type": "integer"},
                            "derived_now": {"type": "integer"},
                            "skipped": {"type": "integer"},
                            "enabled": {"type": "boolean"},
                        },
                    },
                },
            },
            "failing": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "project": {"type": "integer"},
                        "failures": {"type": "integer", "nullable": True},
                        "reason": {"type": "string", "nullable": True},
                        "since": {"type": "number", "nullable": True},
                        "next_try": {"type": "number", "nullable": True},
                    },
                },
            },
            "failing_projects": {"type": "integer"},
        },
    },
    "ScheduledRounds": {
        "type": "array",
        "description": "next round of each SAM2UNET_TRAIN_CRON entry, soonest first",
        "items": {
            "type": "object",
            "required": ["project", "cron", "next"],
            "properties": {
                "project": {"oneOf": [{"type": "integer"}, {"type": "string", "enum": ["all"]}]},
                "cron": {"type": "string"},
                "next": {"type": "string", "format": "date-time"},
            },
        },
    },
    "TrainAgents": {
        "type": "array",
        "description": "live train agents (machines that join rounds, SAM2UNET_TRAIN_NODES)",
        "items": {
            "type": "object",
            "required": ["name", "state", "devices"],
            "properties": {
                "name": {"type": "string"},
                "state": {"type": "string", "enum": ["idle", "training", "refused"]},
                "devices": {"type": "array", "items": {"type": "string"}},
                "run_id": {"type": "string"},
                "error": {"type": "string", "description": "why it refused round run_id"},
                "at": {"type": "number"},
            },
        },
    },
    "Versions": {
        "type": "object",
        "required": ["versions", "current"],
        "properties": {
            "versions": {"type": "array", "items": {"type": "string"}},
            "current": {"type": "string", "nullable": True},
            "details": {"type": "array", "items": {"type": "object"}},
            "scheduled_rounds": _ref("ScheduledRounds"),
            "train_agents": _ref("TrainAgents"),
        },
    },
    "PreannotateRequest": {
        "type": "object",
        "required": ["project"],
        "properties": {
            "project": _ref("Project"),
            "page_size": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000},
            "unlabeled_only": {"type": "boolean", "default": True},
        },
    },
    "PreannotateRun": {
        "type": "object",
        "required": ["id", "project", "status"],
        "properties": {
            "started": {"type": "boolean"},
            "id": {"type": "string"},
            "project": {"type": "integer"},
            "status": {
                "type": "string",
                "enum": ["running", "completed", "cancelled", "failed"],
            },
            "model_version": {"type": "string", "nullable": True},
            "total": {"type": "integer", "nullable": True},
            "done": {"type": "integer"},
            "failed": {"type": "integer"},
            "skipped": {"type": "integer"},
            "queued": {"type": "integer"},
            "remaining": {"type": "integer", "nullable": True},
            "rate": {"type": "number"},
            "eta_seconds": {"type": "number", "nullable": True},
            "elapsed_seconds": {"type": "number"},
            "error": {"type": "string", "nullable": True},
            "reason": {"type": "string", "nullable": True},
        },
    },
    "PreannotateRuns": {
        "type": "object",
        "required": ["runs"],
        "properties": {"runs": {"type": "array", "items": _ref("PreannotateRun")}},
    },
}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    body: str | None = None,
    auth: bool = True,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **_ERRORS_COMMON}}
    if body is not None:
        op["requestBody"] = _body(body)
    if auth:
        op["security"] = _AUTH
        op["responses"].update(_AUTH_ERROR)
    else:
        op["security"] = [{}]
    if parameters:
        op["parameters"] = parameters
    return op


_RUN_ID = [
    {
        "name": "run_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "a pre-annotation run id",
    }
]
_NOT_FOUND = {"404": _error("no such pre-annotation run")}


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3 document of the backend (a JSON-ready dict)."""
    health = _op(
        "Liveness, model version, queue depths and worker count",
        {"200": _json(_ref("Health"), "the backend is up (warnings name what is missing)")},
        auth=False,
    )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "sam2unet-assist backend",
            "version": "1",
            "description": (
                "Label Studio ML backend protocol (health, setup, predict, webhook, versions) "
                "plus project-wide pre-annotation runs. Every error answers "
                '{"error": code, "message": text}.'
            ),
        },
        "paths": {
            "/": {"get": {**health, "operationId": "root"}},
            "/health": {"get": {**health, "operationId": "health"}},
            "/setup": {
                "post": _op(
                    "Validate the label config and return the current model version",
                    {"200": _json(_ref("SetupResponse"), "the current model version")},
                    body="SetupRequest",
                )
            },
            "/predict": {
                "post": _op(
                    "Predict every task (waits for the workers up to the deadline)",
                    {"200": _json(_ref("PredictResponse"), "one prediction per task")},
                    body="PredictRequest",
                )
            },
            "/webhook": {
                "post": _op(
                    "Record a Label Studio webhook event for the trainer",
                    {"200": _json(_ref("WebhookResponse"), "recorded or ignored")},
                    body="WebhookRequest",
                )
                | {
                    "description": "Annotation and task events need no auth; START_TRAINING "
                    "and unknown actions need basic auth when it is configured. With "
                    "SAM2UNET_WEBHOOK_SECRET set, every call needs the header "
                    "X-Sam2unet-Webhook-Secret (or Authorization: Bearer <secret>, or basic "
                    "auth). Bodies over SAM2UNET_WEBHOOK_MAX_BYTES (1 MiB) get 413."
                }
            },
            "/train": {
                "post": _op(
                    "Start training (older Label Studio versions): same as START_TRAINING",
                    {"200": _json(_ref("WebhookResponse"), "recorded")},
                    body="TrainRequest",
                )
            },
            "/versions": {
                "get": _op(
                    "Model versions with metrics; the current one",
                    {"200": _json(_ref("Versions"), "all versions")},
                )
            },
            "/preannotate": {
                "post": _op(
                    "Start pre-annotating a whole project (or return its run in progress)",
                    {
                        "200": _json(_ref("PreannotateRun"), "a run was already in progress"),
                        "202": _json(_ref("PreannotateRun"), "a run was started"),
                    },
                    body="PreannotateRequest",
                ),
                "get": _op(
                    "Recent pre-annotation runs",
                    {"200": _json(_ref("PreannotateRuns"), "runs, newest first")},
                ),
            },
            "/preannotate/{run_id}": {
                "get": _op(
                    "Progress of a pre-annotation run",
                    {"200": _json(_ref("PreannotateRun"), "the run"), **_NOT_FOUND},
                    parameters=_RUN_ID,
                )
            },
            "/preannotate/{run_id}/cancel": {
                "post": _op(
                    "Cancel a pre-annotation run",
                    {"200": _json(_ref("PreannotateRun"), "the run"), **_NOT_FOUND},
                    parameters=_RUN_ID,
                )
            },
            "/metrics": {
                "get": _op(
                    "Prometheus metrics: requests, queues, workers, jobs, model, trainer",
                    {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                )
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [{}],
                    "responses": {"200": {"description": "the OpenAPI document"}},
                }
            },
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"basicAuth": {"type": "http", "scheme": "basic"}},
        },
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_spec())
