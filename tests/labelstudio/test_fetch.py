"""Guarded image fetching against real HTTP servers on 127.0.0.1.

Only loopback addresses are ever contacted: every refused address in these tests (10.0.0.1,
169.254.169.254, [::1], 224.0.0.1) is refused before any connection is attempted.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from contracts.errors import ImageFetchError
from labelstudio.addresses import address_kind
from labelstudio.client import LabelStudioClient
from labelstudio.fetch import FetchPolicy, ImageFetcher
from labelstudio.urls import redact_url
from tests.support.sockets import LoopbackServer, QuietHandler, connections, rebind

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


def png_bytes(h: int = 24, w: int = 32, seed: int = 0) -> bytes:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width x height`` 8-bit grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


IMAGE = png_bytes()


class Server(LoopbackServer):
    """A threaded HTTP server on 127.0.0.1 answering GETs from a route table; it records each
    request's path and headers."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stop = threading.Event()
        owner = self

        class _Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.requests.append((self.path, dict(self.headers)))
                route = owner.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    route(self)

        super().__init__(_Handler, poll_interval=0.02, block_on_close=False)

    def close(self) -> None:
        self.stop.set()
        super().close()


def body(data: bytes, ctype: str = "image/png", length: int | None = None) -> Handler:
    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data) if length is None else length))
        h.end_headers()
        h.wfile.write(data)
        if length is not None and length != len(data):
            h.close_connection = True

    return handler


def redirect(location: str, code: int = 302) -> Handler:
    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return handler


def unsized(total: int) -> Handler:
    """A body of ``total`` bytes without Content-Length (ends when the connection closes)."""

    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        block = b"\x00" * 65536
        sent = 0
        while sent < total:
            h.wfile.write(block)
            sent += len(block)

    return handler


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server({})
    yield s
    s.close()


@pytest.fixture
def other_server() -> Iterator[Server]:
    s = Server({})
    yield s
    s.close()


def loopback_policy(**kw) -> FetchPolicy:
    return FetchPolicy(allow_hosts=("127.0.0.1",), **kw)


def test_fetches_an_image_from_an_allowed_host(server: Server) -> None:
    server.routes["/img.png"] = body(IMAGE)
    fetcher = ImageFetcher(None, loopback_policy())
    assert fetcher.fetch(server.url + "/img.png") == IMAGE
    img = fetcher.fetch_image(server.url + "/img.png")
    assert img.shape == (24, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, np.asarray(Image.open(io.BytesIO(IMAGE)).convert("RGB")))
    # no credentials without a Label Studio client
    assert all("Authorization" not in headers for _, headers in server.requests)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0"],
)
def test_loopback_is_refused_by_default_before_connecting(server: Server, host: str) -> None:
    server.routes["/img.png"] = body(IMAGE)
    fetcher = ImageFetcher(None, FetchPolicy())
    with pytest.raises(ImageFetchError, match="refused") as e:
        fetcher.fetch(f"http://{host}:{server.port}/img.png")
    assert any(k in e.value.message for k in ("loopback", "unspecified"))
    assert server.requests == []


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://10.0.0.1/x.png", "private"),
        ("http://192.168.1.20:8080/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]/x.png", "loopback"),
        ("http://[fd00::1]/x.png", "private"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://240.0.0.1/x.png", "reserved"),
        ("http://100.64.0.1/x.png", "non-public"),
    ],
)
def test_non_public_addresses_are_refused(url: str, kind: str) -> None:
    with (
        connections() as opened,
        pytest.raises(ImageFetchError, match=rf"host \S+ is a {kind} address"),
    ):
        ImageFetcher(None, FetchPolicy()).fetch(url)
    assert opened == []  # refused without trying to connect


def test_allow_private_admits_private_but_never_multicast_or_unspecified(server: Server) -> None:
    server.routes["/img.png"] = body(IMAGE)
    fetcher = ImageFetcher(None, FetchPolicy(allow_private=True))
    assert fetcher.fetch(server.url + "/img.png") == IMAGE
    for url in ("http://224.0.0.1/x.png", f"http://0.0.0.0:{server.port}/img.png"):
        with pytest.raises(ImageFetchError, match=r"multicast|unspecified"):
            fetcher.fetch(url)


