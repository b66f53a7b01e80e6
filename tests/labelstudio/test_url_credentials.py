"""The Label Studio API key goes only to Label Studio's origin, whatever a task's URL looks like.

Two real servers on loopback stand in for Label Studio (127.0.0.1) and for another host
(127.0.0.2, allow-listed so that the address rules do not hide anything); both record the
``Authorization`` header of every request they receive. URLs are built from hostile pieces
(backslashes, ``@``, ``#``, ``?``, percent-encoded delimiters, IPv6 literals, whitespace, unicode
dots, scheme case, userinfo, ports, doubled slashes) and fetched directly and behind a redirect
from Label Studio's origin. For every URL either the fetcher refuses it, or the server that got
the request is the host the URL was decided to name, and it carried the key only if that host is
Label Studio's origin. The other server never sees the key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator
from urllib.parse import quote, urljoin

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from contracts.errors import ImageFetchError, LabelStudioError
from labelstudio.client import LabelStudioClient
from labelstudio.fetch import FetchPolicy, ImageFetcher
from labelstudio.urls import origin
from tests.support.sockets import Received, RecordingServer

KEY = "ls-key-5f0c1e9a7b3d2c4e6f8a0b1c2d3e4f50"
SENT_KEY = f"Token {KEY}"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RecordingServer, RecordingServer]]:
    ls, other = RecordingServer("127.0.0.1"), RecordingServer("127.0.0.2")
    yield ls, other
    ls.close()
    other.close()


@pytest.fixture(scope="module")
def fetcher(servers) -> Iterator[ImageFetcher]:
    ls, _ = servers
    policy = FetchPolicy(
        allow_hosts=("127.0.0.0/8", "::1", "::ffff:127.0.0.0/104", "localhost"), timeout=3.0
    )
    f = ImageFetcher(LabelStudioClient(ls.url, KEY), policy)
    yield f
    f.close()


def expand(template: str, ls: RecordingServer, other: RecordingServer) -> str:
    return (
        template.replace("{L}", ls.authority)
        .replace("{O}", other.authority)
        .replace("{LP}", str(ls.port))
        .replace("{OP}", str(other.port))
    )


# The 15 crafted URLs of the issue: each must be refused or reach its host, never leak the key.
KINDS = {
    "backslash": "http://{O}\\@{L}/x.png",
    "doubled backslash": "http://{O}\\\\@{L}/x.png",
    "percent-encoded backslash": "http://{O}%5C@{L}/x.png",
    "userinfo of the other host": "http://{O}@{L}/x.png",
    "userinfo of Label Studio": "http://{L}@{O}/x.png",
    "fragment": "http://{O}#@{L}/x.png",
    "tab": "http://{O}\t\\@{L}/x.png",
    "scheme case": "HtTp://{O}\\@{L}/x.png",
    "leading space": " http://{O}\\@{L}/x.png",
    "backslash before the path": "http://{O}\\{L}/x.png",
    "slash-backslash": "http:/\\{O}\\@{L}/x.png",
    "unicode dots": "http://127\u30020\u30020\u30022:{OP}\\@{L}/x.png",
    "fullwidth dot userinfo": "http://127\uff0e0\uff0e0\uff0e2:{OP}\\@{L}/x.png",
    "redirect to the other host": "redirect:http://{O}/x.png",
    "redirect to a crafted URL": "redirect:http://{O}\\@{L}/x.png",
}


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def fetch_and_check(fetcher: ImageFetcher, servers, url: str, redirected: bool) -> str:
    """Fetch ``url`` (behind a redirect from Label Studio's origin when ``redirected``) and check
    who got what; returns what happened, for the test's record."""
    ls, other = servers
    marks = ls.snapshot(), other.snapshot()
    sent = "/redirect?to=" + quote(url, safe="") if redirected else url
    try:
        fetcher.fetch(sent)
        outcome = "fetched"
    except (ImageFetchError, LabelStudioError) as e:
        outcome = f"refused: {e}"
    got_ls, got_other = ls.since(marks[0]), other.since(marks[1])
    # the key never reaches the other host, by any path
    assert all(r.authorization is None for r in got_other), (url, got_other)
    if redirected:
        assert got_ls and got_ls[0].authorization == SENT_KEY  # the first hop is Label Studio
        got_ls = got_ls[1:]
    hops: list[tuple[RecordingServer, Received]] = [(ls, r) for r in got_ls] + [
        (other, r) for r in got_other
    ]
    if hops:
        assert len(hops) == 1, (url, hops)
        server, request = hops[0]
        # a Location header's value loses its surrounding spaces and tabs on the way
        redirect_target = urljoin(ls.url + "/redirect", url.strip(" \t"))
        target = redirect_target if redirected else url.strip()
        # the URL was fetched: the host it was decided to name is the host that got it
        scheme, host, port = origin(target)
        assert (ip_of(host), port) == (ipaddress.ip_address(server.host), server.port), (
            url,
            (scheme, host, port),
            server.authority,
        )
        expect_key = (scheme, host, port) == origin(ls.url)
        assert (request.authorization == SENT_KEY) == expect_key, (url, request)
        assert request.authorization in (None, SENT_KEY)
    return outcome


@pytest.mark.parametrize("kind", list(KINDS))
def test_crafted_urls_never_carry_the_key_elsewhere(fetcher, servers, kind: str) -> None:
    template = KINDS[kind]
    redirected = template.startswith("redirect:")
    url = expand(template.removeprefix("redirect:"), *servers)
    fetch_and_check(fetcher, servers, url, redirected)


# --- the hunt -------------------------------------------------------------------------------
HOSTS = [
    "{O}",
    "{L}",
    "localhost:{LP}",
    "LocalHost:{LP}",
    "[::ffff:127.0.0.2]:{OP}",
    "[::1]:{LP}",
    "127.0.0.1.:{LP}",
    "2130706434:{OP}",
    "127.0.0.2:{OP}:{LP}",
    "127.0.0.1:0{LP}",
    "127%2E0%2E0%2E2:{OP}",
    "127\u30020\u30020\u30022:{OP}",
    "127\uff0e0\uff0e0\uff0e2:{OP}",
    "[127.0.0.2]:{OP}",
    "127.0.0.2",
]
JOINERS = [
    "/",
    "?",
    "#",
    "/%5C",
    "?@",
    "\\@",
    "\\",
    "\\\\@",
    "%5C@",
    "%5c@",
    "@",
    "#@",
    "/@",
    "%40",
    "%2F@",
    "\t@",
    " @",
    "\n@",
    "%09@",
    ":@",
    "/\\@",
]
TAILS = ["/x.png", "", "/", "?d=1", "#frag", "/a%2Fb", "/\u00e9.png", "\\x.png"]
# two authorities around one hostile joiner: where parsers most often disagree
focused = st.builds(
    lambda scheme, a, joiner, b, tail: f"{scheme}://{a}{joiner}{b}{tail}",
    st.sampled_from(["http", "HTTP", "hTtP"]),
    st.sampled_from(
        ["{O}", "{L}", "[::ffff:127.0.0.2]:{OP}", "localhost:{LP}", "LocalHost:{LP}", "[::1]:{LP}"]
    ),
    st.sampled_from(JOINERS),
    st.sampled_from(["{L}", "{O}", "127.0.0.1:{LP}", "127.0.0.2:{OP}"]),
    st.sampled_from(TAILS),
)
# every piece varied: leading and trailing whitespace, slashes, userinfo, chained authorities
broad = st.builds(
    lambda lead, scheme, slashes, userinfo, host, rest, tail, trail: (
        lead + scheme + ":" + slashes + userinfo + host + "".join(rest) + tail + trail
    ),
    st.sampled_from(["", " ", "\t", "\n", "\x00", "\u3000"]),
    st.sampled_from(["http", "HTTP", "hTtP", "https", "ht\ttp"]),
    st.sampled_from(["//", "/", "///", "\\\\", "/\\", "\\/", "//\t", "/\t/"]),
    st.sampled_from(["", "user@", "user:pw@", "{O}@", "{L}@", "a%40b@", "@"]),
    st.sampled_from(HOSTS),
    st.lists(st.tuples(st.sampled_from(JOINERS), st.sampled_from(HOSTS)).map("".join), max_size=2),
    st.sampled_from(TAILS),
    st.sampled_from(["", " ", "\t", "\n"]),
)
hostile_url = st.one_of(focused, broad)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=hostile_url, redirected=st.booleans())
def test_hunt_the_key_never_leaves_label_studios_origin(
    fetcher, servers, template: str, redirected: bool
) -> None:
    url = expand(template, *servers)
    note(f"url={url!r} redirected={redirected}")
    outcome = fetch_and_check(fetcher, servers, url, redirected)
    note(outcome)
    event("fetched" if outcome == "fetched" else "refused")


