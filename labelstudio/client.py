"""Label Studio REST API client with either kind of API key.

A key is either a legacy token, sent as ``Authorization: Token <key>`` (Label Studio 1.23
organizations have these off by default), or a personal access token (PAT): a JWT refresh token
that Label Studio does not accept directly. A PAT is exchanged at ``POST /api/token/refresh/`` for
an access token valid five minutes, sent as ``Authorization: Bearer <access>``; the client
refreshes it shortly before it expires and once more when Label Studio answers 401.

The key is sent only to the Label Studio origin (scheme, host and port of ``url``), never to
another host, and never appears in errors or logs. One URL parser decides where a request goes:
:func:`labelstudio.urls.origin` reads a URL the way the HTTP library will connect and refuses
every URL whose destination is ambiguous. The key is attached to the prepared request
itself, right before it is sent, only when that request's URL has exactly the Label Studio origin;
every redirect hop is decided again the same way.

Label Studio may be served under a path prefix (``LABEL_STUDIO_URL=http://host:8080/ls``):
relative URLs (``/data/upload/...``) are resolved under that prefix.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import http.cookiejar
import json
import logging
import threading
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from contracts.errors import LabelStudioError
from labelstudio.predictions_api import PredictionCalls
from labelstudio.tasks_api import TaskCalls
from labelstudio.urls import UnsafeURL, origin, redact_url

logger = logging.getLogger(__name__)

# Refresh the access token this many seconds before its ``exp``.
REFRESH_MARGIN = 30.0
# Lifetime assumed for an access token whose ``exp`` cannot be read.
DEFAULT_ACCESS_LIFETIME = 240.0
MAX_REDIRECTS = 5


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, decoded **without** verifying its signature; None if ``token`` is
    not shaped like a JWT (three base64url segments with a JSON object in the middle)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioClient(TaskCalls, PredictionCalls):
    """A Label Studio API client.

    Args:
        url: Label Studio's base URL, e.g. ``http://labelstudio:8080``.
        api_key: a legacy token or a personal access token (detected by shape).
        timeout: seconds for connect and for each read of an API call.
        session: a ``requests.Session`` to use (default: a new one).
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        url = (url or "").strip().rstrip("/")
        try:
            scheme, host, port = origin(url)
            parts = urlsplit(url)
        except UnsafeURL as e:
            raise ValueError(
                f"Label Studio URL must be http(s)://host[:port][/path], got {url!r}: {e}"
            ) from e
        if parts.query or parts.fragment:
            raise ValueError(f"Label Studio URL must not have a query or fragment, got {url!r}")
        if not api_key or not api_key.strip():
            raise ValueError("a Label Studio API key is required")
        self.url = url
        self.host = host
        # the path Label Studio is served under ("" at the root, else e.g. "/ls")
        self.base_path = parts.path.rstrip("/")
        self._root = f"{parts.scheme}://{parts.netloc}"
        self.timeout = timeout
        self.session = session or requests.Session()
        # no cookies kept: Label Studio's session cookie (cookies ignore ports) would go to any
        # other service on the same host name that this session reaches
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._origin = (scheme, host, port)
        self._key = api_key.strip()
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_exp = 0.0
        self.refreshes = 0  # number of access tokens obtained
        claims = jwt_claims(self._key)
        if claims is None:
            self.auth_kind = "legacy"
        elif claims.get("token_type") == "refresh":
            self.auth_kind = "pat"
            exp = claims.get("exp")
            if isinstance(exp, (int, float)) and exp < time.time():
                raise ValueError("the Label Studio personal access token has expired")
        else:
            raise ValueError(
                f"the Label Studio API key is a JWT of type {claims.get('token_type')!r}; "
                "use a personal access token (refresh token) or a legacy token"
            )

    def __repr__(self) -> str:
        return f"LabelStudioClient({self.url!r}, auth={self.auth_kind})"

    # --- authentication --------------------------------------------------------------------
    def _refresh_locked(self) -> None:
        try:
            r = self.session.post(
                self.url + "/api/token/refresh/",
                json={"refresh": self._key},
                timeout=self.timeout,
                allow_redirects=False,  # the token is in the body: it goes nowhere else
            )
        except requests.RequestException as e:
            raise LabelStudioError(f"Label Studio unreachable at {self.url}") from e
        if r.is_redirect:
            raise LabelStudioError(
                f"token refresh was redirected (HTTP {r.status_code}): check LABEL_STUDIO_URL "
                "(scheme, host, port and path exactly as Label Studio is served)"
            )
        if r.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio refused the personal access token (HTTP {r.status_code}): "
                "it is invalid, revoked or expired, or personal tokens are disabled"
            )
        if r.status_code != 200:
            raise LabelStudioError(f"token refresh failed: HTTP {r.status_code}")
        try:
            access = r.json()["access"]
        except (ValueError, KeyError, TypeError) as e:
            raise LabelStudioError("token refresh answered without an access token") from e
        exp = (jwt_claims(access) or {}).get("exp")
        now = time.time()
        self._access = access
        lifetime = float(exp) - now if isinstance(exp, (int, float)) else DEFAULT_ACCESS_LIFETIME
        self._access_exp = now + lifetime
        self.refreshes += 1
        logger.debug("Label Studio access token refreshed, valid %.0f s", self._access_exp - now)

    def auth_header(self) -> dict[str, str]:
        """The ``Authorization`` header for Label Studio, refreshing the access token if due."""
        if self.auth_kind == "legacy":
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            if self._access is None or time.time() >= self._access_exp - REFRESH_MARGIN:
                self._refresh_locked()
            return {"Authorization": f"Bearer {self._access}"}

    def handle_unauthorized(self, sent: dict[str, str]) -> bool:
        """Called after Label Studio answered 401 to a request that carried the headers
        ``sent``: forgets that access token so that the next ``auth_header()`` refreshes it.
        True if a retry with a fresh token may succeed (personal access tokens only)."""
        if self.auth_kind != "pat":
            return False
        with self._lock:
            if sent.get("Authorization") == f"Bearer {self._access}":
                self._access = None
        return True

    def is_label_studio_url(self, url: str) -> bool:
        """Whether ``url`` points at this Label Studio: the same scheme, host and port as
        :func:`~labelstudio.urls.origin` reads them (False for any URL it refuses)."""
        try:
            return origin(url) == self._origin
        except UnsafeURL:
            return False

    def auth_headers_for(self, url: str) -> dict[str, str]:
        """Auth headers for ``url``: Label Studio's own when ``url`` is on the Label Studio
        origin, none for any other host or an ambiguous URL."""
        return self.auth_header() if self.is_label_studio_url(url) else {}

    def authorize(self, prepared: requests.PreparedRequest) -> bool:
        """Set the ``Authorization`` header of a request about to be sent: Label Studio's key
        when the prepared URL, the one that is sent, has exactly the Label Studio origin, no
        ``Authorization`` at all otherwise. True if the key was attached."""
        prepared.headers.pop("Authorization", None)
        if not self.is_label_studio_url(prepared.url or ""):
            return False
        prepared.headers.update(self.auth_header())
        return True

    def absolute_url(self, path_or_url: str) -> str:
        """``/data/upload/...`` or ``/data/local-files/?d=...`` prefixed with the base URL (its
        path prefix included, unless the path already starts with it); other strings, absolute
        URLs included, are returned unchanged."""
        if path_or_url.startswith("/") and not path_or_url.startswith(("//", "/\\")):
            prefix = self.base_path
            if prefix and (path_or_url == prefix or path_or_url.startswith(prefix + "/")):
                return self._root + path_or_url
            return self.url + path_or_url
        return path_or_url

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        stream: bool = False,
        timeout: float | tuple[float, float] | None = None,
    ) -> tuple[requests.Response, dict[str, str]]:
        """One request, redirects not followed, the key attached by :meth:`authorize` to the
        prepared request that is sent: (response, the headers sent). Raises UnsafeURL for a URL
        :func:`~labelstudio.urls.origin` refuses or a malformed redirect, ``requests`` errors as they come."""
        origin(url)
        prepared = self.session.prepare_request(
            requests.Request(method, url, params=params, json=json_body)
        )
        self.authorize(prepared)
        try:
            r = self.session.send(
                prepared,
                stream=stream,
                allow_redirects=False,
                timeout=self.timeout if timeout is None else timeout,
            )
        except ValueError as e:  # requests reads a Location even when not following it
            raise UnsafeURL("redirected to a malformed URL") from e
        return r, dict(prepared.headers)

    # --- API calls -------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        ok: tuple[int, ...] = (200, 201),
    ) -> requests.Response:
        """An authenticated API call (``path`` relative to the base URL); one retry with a
        fresh access token after a 401.

        Raises LabelStudioError for connection errors and for statuses not in ``ok``.
        """
        url = self.absolute_url(path)
        retried, hops = False, 0
        while True:
            try:
                r, sent = self._send(method, url, params=params, json_body=json_body)
            except UnsafeURL as e:
                raise LabelStudioError(f"{method} {redact_url(url)}: {e}") from e
            except requests.RequestException as e:
                raise LabelStudioError(f"Label Studio unreachable at {self.url}") from e
            if r.status_code == 401 and not retried and self.handle_unauthorized(sent):
                logger.info(
                    "Label Studio answered 401 to %s %s; refreshing the token", method, path
                )
                r.close()
                retried = True
                continue
            if r.is_redirect and hops < MAX_REDIRECTS:
                # followed by hand, as requests would, but only within Label Studio
                target = urljoin(r.url, r.headers.get("Location", ""))
                r.close()
                if not self.is_label_studio_url(target):
                    raise LabelStudioError(
                        f"Label Studio redirected {method} {redact_url(path)} to "
                        f"{redact_url(target)}, outside {self.url}: check LABEL_STUDIO_URL"
                    )
                hops += 1
                code = r.status_code
                if (code in (302, 303) and method != "HEAD") or (code == 301 and method == "POST"):
                    method = "GET"
                if r.status_code not in (307, 308):
                    json_body = None
                url, params = target, None
                continue
            break
        if r.status_code not in ok:
            raise self.api_error(method, path, r)
        return r

    def api_error(self, method: str, path: str, r: requests.Response) -> LabelStudioError:
        """The LabelStudioError for Label Studio's error answer ``r`` (logged, without secrets)."""
        path = redact_url(path)
        detail = ""
        try:
            body = r.json()
            if isinstance(body, dict):
                detail = str(body.get("detail") or body.get("error") or "")[:200]
        except ValueError:
            pass
        if r.status_code == 401:
            if self.auth_kind == "legacy":
                hint = (
                    "legacy tokens are off in Label Studio 1.23 organizations by default: "
                    "enable them (Organization > API tokens settings) or use a personal "
                    "access token"
                )
            else:
                hint = "the personal access token was refused"
            msg = f"Label Studio refused the API key (HTTP 401) for {method} {path}: {hint}"
        else:
            msg = f"Label Studio answered HTTP {r.status_code} to {method} {path}"
            if detail:
                msg += f": {detail}"
        logger.warning("%s", msg)
        return LabelStudioError(msg)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.request(method, path, **kwargs)
        try:
            return r.json()
        except ValueError as e:
            raise LabelStudioError(f"{method} {path}: Label Studio answered non-JSON") from e

    def set_project_model_version(self, project: int, version: str) -> None:
        """``PATCH /api/projects/{id}`` ``{"model_version": version}``: the predictions Label
        Studio shows as pre-labels and scores in the data manager's prediction columns."""
        self.request("PATCH", f"/api/projects/{int(project)}", json_body={"model_version": version})

    def get_project(self, project: int) -> dict[str, Any]:
        """``GET /api/projects/{id}`` (includes ``label_config``)."""
        return self._json("GET", f"/api/projects/{int(project)}")

    def export_project(self, project: int) -> list[dict[str, Any]]:
        """``GET /api/projects/{id}/export?exportType=JSON``: the annotated tasks, each with its
        annotations (Label Studio leaves out tasks without annotations)."""
        return self._json(
            "GET", f"/api/projects/{int(project)}/export", params={"exportType": "JSON"}
        )

    def server_time(self) -> datetime.datetime | None:
        """Label Studio's clock now (the ``Date`` header of its answer, to the second); None
        when it sends none."""
        r = self.request("GET", "/api/version")
        date = r.headers.get("Date")
        try:
            return email.utils.parsedate_to_datetime(date) if date else None
        except (TypeError, ValueError):
            return None

    def close(self) -> None:
        self.session.close()
