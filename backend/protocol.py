"""The Label Studio ML backend protocol (v2): /health, /setup, /predict, /webhook, /versions."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis
from flask import Blueprint, current_app, jsonify, request
from rq import Queue
from werkzeug.exceptions import RequestEntityTooLarge

from backend.auth import (
    WEBHOOK_SECRET_HEADER,
    basic_auth_given,
    check_basic_auth,
    webhook_secret_given,
)
from backend.events import UNAUTHENTICATED_ACTIONS, record_event
from backend.predict import answer
from backend.schemas import PredictRequest, SetupRequest, WebhookEvent, parse_project_id
from contracts import preannotate as runs
from contracts.agents import train_agents
from contracts.errors import BadRequest, NotFound, Unauthorized
from contracts.events import TRAINER_ACTIONS
from contracts.jobs import QUEUES
from contracts.metrics import record_answer
from contracts.routing import worker_count
from contracts.schedule import scheduled_rounds
from contracts.trainer_state import trainer_summary
from labelstudio.labelconfig import parse_label_config
from modelstore.bootstrap import UNTRAINED_SOURCE
from modelstore.version_heads import decoder_trained, heads_json, untrained_warning
from modelstore.versions import versions_json
from sam2unet.acquisition import STRATEGIES

log = logging.getLogger(__name__)

bp = Blueprint("protocol", __name__)

MODEL_CLASS = "SAM2UNet"
NO_VERSION = "none"


def _ext() -> dict[str, Any]:
    return current_app.extensions["sam2unet"]


def _json_body() -> Any:
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("the request body must be JSON")
    return body


def _require_auth() -> None:
    s = _ext()["settings"]
    if s.basic_auth_enabled:
        check_basic_auth(request.headers.get("Authorization"), s.basic_auth_user, s.basic_auth_pass)


HEALTH_WARNINGS_KEY = "sam2unet:backend:health-warnings"
_local_warnings: list[str] = []  # when Redis cannot be reached
_local_lock = threading.Lock()


def log_health_changes(conn: redis.Redis, warnings: list[str]) -> None:
    """Log each /health warning when it appears (WARNING) and when it goes (INFO), not on every
    poll. The last poll's warnings are swapped atomically in Redis (``GETSET``), so that of
    many threads, processes or backend replicas polled at once exactly one logs a change."""
    state = json.dumps(sorted(set(warnings)))
    try:
        before = conn.getset(HEALTH_WARNINGS_KEY, state)
    except redis.exceptions.RedisError:
        with _local_lock:
            before = json.dumps(_local_warnings)
            _local_warnings[:] = sorted(set(warnings))
    try:
        previous = set(json.loads(before)) if before else set()
    except (TypeError, ValueError):
        previous = set()
    for w in warnings:
        if w not in previous:
            log.warning("health: %s", w)
    for w in sorted(previous - set(warnings)):
        log.info("health: no longer: %s", w)


@bp.get("/")
@bp.get("/health")
def health():
    """Liveness for Label Studio (any 2xx JSON means connected) and for operators."""

    ext = _ext()
    conn = ext["redis"]
    registry = ext["registry"]
    version = registry.current()
    warnings = []
    info = None
    if version is None:
        warnings.append("no model version yet: start a worker (`sam2unet-assist worker`)")
    else:
        try:
            info = registry.get(version)
        except NotFound:
            warnings.append(f"current version {version} is missing from MODEL_DIR")
    if info is not None and info.source == UNTRAINED_SOURCE:
        warnings.append(
            "predictions come from an UNTRAINED encoder: no SAM2 checkpoint was found; "
            "run `sam2unet-assist download`"
        )
    if info is not None and not decoder_trained(info):
        warnings.append(untrained_warning(info))
    depth = {q: Queue(q, connection=conn).count for q in QUEUES}
    workers = worker_count(conn)
    if workers == 0:
        warnings.append("no worker is running: predictions will wait until one starts")
    body = {
        "status": "UP",
        "model_class": MODEL_CLASS,
        "model_version": version or NO_VERSION,
        **(heads_json(info, registry) if info is not None else {}),
        "queue_depth": depth,
        "workers": workers,
        "warnings": warnings,
        "scheduled_rounds": scheduled_rounds(conn),
        "train_agents": train_agents(conn),
        "trainer": trainer_summary(conn),
    }
    log_health_changes(conn, warnings)
    return jsonify(body)


@bp.post("/setup")
def setup():
    """Cheap by design: validates the label config and returns the current model version.

    Label Studio reads ``model_version`` only (other keys are ignored); ``prompt_head`` and
    ``automatic_head_trained`` tell an operator which head answers prompts and whether
    automatic predictions are made (see :mod:`modelstore.version_heads`)."""
    _require_auth()
    req = SetupRequest.parse(_json_body())
    target = parse_label_config(req.schema)
    _ext()["predict"].remember_hostname(req.project, req.hostname)
    log.debug("setup for project %s: %s %s", req.project, target.kind, target.from_name)
    registry = _ext()["registry"]
    version = registry.current()
    body: dict[str, Any] = {"model_version": version or NO_VERSION}
    if version is not None:
        try:
            body.update(heads_json(registry.get(version), registry))
        except NotFound:
            log.warning("setup: current version %s is missing from MODEL_DIR", version)
    return jsonify(body)


@bp.post("/predict")
def predict():
    _require_auth()
    req = PredictRequest.parse(_json_body())
    target = parse_label_config(req.label_config)
    service = _ext()["predict"]
    version, ls_base = service.version_and_host(_ext()["registry"], req.project)
    version = version or NO_VERSION
    outcome = service.predict(req, target, version, ls_base)
    record_answer(_ext()["redis"], outcome.results)
    failed = sum(1 for r in outcome.results if r.error)
    log.info(
        "predict %s: project %s, %d task(s), %d failed, %d late, %.2fs",
        outcome.request_id,
        req.project,
        len(req.tasks),
        failed,
        outcome.late_tasks,
        outcome.elapsed,
    )
    for r in outcome.results:
        if r.error:
            log.info("predict %s: task %s: %s", outcome.request_id, r.task_id, r.error)
    response = jsonify(answer(outcome.results, version))
    response.headers["X-Request-ID"] = outcome.request_id
    return response


def _guard_webhook(route: str) -> Any:
    """Authenticate a webhook and read its body, bounded by ``SAM2UNET_WEBHOOK_MAX_BYTES``.

    With ``SAM2UNET_WEBHOOK_SECRET`` set, every call needs the secret (header
    ``X-Sam2unet-Webhook-Secret`` or ``Authorization: Bearer``) or, when basic auth is on, the
    backend's basic auth (Label Studio's "Start Training" call carries that and no custom
    header). The body is not read before that."""
    s = _ext()["settings"]
    if s.webhook_secret:
        header = request.headers.get("Authorization")
        if not (
            webhook_secret_given(request.headers, s.webhook_secret)
            or (
                s.basic_auth_enabled
                and basic_auth_given(header, s.basic_auth_user, s.basic_auth_pass)
            )
        ):
            given = "a wrong secret" if _carries_credentials() else "no secret"
            log.warning(
                "webhook refused: %s %s with %s (from %s, %s)",
                request.method,
                route,
                given,
                request.remote_addr,
                request.user_agent.string[:80] or "no user agent",
            )
            also = " or the backend's basic auth" if s.basic_auth_enabled else ""
            raise Unauthorized(
                f"{route} needs the webhook secret in the {WEBHOOK_SECRET_HEADER} header "
                f"(or Authorization: Bearer <secret>){also}"
            )
    limit = s.webhook_max_bytes
    # a body sent without Content-Length (chunked) is read up to one byte past the limit
    request.max_content_length = limit + 1
    length = request.content_length
    try:
        if (length is not None and length > limit) or len(request.get_data()) > limit:
            raise RequestEntityTooLarge()
        return _json_body()
    except RequestEntityTooLarge:
        size = f"{length} bytes" if length is not None else "more than that"
        log.warning("%s refused: webhook body of %s over the limit of %d", route, size, limit)
        raise RequestEntityTooLarge(
            f"the {route} body is {size}; the limit is {limit} bytes (SAM2UNET_WEBHOOK_MAX_BYTES)"
        ) from None


def _carries_credentials() -> bool:
    return bool(request.headers.get(WEBHOOK_SECRET_HEADER) or request.headers.get("Authorization"))


@bp.post("/webhook")
def webhook():
    """Record the event for the trainer and acknowledge at once (Label Studio waits 1 s)."""
    event = WebhookEvent.parse(_guard_webhook("/webhook"))
    if event.action not in UNAUTHENTICATED_ACTIONS and not _ext()["settings"].webhook_secret:
        _require_auth()
    if event.action not in TRAINER_ACTIONS:
        log.info("webhook %r ignored", event.action[:40])
        return jsonify({"status": "ignored", "action": event.action})
    event_id = record_event(_ext()["redis"], event)
    log.info(
        "webhook %s project %s, %d annotation(s), recorded as %s",
        event.action,
        event.project,
        event.annotation_count,
        event_id,
    )
    return jsonify({"status": "recorded", "action": event.action, "event": event_id})


@bp.post("/train")
def train():
    """Older Label Studio versions send POST /train for "Start Training": same as the webhook."""
    if not _ext()["settings"].webhook_secret:
        _require_auth()
    body = _guard_webhook("/train")
    if not isinstance(body, dict):
        raise BadRequest("/train: the body must be a JSON object")
    event = WebhookEvent.parse({"action": "START_TRAINING", "project": body.get("project")})
    event_id = record_event(_ext()["redis"], event)
    return jsonify({"status": "recorded", "action": event.action, "event": event_id})


@bp.get("/versions")
def versions():
    """Label Studio reads ``versions``; ``details`` has each version's metrics, base
    checkpoint, training data size and correction rate."""

    _require_auth()
    ext = _ext()
    details = versions_json(ext["registry"], ext["settings"])
    return jsonify(
        {
            "versions": [d["version"] for d in details],
            "current": ext["registry"].current(),
            "details": details,
            "scheduled_rounds": scheduled_rounds(ext["redis"]),
            "train_agents": train_agents(ext["redis"]),
            "trainer": trainer_summary(ext["redis"]),
        }
    )


@bp.post("/preannotate")
def preannotate_start():
    """Start pre-annotating a whole project (``{"project": ID}``); answers the run's status."""

    _require_auth()
    body = _json_body()
    if not isinstance(body, dict):
        raise BadRequest("/preannotate: the body must be a JSON object")
    project = parse_project_id(body.get("project"))
    if project is None:
        raise BadRequest("/preannotate: 'project' (a Label Studio project id) is required")
    page_size = body.get("page_size", 1000)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 1000:
        raise BadRequest("/preannotate: 'page_size' must be an integer in 1..1000")
    unlabeled_only = body.get("unlabeled_only", True)
    if not isinstance(unlabeled_only, bool):
        raise BadRequest("/preannotate: 'unlabeled_only' must be true or false")
    acquisition = body.get("acquisition")
    if acquisition is not None and acquisition not in STRATEGIES:
        raise BadRequest(f"/preannotate: 'acquisition' must be one of {list(STRATEGIES)}")
    conn = _ext()["redis"]
    run_id, started = runs.start_run(
        conn, project, page_size=page_size, unlabeled_only=unlabeled_only, acquisition=acquisition
    )
    return jsonify({"started": started, **runs.status(conn, run_id)}), 202 if started else 200


@bp.get("/preannotate")
def preannotate_list():

    _require_auth()
    return jsonify({"runs": runs.list_runs(_ext()["redis"])})


@bp.get("/preannotate/<run_id>")
def preannotate_status(run_id: str):

    _require_auth()
    return jsonify(runs.status(_ext()["redis"], run_id))


@bp.post("/preannotate/<run_id>/cancel")
def preannotate_cancel(run_id: str):

    _require_auth()
    return jsonify(runs.cancel(_ext()["redis"], run_id))