def test_allow_hosts_forms(server: Server, other_server: Server) -> None:
    server.routes["/img.png"] = body(IMAGE)
    other_server.routes["/img.png"] = body(IMAGE)
    # a CIDR admits every loopback port
    by_net = ImageFetcher(None, FetchPolicy(allow_hosts=("127.0.0.0/8",)))
    assert by_net.fetch(server.url + "/img.png") == IMAGE
    assert by_net.fetch(other_server.url + "/img.png") == IMAGE
    # host:port admits that port only
    by_port = ImageFetcher(None, FetchPolicy(allow_hosts=(f"127.0.0.1:{server.port}",)))
    assert by_port.fetch(server.url + "/img.png") == IMAGE
    with pytest.raises(ImageFetchError, match="loopback"):
        by_port.fetch(other_server.url + "/img.png")
    assert len(other_server.requests) == 1  # only by_net's request reached it
    # a host name admits that name, not its address under another name
    by_name = ImageFetcher(None, FetchPolicy(allow_hosts=("localhost",)))
    assert by_name.fetch(f"http://localhost:{server.port}/img.png") == IMAGE
    with pytest.raises(ImageFetchError, match="loopback"):
        by_name.fetch(server.url + "/img.png")


def test_redirect_chain_is_followed_up_to_five_hops(server: Server) -> None:
    server.routes["/img.png"] = body(IMAGE)
    for i in range(1, 7):
        target = "/img.png" if i == 1 else f"/r{i - 1}"
        # alternate relative and absolute Location headers
        server.routes[f"/r{i}"] = redirect(target if i % 2 else server.url + target)
    fetcher = ImageFetcher(None, loopback_policy())
    assert fetcher.fetch(server.url + "/r5") == IMAGE
    n = len(server.requests)
    with pytest.raises(ImageFetchError, match="more than 5 redirects"):
        fetcher.fetch(server.url + "/r6")
    assert len(server.requests) - n == 6  # /img.png never requested


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
        "http://[::1]:{port}/img.png",
        "http://127.0.0.2:{port}/img.png",
    ],
)
def test_redirect_into_a_refused_address_is_refused(server: Server, location: str) -> None:
    server.routes["/img.png"] = body(IMAGE)
    server.routes["/go"] = redirect(location.format(port=server.port))
    fetcher = ImageFetcher(None, loopback_policy())
    # refused by the check before connecting (not by the peer check after connecting)
    with pytest.raises(ImageFetchError, match=r"host \S+ is a [a-z-]+ address .*refused"):
        fetcher.fetch(server.url + "/go")
    assert [p for p, _ in server.requests] == ["/go"]


def test_redirect_to_another_scheme_is_refused(server: Server) -> None:
    server.routes["/go"] = redirect("file:///etc/passwd")
    with pytest.raises(ImageFetchError, match="'file' URL refused"):
        ImageFetcher(None, loopback_policy()).fetch(server.url + "/go")


def test_dns_rebinding_is_caught_at_connect_time(server: Server, monkeypatch) -> None:
    """The name resolves to a public address when checked, to loopback when connecting: the
    connection's peer address is checked again before the request is sent."""
    server.routes["/img.png"] = body(IMAGE)
    calls = rebind(monkeypatch, "images.example.test")
    fetcher = ImageFetcher(None, FetchPolicy())
    with pytest.raises(ImageFetchError, match=r"connected to 127\.0\.0\.1, a loopback address"):
        fetcher.fetch(f"http://images.example.test:{server.port}/img.png")
    assert len(calls) == 2
    assert server.requests == []  # the connection was closed before a byte was sent


@pytest.mark.timeout(60)  # a hang guard: reading the 50 MiB to its end is the bug
def test_oversize_body_is_cut_off(server: Server) -> None:
    big = b"\x00" * 5000
    server.routes["/declared"] = body(big)
    server.routes["/unsized"] = unsized(50 * 1024 * 1024)
    fetcher = ImageFetcher(None, loopback_policy(max_bytes=4096))
    with pytest.raises(ImageFetchError, match="5000 bytes exceeds 4096"):
        fetcher.fetch(server.url + "/declared")
    with pytest.raises(ImageFetchError, match="exceeds 4096 bytes"):
        fetcher.fetch(server.url + "/unsized")  # not read to its end (50 MiB): the cap cuts it
    # exactly at the cap is fine
    server.routes["/exact"] = body(b"\x01" * 4096)
    assert len(fetcher.fetch(server.url + "/exact")) == 4096