# --- the client's own calls follow the same rule ----------------------------------------------
def test_client_decides_with_the_same_parser(fetcher, servers) -> None:
    ls, other = servers
    client = LabelStudioClient(ls.url, KEY)
    for kind, template in KINDS.items():
        if template.startswith("redirect:"):
            continue
        url = expand(template, ls, other)
        with contextlib.suppress(ValueError):  # refused, or the other host (a fragment)
            assert origin(url.strip()) == ("http", other.host, other.port), kind
        assert client.auth_headers_for(url) == {}, kind
        assert not client.is_label_studio_url(url), kind
    assert client.auth_headers_for(f"HTTP://127.0.0.1:{ls.port}/x") == {"Authorization": SENT_KEY}
    assert client.absolute_url("/\\127.0.0.2/x") == "/\\127.0.0.2/x"  # not made absolute
    mark = other.snapshot()
    for kind in ("backslash", "percent-encoded backslash", "userinfo of Label Studio"):
        with pytest.raises(ImageFetchError, match="refused"):
            fetcher.fetch(expand(KINDS[kind], ls, other))
    # files: a Label Studio redirect to a crafted URL is refused, to the other host keyless
    crafted = quote(expand(KINDS["backslash"], ls, other), safe="")
    with pytest.raises(ImageFetchError, match="backslash"):
        fetcher.fetch(f"/redirect?to={crafted}")
    to_other = quote(other.url + "/x.png", safe="")
    assert fetcher.fetch(f"/redirect?to={to_other}") == b"image bytes"
    assert [r.authorization for r in other.since(mark)] == [None]
    # API calls: redirects are followed within Label Studio only
    assert client.request("GET", "/redirect?to=/api/x").status_code == 200
    assert ls.received[-1].path == "/api/x" and ls.received[-1].authorization == SENT_KEY
    with pytest.raises(LabelStudioError, match="outside"):
        client.request("GET", f"/redirect?to={to_other}")
    assert len(other.since(mark)) == 1


