"""Cloud storage URIs and presigned redirects: the address rule, the API key's reach and the
per-task errors, against real HTTP servers on 127.0.0.1 answering as Label Studio's storage
endpoint and as a storage host do (Label Studio and S3 themselves: tests/system/test_e2e_cloud_storage.py).
"""

from __future__ import annotations

import base64
import http.server
import json

import pytest

from contracts.errors import ImageFetchError
from labelstudio import storage
from labelstudio.client import LabelStudioClient
from labelstudio.fetch import FetchPolicy, ImageFetcher
from tests.labelstudio.test_fetch import IMAGE, Server, body, redirect
from tests.support.sockets import rebind

TOKEN = "0123456789abcdef0123456789abcdef01234567"
URI = "s3://bucket/dir/a b.png"
ENDPOINT = "/tasks/7/resolve/"


def answer(status: int, payload: bytes = b"", ctype: str = "application/xml"):
    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    return handler


@pytest.fixture
def ls() -> Server:
    s = Server({})
    yield s
    s.close()


@pytest.fixture
def store() -> Server:
    s = Server({})
    yield s
    s.close()


@pytest.fixture
def other_server() -> Server:
    s = Server({})
    yield s
    s.close()


def presigned(store: Server, path: str = "/bucket/dir/a%20b.png") -> str:
    return f"{store.url}{path}?X-Amz-Signature=s3cr3t&X-Amz-Credential=k"


def test_resolve_url_and_describe_round_trip() -> None:
    url = storage.resolve_url("http://ls:8080/", URI, 7)
    assert url.startswith("http://ls:8080/tasks/7/resolve/?fileuri=")
    raw = url.split("fileuri=")[1]
    assert base64.urlsafe_b64decode(raw).decode() == URI  # what Label Studio decodes
    assert storage.is_endpoint(url) and storage.is_endpoint("http://ls/projects/2/presign/")
    assert not storage.is_endpoint("http://ls/data/upload/1/x.png")
    assert storage.describe(url) == "s3://bucket/dir/a b.png"
    assert storage.describe("http://s/x?X-Amz-Signature=abc") == "http://s/x?X-Amz-Signature=..."


def test_cloud_uri_goes_to_the_endpoint_with_the_key_and_proxied_bytes_come_back(ls) -> None:
    ls.routes[ENDPOINT] = body(IMAGE)
    fetcher = ImageFetcher(LabelStudioClient(ls.url, TOKEN), FetchPolicy())
    assert fetcher.fetch(URI, None, 7) == IMAGE
    ((path, headers),) = ls.requests
    assert path == ENDPOINT + "?fileuri=" + base64.urlsafe_b64encode(URI.encode()).decode()
    assert headers["Authorization"] == f"Token {TOKEN}"
    with pytest.raises(ImageFetchError, match="no task id"):
        fetcher.fetch(URI, None, None)


def test_presigned_redirect_target_private_only_with_an_allowance(ls, store) -> None:
    ls.routes[ENDPOINT] = redirect(presigned(store), 303)
    store.routes["/bucket/dir/a%20b.png"] = body(IMAGE)
    client = LabelStudioClient(ls.url, TOKEN)
    with pytest.raises(ImageFetchError, match="SAM2UNET_ALLOW_PRIVATE_STORAGE=true") as e:
        ImageFetcher(client, FetchPolicy()).fetch(URI, None, 7)
    assert "s3cr3t" not in str(e.value) and f"SAM2UNET_ALLOW_HOSTS=127.0.0.1:{store.port}" in str(
        e.value
    )
    assert store.requests == []  # refused before connecting
    for policy in (
        FetchPolicy(allow_private_storage=True),
        FetchPolicy(allow_hosts=(f"127.0.0.1:{store.port}",)),
    ):
        assert ImageFetcher(client, policy).fetch(URI, None, 7) == IMAGE
    # the API key went to Label Studio only, never to the storage host
    assert all(h.get("Authorization") == f"Token {TOKEN}" for _, h in ls.requests)
    assert [h.get("Authorization") for _, h in store.requests] == [None, None]


