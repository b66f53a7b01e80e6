"""HTTP basic auth for the protocol endpoints (``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``)."""

from __future__ import annotations

import base64
import hmac

from contracts.errors import Unauthorized


def check_basic_auth(header: str | None, user: str, password: str) -> None:
    """Raise :class:`Unauthorized` unless ``header`` carries exactly these credentials.

    Both parts are compared in constant time, and both comparisons always run.
    """
    given_user, given_pass = "", ""
    if header and header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            given_user, _, given_pass = decoded.partition(":")
        except (ValueError, UnicodeDecodeError):
            given_user, given_pass = "", ""
    ok_user = hmac.compare_digest(given_user.encode(), user.encode())
    ok_pass = hmac.compare_digest(given_pass.encode(), password.encode())
    if not (ok_user and ok_pass):
        raise Unauthorized("valid basic auth credentials are required")
