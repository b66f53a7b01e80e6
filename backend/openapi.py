"""The backend's OpenAPI 3 description, served at ``GET /openapi.json`` (no auth).

It documents what the endpoints accept and answer, including the error body every failure has
(``{"error": code, "message": text}``), and is what the fuzz tests generate requests from.
The schemas of the bodies are in :mod:`backend.openapi_schemas`.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from backend.openapi_schemas import SCHEMAS, ref

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.0.3"
MAX_BODY_BYTES = 64 * 1024 * 1024  # the app's MAX_CONTENT_LENGTH


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(ref("Error"), description)


_ERRORS_COMMON = {
    "400": _error("malformed request: not JSON, a missing or mistyped field"),
    "413": _error(f"request body larger than {MAX_BODY_BYTES} bytes"),
    "503": _error("the job queue (Redis) is unavailable; try again shortly"),
}
_AUTH_ERROR = {"401": _error("basic auth is configured and the credentials are missing or wrong")}
_AUTH = [{"basicAuth": []}, {}]  # basic auth only when BASIC_AUTH_USER/PASS are set


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": ref(name)}}}


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
        "paths": _protocol_paths() | _run_and_operation_paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"basicAuth": {"type": "http", "scheme": "basic"}},
        },
    }


def _protocol_paths() -> dict[str, Any]:
    """Label Studio's ML backend protocol: health, setup, predict, webhook, train, versions."""
    health = _op(
        "Liveness, model version, queue depths and worker count",
        {"200": _json(ref("Health"), "the backend is up (warnings name what is missing)")},
        auth=False,
    )
    return {
        "/": {"get": {**health, "operationId": "root"}},
        "/health": {"get": {**health, "operationId": "health"}},
        "/setup": {
            "post": _op(
                "Validate the label config and return the current model version",
                {"200": _json(ref("SetupResponse"), "the current model version")},
                body="SetupRequest",
            )
        },
        "/predict": {
            "post": _op(
                "Predict every task (waits for the workers up to the deadline)",
                {"200": _json(ref("PredictResponse"), "one prediction per task")},
                body="PredictRequest",
            )
        },
        "/webhook": {
            "post": _op(
                "Record a Label Studio webhook event for the trainer",
                {"200": _json(ref("WebhookResponse"), "recorded or ignored")},
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
                {"200": _json(ref("WebhookResponse"), "recorded")},
                body="TrainRequest",
            )
        },
        "/versions": {
            "get": _op(
                "Model versions with metrics; the current one",
                {"200": _json(ref("Versions"), "all versions")},
            )
        },
    }


def _run_and_operation_paths() -> dict[str, Any]:
    """Project-wide pre-annotation runs, metrics and this document."""
    return {
        "/preannotate": {
            "post": _op(
                "Start pre-annotating a whole project (or return its run in progress)",
                {
                    "200": _json(ref("PreannotateRun"), "a run was already in progress"),
                    "202": _json(ref("PreannotateRun"), "a run was started"),
                },
                body="PreannotateRequest",
            ),
            "get": _op(
                "Recent pre-annotation runs",
                {"200": _json(ref("PreannotateRuns"), "runs, newest first")},
            ),
        },
        "/preannotate/{run_id}": {
            "get": _op(
                "Progress of a pre-annotation run",
                {"200": _json(ref("PreannotateRun"), "the run"), **_NOT_FOUND},
                parameters=_RUN_ID,
            )
        },
        "/preannotate/{run_id}/cancel": {
            "post": _op(
                "Cancel a pre-annotation run",
                {"200": _json(ref("PreannotateRun"), "the run"), **_NOT_FOUND},
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
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_spec())