def test_label_studio_cookies_never_follow_to_the_storage_host(ls, store) -> None:
    """Label Studio sets its session cookie on API answers; cookies ignore ports, so a kept
    cookie would go to a storage host on the same name (both on 127.0.0.1 here)."""

    def endpoint(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(303)
        h.send_header("Set-Cookie", "sessionid=ls-session-secret; Path=/; HttpOnly")
        h.send_header("Location", presigned(store))
        h.send_header("Content-Length", "0")
        h.end_headers()

    ls.routes[ENDPOINT] = endpoint
    ls.routes["/data/upload/1/x.png"] = endpoint
    store.routes["/bucket/dir/a%20b.png"] = body(IMAGE)
    client = LabelStudioClient(ls.url, TOKEN)
    fetcher = ImageFetcher(client, FetchPolicy(allow_private_storage=True))
    for _ in range(2):
        assert fetcher.fetch(URI, None, 7) == IMAGE
    # a Label Studio URL (not the storage endpoint) redirected to a host allowed by name
    to_store = ImageFetcher(client, FetchPolicy(allow_hosts=(f"127.0.0.1:{store.port}",)))
    for _ in range(2):
        assert to_store.fetch("/data/upload/1/x.png") == IMAGE
    assert [h.get("Cookie") for _, h in ls.requests + store.requests] == [None] * 8


def test_presigned_looking_url_not_from_label_studio_is_refused(ls, store) -> None:
    """The storage allowance covers only a target Label Studio's storage endpoint redirected
    to: the same URL in a task's data, or behind a redirect from elsewhere, is refused."""
    store.routes["/bucket/dir/a%20b.png"] = body(IMAGE)
    ls.routes["/data/upload/1/x.png"] = redirect(presigned(store), 302)
    ls.routes["/tasks/7/other/"] = redirect(presigned(store), 303)
    fetcher = ImageFetcher(
        LabelStudioClient(ls.url, TOKEN), FetchPolicy(allow_private_storage=True)
    )
    for url in (
        presigned(store),  # straight from the task's data
        "/data/upload/1/x.png",  # a Label Studio redirect that is not the storage endpoint
        ls.url + "/tasks/7/other/",
        "http://10.0.0.1/bucket/k.png?X-Amz-Signature=abc&X-Amz-Expires=60",
    ):
        with pytest.raises(ImageFetchError, match="address") as e:
            fetcher.fetch(url, None, 7)
        assert "SAM2UNET_ALLOW_PRIVATE_STORAGE" not in str(e.value)
    assert store.requests == []


def test_storage_redirecting_further_is_not_trusted(ls, store, other_server) -> None:
    """Only the hop Label Studio issued is trusted: the storage host redirecting on to another
    private address is refused."""
    ls.routes[ENDPOINT] = redirect(presigned(store), 303)
    store.routes["/bucket/dir/a%20b.png"] = redirect(other_server.url + "/x.png", 302)
    other_server.routes["/x.png"] = body(IMAGE)
    fetcher = ImageFetcher(
        LabelStudioClient(ls.url, TOKEN), FetchPolicy(allow_private_storage=True)
    )
    with pytest.raises(ImageFetchError, match="loopback address"):
        fetcher.fetch(URI, None, 7)
    assert other_server.requests == []


def test_dns_rebinding_of_the_issued_host_is_caught_at_connect_time(ls, store, monkeypatch):
    """The issued host's name resolves to a public address when checked and to loopback when
    connecting: without the storage allowance the peer check refuses it before a byte is sent."""
    ls.routes[ENDPOINT] = redirect(
        f"http://storage.example.test:{store.port}/k.png?Signature=x", 303
    )
    store.routes["/k.png"] = body(IMAGE)
    calls = rebind(monkeypatch, "storage.example.test")
    fetcher = ImageFetcher(LabelStudioClient(ls.url, TOKEN), FetchPolicy())
    with pytest.raises(ImageFetchError, match=r"connected to 127\.0\.0\.1, a loopback address"):
        fetcher.fetch(URI, None, 7)
    assert len(calls) == 2 and store.requests == []


@pytest.mark.parametrize(
    ("status", "payload", "match"),
    [
        (403, b"", "refused the API key access to task 7 \\(HTTP 403\\)"),
        (404, b"", "no cloud storage connected to the project holds this bucket"),
        (
            424,
            json.dumps({"error": "Storage stream failed", "detail": "Stream is None"}).encode(),
            "could not read it from the project's cloud storage \\(HTTP 424: Storage stream",
        ),
    ],
)
def test_label_studio_endpoint_errors_name_the_task_and_the_uri(ls, status, payload, match):
    ls.routes[ENDPOINT] = answer(status, payload, "application/json")
    fetcher = ImageFetcher(LabelStudioClient(ls.url, TOKEN), FetchPolicy())
    with pytest.raises(ImageFetchError, match=match) as e:
        fetcher.fetch(URI, None, 7)
    assert str(e.value).startswith("s3://bucket/dir/a b.png: ")


S3_ERRORS = {
    "expired": b"<?xml version='1.0'?><Error><Code>AccessDenied</Code>"
    b"<Message>Request has expired</Message><Expires>2026-01-01T00:00:00Z</Expires></Error>",
    "denied": b"<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we "
    b"calculated does not match</Message></Error>",
    "moto": b'<?xml version="1.0" encoding="utf-8"?>\n<ErrorResponse><Errors><Error><Code>'
    b"SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match"
    b"</Message><Type>Sender</Type></Error></Errors></ErrorResponse>",
    "missing": b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist."
    b"</Message></Error>",
    "azure": b"\xef\xbb\xbf<?xml version='1.0'?><Error><Code>AuthenticationFailed</Code><Message>"
    b"Server failed to authenticate the request.\nRequestId:1\nTime:x</Message>"
    b"<AuthenticationErrorDetail>Signed expiry time [x] has to be after signed start time"
    b"</AuthenticationErrorDetail></Error>",
}


@pytest.mark.parametrize(
    ("kind", "status", "match"),
    [
        (
            "expired",
            403,
            "HTTP 403 AccessDenied: Request has expired; the presigned URL Label "
            "Studio issued has expired",
        ),
        ("denied", 403, "SignatureDoesNotMatch.*credentials Label Studio signs with"),
        ("moto", 403, "HTTP 403 SignatureDoesNotMatch: The request signature we calculated"),
        ("missing", 404, "NoSuchKey.*object is not in the bucket"),
        ("azure", 403, "AuthenticationFailed: Server failed to authenticate the request\\.;"),
    ],
)
def test_storage_host_errors_after_a_presign(ls, store, kind, status, match):
    ls.routes[ENDPOINT] = redirect(presigned(store), 303)
    store.routes["/bucket/dir/a%20b.png"] = answer(status, S3_ERRORS[kind])
    fetcher = ImageFetcher(
        LabelStudioClient(ls.url, TOKEN), FetchPolicy(allow_private_storage=True)
    )
    with pytest.raises(ImageFetchError, match=match) as e:
        fetcher.fetch(URI, None, 7)
    assert str(e.value).startswith("s3://bucket/dir/a b.png: storage host 127.0.0.1:")
    assert "s3cr3t" not in str(e.value)
