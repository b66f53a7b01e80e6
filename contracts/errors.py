"""Errors shared by the services, each mapped to an HTTP status.

Every error carries a ``message`` that is safe to show to a client: it never contains a token,
a password or a traceback. ``status`` is the HTTP status a service answers with and ``code`` a
short machine-readable name for the kind of failure.
"""

from __future__ import annotations

from typing import Any


class AssistError(Exception):
    """Base class of the project's errors.

    Args:
        message: human-readable reason, safe to show to a client; defaults to the class's
            ``default_message``.
    """

    status: int = 500
    code: str = "internal_error"
    default_message: str = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body a service answers with: ``{"error": code, "message": message}``."""
        return {"error": self.code, "message": self.message}


class BadRequest(AssistError):
    """The request is malformed or asks for something impossible."""

    status = 400
    code = "bad_request"
    default_message = "bad request"


class LabelConfigError(BadRequest):
    """The Label Studio label config cannot be used (not XML, no Image, no segmentation control)."""

    code = "invalid_label_config"
    default_message = "unusable label config"


class AnnotationFormatError(BadRequest):
    """A Label Studio result item is malformed (missing fields, bad RLE, inconsistent sizes)."""

    code = "invalid_annotation"
    default_message = "malformed annotation result"


class Unauthorized(AssistError):
    """Missing or wrong credentials."""

    status = 401
    code = "unauthorized"
    default_message = "unauthorized"


class NotFound(AssistError):
    """The requested resource does not exist."""

    status = 404
    code = "not_found"
    default_message = "not found"


class ImageFetchError(AssistError):
    """A task's image could not be used: unreachable, refused, too large or undecodable.

    A per-task error: the other tasks of a request are still served.
    """

    status = 422
    code = "image_fetch_failed"
    default_message = "the task image could not be fetched or decoded"


class LabelStudioError(AssistError):
    """A call to the Label Studio API failed."""

    status = 502
    code = "label_studio_error"
    default_message = "the Label Studio API call failed"


class ServiceUnavailable(AssistError):
    """A dependency (queue, workers, model) is not available right now."""

    status = 503
    code = "service_unavailable"
    default_message = "service unavailable"


class DeadlineExceeded(AssistError):
    """The work did not finish before its deadline."""

    status = 504
    code = "deadline_exceeded"
    default_message = "deadline exceeded"
