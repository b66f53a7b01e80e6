"""Guarded image fetching for task URLs: size, time and address limits.

A task's image URL comes from whoever created the task, so fetching it must not become a way to
reach the worker's private network (SSRF), to send Label Studio's API key elsewhere, to exhaust
the worker's memory or to hold it forever:

- One URL parser decides. Every http(s) URL, each redirect hop included, is read by
  :func:`labelstudio.urls.origin`: the scheme, host and port the HTTP library will connect to,
  read from the URL as ``requests`` prepares it. A URL that Python's ``urllib.parse`` reads
  differently, or that holds a backslash, whitespace or control characters, user info
  (``user@``), percent-encoding or non-IDNA characters in its host, is refused. The address
  check, the API key and the connection all follow that one reading, and the key is attached
  to the prepared request that is sent only when its URL has exactly the Label Studio origin.
  The task's value is stripped of surrounding whitespace once, before anything is decided.
- Label Studio URLs (``/data/upload/...``, ``/data/local-files/?d=...``, or absolute URLs on the
  Label Studio origin) are fetched from the configured Label Studio with its API key, under its
  path prefix if it has one; a ``/data/local-files/`` file under one of ``local_roots`` is read
  from disk directly.
- Other ``http(s)`` URLs are fetched without credentials. Their host is resolved (within the
  fetch's time limit) and every address is checked before connecting: private, loopback,
  link-local, multicast, reserved and unspecified addresses are refused unless allow-listed.
  ``allow_private`` admits private, loopback and other non-public unicast addresses, never
  link-local ones (169.254.0.0/16, which holds cloud metadata services, and fe80::/10): those
  need an explicit ``allow_hosts`` entry. Redirects (at most 5) are followed by hand and each
  hop is checked again.
- DNS rebinding: the address checked before connecting could differ from the one connected to
  if DNS answers differently the second time. Every new connection therefore checks the peer
  address of its socket again, right after connecting and before sending a byte.
- Cloud storage URIs (``s3://``, ``gs://``, ``azure-blob://``) are read through Label Studio's
  storage endpoint for the task (see :mod:`labelstudio.storage`); a presigned URL it redirects
  to is fetched without credentials, on a private or loopback address only when allow-listed or
  when ``allow_private_storage`` is on (never a link-local one).
- ``data:`` URIs with base64 data are decoded, size-capped. ``file:`` and ``ftp:`` are refused.
- Bodies are streamed and cut off past ``max_bytes``; the whole fetch, redirects and name
  lookups included, must finish within ``timeout`` seconds.

Every failure is an ImageFetchError whose message names the URL without credentials or query
tokens, except Label Studio refusing the API key or being unreachable, which is a
LabelStudioError (a configuration problem that affects every task).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from contracts.errors import ImageFetchError
from labelstudio import storage
from labelstudio.guarded_get import GuardedGet
from labelstudio.urls import UnsafeURL, origin, redact_url, url_scheme
from sam2unet.exceptions import ImageError
from sam2unet.transforms import MAX_IMAGE_PIXELS, decode_image

if TYPE_CHECKING:
    from contracts.settings import Settings
    from labelstudio.client import LabelStudioClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for fetching task images.

    Attributes:
        max_bytes: largest body accepted, in bytes.
        timeout: seconds for a whole fetch (connect, redirects and body).
        max_pixels: largest decoded image, in pixels (decompression bombs).
        allow_private: admit private, loopback and other non-public unicast addresses
            (``SAM2UNET_ALLOW_PRIVATE_URLS``); never link-local ones (169.254.0.0/16, where
            cloud metadata services answer, and fe80::/10).
        allow_hosts: hosts admitted even when their addresses are not public: host names,
            ``host:port``, IP addresses or CIDR networks (``SAM2UNET_ALLOW_HOSTS``). The only
            way to admit a link-local address. The Label Studio origin is always admitted.
        allow_private_storage: admit a private or loopback address, never a link-local one,
            for a presigned URL that Label Studio's storage endpoint redirected to (never for
            a URL found in a task; ``SAM2UNET_ALLOW_PRIVATE_STORAGE``).
        local_roots: Label Studio local-files document roots readable from disk here: a
            ``/data/local-files/?d=<path>`` URL is read from ``<root>/<path>`` when that file
            exists under a root, else fetched from Label Studio.
    """

    max_bytes: int = 50 * 1024 * 1024
    timeout: float = 15.0
    max_pixels: int = MAX_IMAGE_PIXELS
    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()
    allow_private_storage: bool = False
    local_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout <= 0 or self.max_pixels <= 0:
            raise ValueError("max_bytes, timeout and max_pixels must be positive")

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        return cls(
            max_bytes=settings.max_image_bytes,
            timeout=settings.fetch_timeout,
            max_pixels=settings.max_image_pixels,
            allow_private=settings.allow_private_urls,
            allow_hosts=tuple(settings.allow_hosts),
            allow_private_storage=settings.allow_private_storage,
            local_roots=tuple(settings.local_files_roots),
        )