def test_token_refresh_never_follows_a_redirect(servers) -> None:
    """A personal access token travels in the body of ``POST /api/token/refresh/``: a 307 would
    make ``requests`` send that body again, to wherever it points."""
    import base64
    import json
    import time

    ls, other = servers
    claims = {"token_type": "refresh", "exp": time.time() + 3600}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    pat = f"e30.{payload}.sig"
    ls.post_redirect = other.url + "/api/token/refresh/"
    mark = other.snapshot()
    client = LabelStudioClient(ls.url, pat)
    with pytest.raises(LabelStudioError, match="redirected"):
        client.auth_header()
    assert other.since(mark) == []


def test_a_reused_connection_never_carries_the_key_to_another_name(servers) -> None:
    """Connections are pooled per (scheme, host, port) as the prepared URL names them, the same
    reading the key is decided on: after Label Studio's keep-alive connection, the same socket
    address under another name gets a connection of its own and no key."""
    from tests.support.sockets import connections

    ls, _ = servers
    f = ImageFetcher(LabelStudioClient(ls.url, KEY), FetchPolicy(allow_hosts=("localhost",)))
    mark = ls.snapshot()
    with connections() as opened:
        f.fetch(ls.url + "/a.png")
        f.fetch(ls.url + "/b.png")  # the same connection, again with the key
        f.fetch(f"http://localhost:{ls.port}/c.png")
    got = ls.since(mark)
    assert [(r.path, r.authorization) for r in got] == [
        ("/a.png", SENT_KEY),
        ("/b.png", SENT_KEY),
        ("/c.png", None),
    ]
    assert len([a for a in opened if a[1] == ls.port]) == 2  # one for each name
    f.close()


