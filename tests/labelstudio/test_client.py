"""The Label Studio client without a Label Studio: its key kinds, where it sends the key, and a
Label Studio that does not answer."""

from __future__ import annotations

import base64
import json
import time

import pytest

from contracts.errors import LabelStudioError
from labelstudio.client import LabelStudioClient, jwt_claims
from labelstudio.fetch import FetchPolicy, ImageFetcher
from launcher.redis_server import free_port
from tests.support.sockets import connections


@pytest.mark.timeout(60)  # a hang guard
@pytest.mark.parametrize("kind", ["legacy", "pat"])
def test_unreachable_label_studio_fails_fast(kind: str) -> None:
    """Each call tries one connection, and fails at once with a clear error: no retries."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = "0" * 40 if kind == "legacy" else make_jwt({"token_type": "refresh", "exp": 2**33})
    client = LabelStudioClient(url, key, timeout=2.0)
    calls = [
        lambda: client.get_project(1),
        lambda: ImageFetcher(client, FetchPolicy()).fetch("/data/upload/1/x.png"),
    ]
    for call in calls:
        unreachable = pytest.raises(LabelStudioError, match=f"Label Studio unreachable at {url}")
        with connections() as opened, unreachable:
            call()
        assert [a[:2] for a in opened] == [("127.0.0.1", port)]


def make_jwt(claims: dict) -> str:
    def seg(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'HS256', 'typ': 'JWT'})}.{seg(claims)}.c2lnbmF0dXJl"


def test_key_kind_detection() -> None:
    assert LabelStudioClient("http://ls:8080/", "ab12" * 10).auth_kind == "legacy"
    pat = make_jwt({"token_type": "refresh", "exp": time.time() + 3600})
    client = LabelStudioClient("http://ls:8080/", pat)
    assert client.auth_kind == "pat" and client.url == "http://ls:8080"
    assert jwt_claims(pat)["token_type"] == "refresh"
    assert jwt_claims("not.a.jwt") is None and jwt_claims("abc") is None
    with pytest.raises(ValueError, match="expired"):
        LabelStudioClient("http://ls:8080", make_jwt({"token_type": "refresh", "exp": 1}))
    with pytest.raises(ValueError, match="'access'"):
        LabelStudioClient("http://ls:8080", make_jwt({"token_type": "access", "exp": 2**33}))
    with pytest.raises(ValueError, match="http"):
        LabelStudioClient("ls:8080", pat)
    with pytest.raises(ValueError, match="API key"):
        LabelStudioClient("http://ls:8080", " ")


def test_auth_only_for_the_label_studio_origin() -> None:
    client = LabelStudioClient("http://ls.example:8080", "k" * 40)
    assert client.auth_headers_for("http://ls.example:8080/data/upload/1/a.png")
    assert client.auth_headers_for("HTTP://LS.EXAMPLE:8080/x")
    for other in (
        "http://ls.example/x",  # other port
        "https://ls.example:8080/x",  # other scheme
        "http://ls.example.evil:8080/x",
        "http://evil.example/?u=http://ls.example:8080",
    ):
        assert client.auth_headers_for(other) == {}, other
    assert client.absolute_url("/data/local-files/?d=a/b.png") == (
        "http://ls.example:8080/data/local-files/?d=a/b.png"
    )
    assert client.absolute_url("https://cdn.example/a.png") == "https://cdn.example/a.png"