class ImageFetcher:
    """Fetches task images under a FetchPolicy.

    Args:
        ls_client: the Label Studio client, for Label Studio URLs (None: relative URLs need
            ``ls_base`` and are fetched without credentials).
        policy: size, time and address limits.
    """

    def __init__(
        self, ls_client: LabelStudioClient | None = None, policy: FetchPolicy | None = None
    ) -> None:
        self.client = ls_client
        self.policy = policy or FetchPolicy()
        self.http = GuardedGet(ls_client, self.policy)
        self._roots = [os.path.realpath(r) for r in self.policy.local_roots]

    def close(self) -> None:
        self.http.close()

    def fetch(self, url: str, ls_base: str | None = None, task_id: int | None = None) -> bytes:
        """The bytes at ``url`` (see the module docstring for what is accepted).

        Args:
            url: a task's image reference: relative Label Studio URL, http(s) URL, cloud
                storage URI or data URI.
            ls_base: Label Studio's own base URL as it names itself (``hostname`` from
                ``/setup``). Relative URLs use the client's URL when there is a client, else
                this; absolute URLs on this origin are fetched from the client's URL instead.
            task_id: the task whose image it is (needed for cloud storage URIs).
        """
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("the task has no image URL")
        # stripped once, here: every decision below reads this same string
        url = url.strip()
        t0 = time.monotonic()
        scheme = url_scheme(url)
        if scheme == "data":
            data = self._from_data_uri(url)
        elif scheme in ("http", "https") or (not scheme and url.startswith("/")):
            data = self._from_http(self._resolve(url, ls_base))
        elif scheme in storage.CLOUD_SCHEMES:
            data = self._from_http(self._storage_url(url, task_id), name=redact_url(url))
        elif scheme:
            raise ImageFetchError(
                f"{redact_url(url)}: the {scheme!r} scheme is not allowed; use http(s) URLs, "
                "data URIs or Label Studio URLs"
            )
        else:
            raise ImageFetchError(f"{redact_url(url)}: not a URL")
        logger.debug(
            "fetched %s: %d bytes in %.2f s", redact_url(url), len(data), time.monotonic() - t0
        )
        return data

    def fetch_image(
        self, url: str, ls_base: str | None = None, task_id: int | None = None
    ) -> np.ndarray:
        """``fetch`` and decode: H x W x 3 uint8. Empty, corrupt, truncated or oversized images
        (more than ``policy.max_pixels``) raise ImageFetchError."""
        data = self.fetch(url, ls_base, task_id)
        try:
            return decode_image(data, max_pixels=self.policy.max_pixels)
        except ImageError as e:
            raise ImageFetchError(f"{redact_url(url)}: {e}") from e

    def _storage_url(self, uri: str, task_id: int | None) -> str:
        """Label Studio's storage endpoint that reads cloud URI ``uri`` of task ``task_id``."""
        if self.client is None:
            raise ImageFetchError(
                f"{redact_url(uri)}: cloud storage URIs are read through Label Studio: set "
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (and connect the bucket as cloud "
                "storage in the project)"
            )
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise ImageFetchError(
                f"{redact_url(uri)}: a cloud storage URI is resolved by Label Studio per task, "
                "and this image has no task id"
            )
        return storage.resolve_url(self.client.url, uri, task_id)

    def _resolve(self, url: str, ls_base: str | None) -> str:
        """Make a Label Studio URL absolute, pointing at the client's URL where possible."""
        base = ls_base.strip().rstrip("/") if ls_base else None
        if url.startswith("/") and not url.startswith(("//", "/\\")):
            if self.client is not None:
                return self.client.absolute_url(url)
            if base:
                return base + url
            raise ImageFetchError(
                f"{redact_url(url)}: a relative Label Studio URL needs Label Studio's URL "
                "(set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)"
            )
        if url.startswith("/"):
            raise ImageFetchError(f"{redact_url(url)}: scheme-relative URLs are not supported")
        if self.client is not None and base and self._same_origin(url, base):
            parts, prefix = urlsplit(url), urlsplit(base).path.rstrip("/")
            path = parts.path
            if prefix and (path == prefix or path.startswith(prefix + "/")):
                path = path[len(prefix) :] or "/"
            return self.client.absolute_url(path + (f"?{parts.query}" if parts.query else ""))
        return url

    @staticmethod
    def _same_origin(url: str, base: str) -> bool:
        try:
            return origin(url) == origin(base)
        except UnsafeURL:
            return False  # refused later, when fetched

    def _ls_path(self, url: str) -> str:
        """``url``'s path below the client's path prefix (its path when there is no client)."""
        path = urlsplit(url).path
        prefix = self.client.base_path if self.client is not None else ""
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix) :] or "/"
        return path

    def _local_file(self, url: str) -> str | None:
        """The path of a ``/data/local-files/?d=...`` URL's file under a local root, if any."""
        if not self._roots:
            return None
        if self.client is not None and not self.client.is_label_studio_url(url):
            return None
        try:
            parts = urlsplit(url)
        except ValueError:
            return None
        if self._ls_path(url).rstrip("/") != "/data/local-files":
            return None
        rel = parse_qs(parts.query).get("d", [""])[0]
        if not rel:
            return None
        for root in self._roots:
            path = os.path.realpath(os.path.join(root, rel))
            if os.path.commonpath([path, root]) == root and os.path.isfile(path):
                return path
        return None

    def _read_file(self, path: str, url: str) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read(self.policy.max_bytes + 1)
        except OSError as e:
            raise ImageFetchError(f"{redact_url(url)}: cannot read local file: {e.strerror}") from e
        if len(data) > self.policy.max_bytes:
            raise ImageFetchError(f"{redact_url(url)}: file exceeds {self.policy.max_bytes} bytes")
        return data

    def _from_http(self, url: str, name: str | None = None) -> bytes:
        """GET ``url`` under the policy (a local file when one of ``local_roots`` holds it);
        ``name`` names the image in errors (default: the redacted URL, or the cloud URI of a
        storage endpoint URL)."""
        path = self._local_file(url)
        if path is not None:
            return self._read_file(path, url)
        return self.http.get(url, name or storage.describe(url))

    def _from_data_uri(self, url: str) -> bytes:
        head, sep, payload = url[5:].partition(",")
        what = redact_url(url)
        if not sep:
            raise ImageFetchError(f"{what}: malformed data URI (no comma)")
        params = [p.strip().lower() for p in head.split(";")]
        if "base64" not in params[1:]:
            raise ImageFetchError(f"{what}: only base64 data URIs are supported")
        mime = params[0]
        if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
            raise ImageFetchError(f"{what}: data URI of type {mime!r} is not an image")
        # generous bound before decoding (line breaks, percent-encoding); exact check after
        if len(payload) > self.policy.max_bytes * 2 + 1024:
            raise ImageFetchError(f"{what}: data exceeds {self.policy.max_bytes} bytes")
        if "%" in payload:
            payload = unquote(payload)
        payload = "".join(payload.split())
        try:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageFetchError(f"{what}: invalid base64 data") from e
        if not data:
            raise ImageFetchError(f"{what}: empty data URI")
        if len(data) > self.policy.max_bytes:
            raise ImageFetchError(f"{what}: data exceeds {self.policy.max_bytes} bytes")
        return data