# --- smaller holes ----------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_a_slow_resolver_is_an_error_within_the_time_limit(monkeypatch) -> None:
    import time

    real = socket.getaddrinfo

    def slow(name, port, *args, **kwargs):
        if name == "slow.example.test":
            time.sleep(3)
            return real("127.0.0.1", port, *args, **kwargs)
        return real(name, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    fetcher = ImageFetcher(None, FetchPolicy(timeout=1.0))
    t0 = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"cannot resolve host 'slow\.example\.test'"):
        fetcher.fetch("http://slow.example.test/x.png")
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.1.1", "[fe80::1]"])
def test_link_local_needs_an_explicit_allow_entry(address: str) -> None:
    from tests.support.sockets import connections

    for policy in (FetchPolicy(allow_private=True), FetchPolicy(allow_private_storage=True)):
        with connections() as opened, pytest.raises(ImageFetchError, match="link-local"):
            ImageFetcher(None, policy).fetch(f"http://{address}/latest/meta-data/")
        assert opened == []
    host = address.strip("[]")
    allowed = ImageFetcher(None, FetchPolicy(allow_hosts=(host,)))
    assert allowed.http.refusal(host, 80, host) is None


def test_presigned_storage_redirect_to_link_local_is_refused(servers) -> None:
    """``SAM2UNET_ALLOW_PRIVATE_STORAGE`` admits a private or loopback storage host that Label
    Studio's storage endpoint redirects to, never the metadata service's link-local range."""
    from tests.support.sockets import connections

    ls, other = servers
    client = LabelStudioClient(ls.url, KEY)
    fetcher = ImageFetcher(client, FetchPolicy(allow_private_storage=True, timeout=2.0))
    ls.redirects["/tasks/7/resolve/"] = "http://169.254.1.1/bucket/a.png?X-Amz-Signature=s"
    with connections() as opened, pytest.raises(ImageFetchError, match="link-local"):
        fetcher.fetch("s3://bucket/a.png", None, 7)
    assert [a for a in opened if a[0] == "169.254.1.1"] == []
    ls.redirects["/tasks/7/resolve/"] = other.url + "/bucket/a.png?X-Amz-Signature=s"
    assert fetcher.fetch("s3://bucket/a.png", None, 7) == b"image bytes"


def test_label_studio_under_a_path_prefix(servers) -> None:
    ls, other = servers
    client = LabelStudioClient(ls.url + "/ls/", KEY)
    fetcher = ImageFetcher(client, FetchPolicy(allow_private_storage=True, timeout=2.0))
    mark_ls, mark_other = ls.snapshot(), other.snapshot()
    # relative Label Studio URLs, with or without the prefix already, and the storage endpoint
    fetcher.fetch("/data/upload/1/a.png")
    fetcher.fetch("/ls/data/upload/1/b.png")
    ls.redirects["/ls/tasks/7/resolve/"] = other.url + "/bucket/a.png?X-Amz-Signature=s"
    assert fetcher.fetch("s3://bucket/a.png", None, 7) == b"image bytes"
    # an absolute URL on the origin Label Studio names itself by, prefix included
    fetcher.fetch("http://ls.example.test/ls/data/upload/1/c.png", "http://ls.example.test/ls")
    got = [(r.path.split("?")[0], r.authorization) for r in ls.since(mark_ls)]
    assert got == [
        ("/ls/data/upload/1/a.png", SENT_KEY),
        ("/ls/data/upload/1/b.png", SENT_KEY),
        ("/ls/tasks/7/resolve/", SENT_KEY),
        ("/ls/data/upload/1/c.png", SENT_KEY),
    ]
    assert [(r.path, r.authorization) for r in other.since(mark_other)] == [
        ("/bucket/a.png?X-Amz-Signature=s", None)
    ]


def test_a_space_in_the_path_is_sent_encoded_to_the_host_it_names(fetcher, servers) -> None:
    """File names hold spaces: a literal space after the authority cannot move the host (a
    backslash is refused everywhere), so it is fetched, sent as %20, with the key only on
    Label Studio's origin; a space inside the authority is refused."""
    ls, other = servers
    for server, key in ((ls, SENT_KEY), (other, None)):
        mark = server.snapshot()
        assert fetcher.fetch(f"{server.url}/my photo.png?name=a b") == b"image bytes"
        (got,) = server.since(mark)
        assert got.path == "/my%20photo.png?name=a%20b"
        assert got.authorization == key
    for url in (f"http://{other.host} :{other.port}/x.png", f"http://{other.host}:{other.port} /x"):
        with pytest.raises(ImageFetchError, match="host"):
            fetcher.fetch(url)