@pytest.mark.timeout(60)  # a hang guard: the trickle alone would last 100 s
def test_slow_server_times_out_within_the_budget(server: Server) -> None:
    sent: list[int] = []

    def trickle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):  # one byte every 0.1 s: each read is fast, the whole is not
            if server.stop.wait(0.1):
                return
            h.wfile.write(b"x")
            h.wfile.flush()
            sent.append(1)

    def silent(h: http.server.BaseHTTPRequestHandler) -> None:
        server.stop.wait(30)

    server.routes["/trickle"] = trickle
    server.routes["/silent"] = silent
    fetcher = ImageFetcher(None, loopback_policy(timeout=1.0))
    for path in ("/trickle", "/silent"):
        with pytest.raises(ImageFetchError, match="timed out"):
            fetcher.fetch(server.url + path)
    # the whole fetch had one budget (each byte came well within it): cut off mid-body
    assert len(sent) < 1000


def test_body_cut_short_is_an_error(server: Server) -> None:
    server.routes["/short"] = body(IMAGE[:100], length=len(IMAGE))
    with pytest.raises(ImageFetchError, match="cut short"):
        ImageFetcher(None, loopback_policy()).fetch(server.url + "/short")


def test_http_errors_name_the_url_without_secrets(server: Server) -> None:
    fetcher = ImageFetcher(None, loopback_policy())
    url = f"http://127.0.0.1:{server.port}/missing.png?X-Amz-Signature=s3cr3t&d=a"
    with pytest.raises(ImageFetchError, match="HTTP 404") as e:
        fetcher.fetch(url)
    assert "/missing.png" in e.value.message
    assert "s3cr3t" not in e.value.message and "X-Amz-Signature=..." in e.value.message
    # user info is refused before connecting, and not repeated either
    n = len(server.requests)
    with pytest.raises(ImageFetchError, match=r"user info \(user@\)") as e:
        fetcher.fetch(f"http://user:hunter2@127.0.0.1:{server.port}/missing.png")
    assert "hunter2" not in e.value.message and len(server.requests) == n


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty image"),
        (IMAGE[: len(IMAGE) // 2], "cannot decode"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "cannot decode"),
        (b"<html>login</html>", "cannot decode"),
        (bomb_png(100_000, 100_000), "decompression bomb|exceeds"),
        (bomb_png(10_000, 10_000), "exceeds the 64000000 pixel limit"),
    ],
    ids=["zero-byte", "truncated", "corrupt", "html", "bomb-huge", "bomb-over-limit"],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_image_bytes_are_refused_on_decode(server: Server, data: bytes, match: str) -> None:
    assert len(data) < 10_000
    server.routes["/img"] = body(data)
    fetcher = ImageFetcher(None, loopback_policy())
    assert fetcher.fetch(server.url + "/img") == data  # the bytes arrive
    with pytest.raises(ImageFetchError, match=match) as e:
        fetcher.fetch_image(server.url + "/img")
    assert server.url + "/img" in e.value.message


def test_max_pixels_policy(server: Server) -> None:
    server.routes["/img"] = body(IMAGE)  # 24 x 32 = 768 pixels
    with pytest.raises(ImageFetchError, match="32x24 pixels exceeds the 700 pixel limit"):
        ImageFetcher(None, loopback_policy(max_pixels=700)).fetch_image(server.url + "/img")
    assert ImageFetcher(None, loopback_policy(max_pixels=768)).fetch_image(server.url + "/img").size


def test_data_uris() -> None:
    fetcher = ImageFetcher(None, FetchPolicy(max_bytes=len(IMAGE)))
    b64 = base64.b64encode(IMAGE).decode()
    assert fetcher.fetch("data:image/png;base64," + b64) == IMAGE
    # line-wrapped base64 and no media type
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert fetcher.fetch("data:;base64," + wrapped) == IMAGE
    assert fetcher.fetch_image("data:image/png;base64," + b64).shape == (24, 32, 3)
    bad = {
        "data:image/png;base64,not*base64!": "invalid base64",
        "data:image/png," + b64: "only base64",
        "data:text/html;base64," + b64: "not an image",
        "data:image/png;base64": "no comma",
        "data:image/png;base64,": "empty",
        "data:image/png;base64," + base64.b64encode(IMAGE + b"x" * 64).decode(): "exceeds",
    }
    for uri, match in bad.items():
        with pytest.raises(ImageFetchError, match=match) as e:
            fetcher.fetch(uri)
        assert b64[:40] not in e.value.message  # the data is not echoed
    with pytest.raises(ImageFetchError, match="cannot decode"):
        fetcher.fetch_image("data:image/png;base64," + base64.b64encode(b"garbage").decode())


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("file:///etc/passwd", "'file' scheme is not allowed"),
        ("ftp://example.com/x.png", "'ftp' scheme is not allowed"),
        ("s3://bucket/key.png", "read through Label Studio: set LABEL_STUDIO_URL"),
        ("gs://bucket/key.png", "read through Label Studio: set LABEL_STUDIO_URL"),
        ("azure-blob://container/key.png", "read through Label Studio: set LABEL_STUDIO_URL"),
        ("images/x.png", "not a URL"),
        ("//example.com/x.png", "scheme-relative"),
        ("", "no image URL"),
        ("/data/upload/1/x.png", "LABEL_STUDIO_URL"),
    ],
)
def test_refused_urls(url: str, match: str) -> None:
    with pytest.raises(ImageFetchError, match=match):
        ImageFetcher(None, FetchPolicy()).fetch(url)


