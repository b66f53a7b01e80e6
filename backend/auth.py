"""HTTP basic auth for the protocol endpoints (``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``) and the
webhooks' shared secret (``SAM2UNET_WEBHOOK_SECRET``)."""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping

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


#: The header a Label Studio webhook carries the shared secret in (``SAM2UNET_WEBHOOK_SECRET``);
#: ``Authorization: Bearer <secret>`` is accepted as well.
WEBHOOK_SECRET_HEADER = "X-Sam2unet-Webhook-Secret"


def _same(given: str | None, expected: str) -> bool:
    return hmac.compare_digest((given or "").encode("utf-8", "replace"), expected.encode())


def webhook_secret_given(headers: Mapping[str, str], secret: str) -> bool:
    """Whether ``headers`` carry ``secret`` in :data:`WEBHOOK_SECRET_HEADER` or as a bearer
    token; compared in constant time, both comparisons always run."""
    auth = headers.get("Authorization") or ""
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    in_header = _same(headers.get(WEBHOOK_SECRET_HEADER), secret)
    as_bearer = _same(bearer, secret)
    return in_header or as_bearer


def basic_auth_given(header: str | None, user: str, password: str) -> bool:
    """:func:`check_basic_auth` as a bool."""
    try:
        check_basic_auth(header, user, password)
    except Unauthorized:
        return False
    return True
