"""The Flask application: ``create_app(settings)``.

The backend never loads the model: it parses requests, enqueues jobs on Redis and answers with
their results. All errors are JSON ``{"error": code, "message": text}``; no traceback ever
reaches a client.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from backend.metrics import init_app as init_metrics
from backend.openapi import bp as openapi_bp
from backend.predict import PredictService
from backend.protocol import bp
from contracts.connections import redis_client
from contracts.errors import AssistError
from contracts.settings import Settings
from modelstore.registry import ModelRegistry

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, connection: redis.Redis | None = None) -> Flask:
    """Build the app. ``settings`` default to the environment; ``connection`` to REDIS_URL."""

    settings = settings or Settings.from_env()
    connection = connection if connection is not None else redis_client(settings.redis_url)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["sam2unet"] = {
        "settings": settings,
        "redis": connection,
        "registry": ModelRegistry(settings.model_dir, connection),
        "predict": PredictService(settings, connection),
    }
    app.register_blueprint(bp)
    app.register_blueprint(openapi_bp)
    _register_error_handlers(app)
    init_metrics(app)
    return app


def _error(status: int, code: str, message: str) -> tuple[Any, int]:
    return jsonify({"error": code, "message": message}), status


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(AssistError)
    def assist_error(e: AssistError):
        if e.status >= 500:
            log.error("%s: %s", e.code, e.message)
        else:
            log.info("%s: %s", e.code, e.message)
        resp, status = _error(e.status, e.code, e.message)
        if e.status == 401:
            resp.headers["WWW-Authenticate"] = 'Basic realm="sam2unet-assist"'
        return resp, status

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    def redis_down(e: Exception):
        log.error("Redis unavailable: %s", e)
        return _error(
            503, "redis_unavailable", "the job queue (Redis) is unavailable; try again shortly"
        )

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        code = (e.name or "error").lower().replace(" ", "_")
        return _error(e.code or 500, code, e.description or e.name)

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        log.exception("unhandled error")
        return _error(500, "internal_error", "internal error; see the backend log")
