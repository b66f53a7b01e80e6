"""Task images in cloud storage (S3, GCS, Azure) connected to Label Studio.

A task of a project with cloud storage holds the bucket URI itself (``s3://bucket/key``,
``gs://...``, ``azure-blob://...``) in what Label Studio sends to ``/predict`` and in its exports,
and a ``/tasks/<id>/resolve/?fileuri=<base64 of the URI>`` URL in what ``/api/tasks`` returns.
Both are read the same way: from Label Studio's storage endpoint for that task, with the API key.
Label Studio then either proxies the bytes (storage set to "proxy through Label Studio") or
answers 303 with a presigned URL on the storage host (storage set to "presigned URLs").

The presigned URL is fetched without credentials. Its host is checked like any other image
host; a private address is admitted only when the host is allow-listed
(``SAM2UNET_ALLOW_HOSTS``) or when ``SAM2UNET_ALLOW_PRIVATE_STORAGE`` is on, and the latter
covers only a target that Label Studio's storage endpoint itself redirected to, never a URL
found in a task.

Label Studio may be served under a path prefix (``LABEL_STUDIO_URL=http://host:8080/ls``): the
endpoint is then ``/ls/tasks/<id>/resolve/``, and relative URLs such as
``/tasks/<id>/resolve/?fileuri=...`` or ``/data/upload/...`` are resolved under the prefix.

This module builds the endpoint's URL and turns the endpoint's and the storage host's error
answers into per-task errors that say what went wrong.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import requests

from contracts.errors import ImageFetchError
from labelstudio.urls import redact_url

# The schemes of cloud storage URIs. Label Studio 1.23 resolves s3, gs and azure-blob (and
# redis, which is no image storage); the others are refused by its endpoint with a 404.
CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "az", "wasb", "wasbs", "abfs", "abfss")
_ENDPOINT = re.compile(r"^/(?:tasks|projects)/\d+/(?:resolve|presign)/?$")
_ENDPOINT_ANYWHERE = re.compile(r"/(?:tasks|projects)/\d+/(?:resolve|presign)/?$")
_ERROR_BODY_BYTES = 8192


def resolve_url(ls_url: str, uri: str, task_id: int) -> str:
    """Label Studio's storage endpoint for ``uri`` as an image of task ``task_id``; ``ls_url``
    is Label Studio's base URL, its path prefix included (``http://host:8080/ls``)."""
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    return f"{ls_url.rstrip('/')}/tasks/{int(task_id)}/resolve/?fileuri={encoded}"


def is_endpoint(url: str, base_path: str = "") -> bool:
    """Whether ``url``'s path is Label Studio's storage endpoint (``/tasks/<id>/resolve/``,
    ``/presign/`` or their project-level forms) under ``base_path``, the path prefix Label
    Studio is served under (``""`` at the root, else e.g. ``/ls``); the caller checks the
    origin."""
    try:
        path = urlsplit(url).path
    except ValueError:
        return False
    prefix = base_path.rstrip("/")
    if prefix:
        if not path.startswith(prefix + "/"):
            return False
        path = path[len(prefix) :]
    return bool(_ENDPOINT.match(path))


def describe(url: str) -> str:
    """A storage endpoint URL named by the URI it resolves (``s3://bucket/key``), for messages;
    other URLs redacted as usual. The endpoint is recognized under any path prefix."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_url(url)
    if _ENDPOINT_ANYWHERE.search(parts.path):
        raw = parse_qs(parts.query).get("fileuri", [""])[0]
        try:
            uri = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        except (binascii.Error, ValueError):
            uri = ""
        if "://" in uri:
            return redact_url(uri)
    return redact_url(url)


def endpoint_error(what: str, url: str, r: requests.Response) -> ImageFetchError:
    """The per-task error for Label Studio's storage endpoint answering ``r`` (not 2xx, not
    401) to ``url``; ``what`` names the image."""
    task = re.search(r"/(tasks|projects)/(\d+)/", urlsplit(url).path)
    of = f"{task.group(1)[:-1]} {task.group(2)}" if task else "the task"
    if r.status_code == 403:
        reason = (
            f"Label Studio refused the API key access to {of} (HTTP 403): the key's user is "
            "not a member of the project's organization"
        )
    elif r.status_code == 404:
        reason = (
            f"Label Studio cannot resolve it for {of} (HTTP 404): no cloud storage connected "
            "to the project holds this bucket, or Label Studio could not presign it (its log "
            "says why), or the task is gone"
        )
    else:
        detail = _json_detail(r)
        reason = (
            f"Label Studio could not read it from the project's cloud storage "
            f"(HTTP {r.status_code}{': ' + detail if detail else ''}): check the storage's "
            "credentials and that the object still exists"
        )
    return ImageFetchError(f"{what}: {reason}")


def storage_error(what: str, url: str, r: requests.Response) -> ImageFetchError:
    """The per-task error for the storage host answering ``r`` (not 200) to the presigned
    ``url`` that Label Studio issued; ``what`` names the image."""
    code, message = _xml_error(r)
    said = (
        f"HTTP {r.status_code}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    )
    host = urlsplit(url).netloc.rsplit("@", 1)[-1]
    text = f"{code} {message}".lower()
    if "expired" in text or "request is not valid at this time" in text:
        hint = (
            "the presigned URL Label Studio issued has expired: raise the storage's presign "
            "TTL in Label Studio, or set the clocks of Label Studio and the storage right"
        )
    elif r.status_code == 404 or code in ("NoSuchKey", "NoSuchBucket", "BlobNotFound"):
        hint = "the object is not in the bucket (deleted after the storage was synced?)"
    elif r.status_code == 403:
        hint = (
            "the storage refused the presigned URL: the credentials Label Studio signs with "
            "cannot read this object"
        )
    else:
        hint = "the storage could not serve the object"
    return ImageFetchError(f"{what}: storage host {host} answered {said}; {hint}")


def _json_detail(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    return " ".join(str(body.get(k) or "") for k in ("error", "detail")).strip()[:200]


def _xml_error(r: requests.Response) -> tuple[str, str]:
    """``(Code, Message)`` of an S3, GCS or Azure XML error body (empty strings if none)."""
    try:
        raw = r.raw.read(_ERROR_BODY_BYTES, decode_content=True) if r.raw is not None else b""
        root = ElementTree.fromstring(raw)
    except (ElementTree.ParseError, OSError, ValueError, AttributeError):
        return "", ""
    found: dict[str, str] = {}
    for el in root.iter():  # <Error><Code>, or nested as in <ErrorResponse><Errors><Error>
        tag = el.tag.rsplit("}", 1)[-1] if isinstance(el.tag, str) else ""
        if tag in ("Code", "Message") and tag not in found:
            found[tag] = (el.text or "").strip()
    message = found.get("Message", "").splitlines()
    return found.get("Code", "")[:60], (message[0][:160] if message else "")
