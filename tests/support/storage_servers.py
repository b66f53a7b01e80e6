"""Real cloud storage servers for tests, on 127.0.0.1: moto's S3 in server mode and
gcp-storage-emulator for GCS.

``S3Server`` serves moto's WSGI application (what ``moto_server`` runs) with a thin layer that
records every request (method, path, query, headers) so tests can check who sent what to the
storage host, and that refuses an expired presigned URL the way S3 does (``403 AccessDenied``,
"Request has expired"), which moto itself does not check.
"""

from __future__ import annotations

import threading
import time
from calendar import timegm
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

ACCESS_KEY = "AKIAASSISTTEST000000"
SECRET_KEY = "assist-test-secret-key-not-a-real-one"
REGION = "us-east-1"

_EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><RequestId>0</RequestId></Error>"
)


@dataclass
class S3Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


def _expired(query: dict[str, list[str]], now: float) -> bool:
    """Whether a presigned request (signature v2 ``Expires`` or v4 ``X-Amz-Date`` +
    ``X-Amz-Expires``) is past its expiry."""
    if "Expires" in query and "Signature" in query:
        return now >= float(query["Expires"][0])
    if "X-Amz-Expires" in query and "X-Amz-Date" in query:
        signed = timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
        return now >= signed + int(query["X-Amz-Expires"][0])
    return False


class S3Server:
    """moto S3 on 127.0.0.1 (a free port); ``requests`` holds every request received."""

    def __init__(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[S3Request] = []
        self._lock = threading.Lock()

        def recording(environ: dict[str, Any], start_response: Any) -> Any:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            headers = {
                k[5:].replace("_", "-").title(): str(v)
                for k, v in environ.items()
                if k.startswith("HTTP_")
            }
            with self._lock:
                self.requests.append(
                    S3Request(environ["REQUEST_METHOD"], environ["PATH_INFO"], query, headers)
                )
            if environ["REQUEST_METHOD"] == "GET" and _expired(query, time.time()):
                start_response(
                    "403 Forbidden",
                    [("Content-Type", "application/xml"), ("Content-Length", str(len(_EXPIRED)))],
                )
                return [_EXPIRED]
            return app(environ, start_response)

        self.httpd = make_server("127.0.0.1", 0, recording, threaded=True)
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def storage_params(self) -> dict[str, Any]:
        """The connection fields of a Label Studio S3 storage for this server."""
        return {
            "s3_endpoint": self.url,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "region_name": REGION,
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class GCSServer:
    """gcp-storage-emulator (a GCS JSON and XML API server) in memory on 127.0.0.1.

    Label Studio's GCS storage reaches it with ``label_studio_env()``: google-cloud-storage
    reads ``STORAGE_EMULATOR_HOST`` (and then uses anonymous credentials), and Label Studio's
    proxy downloads from ``RESOLVER_PROXY_GCS_DOWNLOAD_URL``. It lists, syncs and proxies
    objects; it cannot presign (signing needs a service account key, which the client ignores
    under the emulator), so Label Studio's endpoint answers 404 for a presigned GCS storage.
    """

    def __init__(self) -> None:
        from gcp_storage_emulator.server import create_server

        from launcher.redis_server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = create_server("127.0.0.1", self.port, in_memory=True)
        self.server.start()

    def label_studio_env(self) -> dict[str, str]:
        """Environment variables that point Label Studio's GCS storage at this server."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "RESOLVER_PROXY_GCS_DOWNLOAD_URL": self.url
            + "/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media",
        }

    def create_bucket(self, name: str) -> None:
        import requests

        r = requests.post(f"{self.url}/storage/v1/b", json={"name": name}, timeout=10)
        r.raise_for_status()

    def put(self, bucket: str, key: str, data: bytes, content_type: str = "image/png") -> None:
        import requests

        r = requests.post(
            f"{self.url}/upload/storage/v1/b/{bucket}/o",
            params={"uploadType": "media", "name": key},
            data=data,
            headers={"Content-Type": content_type},
            timeout=10,
        )
        r.raise_for_status()

    def close(self) -> None:
        self.server.stop()