def test_relative_urls_use_ls_base_without_a_client(server: Server) -> None:
    server.routes["/data/upload/1/a.png"] = body(IMAGE)
    fetcher = ImageFetcher(None, loopback_policy())
    assert fetcher.fetch("/data/upload/1/a.png", ls_base=server.url + "/") == IMAGE
    # ls_base is not trusted: its host is not allowed unless allow-listed
    with pytest.raises(ImageFetchError, match="loopback"):
        ImageFetcher(None, FetchPolicy()).fetch("/data/upload/1/a.png", ls_base=server.url)


def test_token_goes_only_to_the_label_studio_origin(server: Server, other_server: Server) -> None:
    token = "0123456789abcdef0123456789abcdef01234567"
    other_server.routes["/img.png"] = body(IMAGE)
    server.routes["/data/upload/1/a.png"] = redirect(other_server.url + "/img.png")
    server.routes["/data/upload/1/b.png"] = body(IMAGE)
    client = LabelStudioClient(server.url, token)
    # the Label Studio origin is allowed although loopback; the other server only by its port
    fetcher = ImageFetcher(client, FetchPolicy(allow_hosts=(f"127.0.0.1:{other_server.port}",)))
    assert fetcher.fetch("/data/upload/1/b.png") == IMAGE
    assert fetcher.fetch("/data/upload/1/a.png") == IMAGE
    assert [h.get("Authorization") for _, h in server.requests] == [f"Token {token}"] * 2
    assert [h.get("Authorization") for _, h in other_server.requests] == [None]
    # an absolute URL on the origin Label Studio names itself by is fetched from the client URL
    assert fetcher.fetch("http://ls.example.test/data/upload/1/b.png", "http://ls.example.test")
    assert server.requests[-1][0] == "/data/upload/1/b.png"


def test_local_files_are_read_from_a_local_root(server: Server, tmp_path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x.png").write_bytes(IMAGE)
    (tmp_path / "secret.png").write_bytes(b"secret")
    fetcher = ImageFetcher(None, loopback_policy(local_roots=(str(root),)))
    assert fetcher.fetch("/data/local-files/?d=sub/x.png", ls_base=server.url) == IMAGE
    assert server.requests == []  # read from disk
    # a path escaping the root is not read from disk: it goes to Label Studio (404 here)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetcher.fetch("/data/local-files/?d=../secret.png", ls_base=server.url)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetcher.fetch(f"/data/local-files/?d={tmp_path}/secret.png", ls_base=server.url)
    assert len(server.requests) == 2
    small = ImageFetcher(None, loopback_policy(local_roots=(str(root),), max_bytes=100))
    with pytest.raises(ImageFetchError, match="exceeds 100 bytes"):
        small.fetch("/data/local-files/?d=sub/x.png", ls_base=server.url)


def test_address_kind_table() -> None:
    import ipaddress

    table = {
        "8.8.8.8": None,
        "2001:4860:4860::8888": None,
        "127.0.0.1": "loopback",
        "::1": "loopback",
        "10.1.2.3": "private",
        "172.16.0.1": "private",
        "192.168.0.1": "private",
        "169.254.169.254": "link-local",
        "fe80::1": "link-local",
        "::ffff:10.0.0.1": "private",
        "0.0.0.0": "unspecified",
        "::": "unspecified",
        "224.0.0.251": "multicast",
        "ff02::1": "multicast",
        "255.255.255.255": "reserved",
        "100.64.0.1": "non-public",
    }
    for text, kind in table.items():
        assert address_kind(ipaddress.ip_address(text)) == kind, text


def test_redact_url() -> None:
    assert redact_url("https://u:p@h.example/a.png?token=abc&d=x/y.png") == (
        "https://h.example/a.png?token=...&d=x/y.png"
    )
    assert redact_url("data:image/png;base64," + "A" * 500) == "data:image/png;base64,<522 chars>"
