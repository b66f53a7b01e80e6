"""The connections this process opens, seen through Python's audit hooks (``socket.connect``
events): tests use it to show that a refused address is never contacted and that a failed call
is not retried, without timing anything. Also a DNS-rebinding resolver for such tests, the
loopback HTTP servers the tests run (``LoopbackServer`` with a ``QuietHandler``), and one that
records who sent it what (``RecordingServer``)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

_lock = threading.Lock()
_listeners: list[list[tuple]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect" and _listeners:
        address = args[1]
        with _lock:
            for seen in _listeners:
                seen.append(tuple(address) if isinstance(address, tuple) else (address,))


sys.addaudithook(_audit)  # audit hooks stay for the life of the process: this one is idle


@contextlib.contextmanager
def connections() -> Iterator[list[tuple]]:
    """Record the address of every ``socket.connect`` of this process (any thread) while the
    block runs, as ``(host, port, ...)`` tuples."""
    seen: list[tuple] = []
    with _lock:
        _listeners.append(seen)
    try:
        yield seen
    finally:
        with _lock:
            _listeners.remove(seen)


def rebind(monkeypatch, host: str, public: str = "93.184.216.34") -> list[str]:
    """Make ``host`` resolve to the ``public`` address on its first lookup and to loopback on
    every later one (a DNS-rebinding attack); other names resolve as usual. Returns the list
    of ``host``'s lookups, which grows as they happen."""
    real = socket.getaddrinfo
    calls: list[str] = []

    def rebinding(name, port, *args, **kwargs):
        if name == host:
            calls.append(name)
            return real(public if len(calls) == 1 else "127.0.0.1", port, *args, **kwargs)
        return real(name, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    return calls


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs nothing; :meth:`send_body` answers with a whole body."""

    def log_message(self, *args: object) -> None:
        pass

    def send_body(self, data: bytes, content_type: str = "image/png", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LoopbackServer:
    """``handler`` behind a threaded HTTP server on ``host`` (a loopback address, a free port),
    serving from a daemon thread that looks for a shutdown every ``poll_interval`` seconds:
    ``url``, ``authority`` and ``port`` say where; :meth:`close` (or leaving a ``with``) stops
    it, waiting for requests in flight unless ``block_on_close`` is False."""

    def __init__(
        self,
        handler: type[http.server.BaseHTTPRequestHandler],
        host: str = "127.0.0.1",
        poll_interval: float = 0.5,
        block_on_close: bool = True,
    ) -> None:
        self.httpd = http.server.ThreadingHTTPServer((host, 0), handler)
        self.httpd.block_on_close = block_on_close
        self.host = host
        self.port = self.httpd.server_address[1]
        self.authority = f"{host}:{self.port}"
        self.url = f"http://{self.authority}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Received:
    """One request a RecordingServer received."""

    path: str
    host_header: str | None
    authorization: str | None


class RecordingServer(LoopbackServer):
    """A threaded HTTP/1.1 server on ``host`` (any loopback address) that records every request
    (path, ``Host`` and ``Authorization`` headers) in ``received``.

    ``GET /redirect?to=<location>`` answers 302 with ``Location`` set to the query value
    percent-decoded once and sent as raw UTF-8 (400 if it holds a line break), so tests can
    send crafted locations; a path in ``redirects`` (query left out) answers 303 to its value;
    every other GET answers 200 with ``body``. Any POST answers 307 to ``post_redirect``.
    """

    def __init__(self, host: str = "127.0.0.1", body: bytes = b"image bytes") -> None:
        self.received: list[Received] = []
        self.redirects: dict[str, str] = {}
        self.post_redirect = "/"
        self._lock = threading.Lock()
        owner = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                from urllib.parse import unquote

                with owner._lock:
                    owner.received.append(
                        Received(
                            self.path, self.headers.get("Host"), self.headers.get("Authorization")
                        )
                    )
                path, _, query = self.path.partition("?")
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    location = unquote(query[3:]) if query.startswith("to=") else ""
                    if path == "/redirect" and ("\r" in location or "\n" in location):
                        self.send_error(400)  # it would end the header
                        return
                    if path in owner.redirects:
                        self.send_response(303)
                        self.send_header("Location", owner.redirects[path])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if path == "/redirect":
                        self.send_response(302)
                        # raw UTF-8 bytes, as a hostile server may send them
                        self.send_header("Location", location.encode().decode("latin-1"))
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_body(body)

            def do_POST(self) -> None:
                with owner._lock:
                    owner.received.append(
                        Received(
                            self.path, self.headers.get("Host"), self.headers.get("Authorization")
                        )
                    )
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(307)
                self.send_header("Location", owner.post_redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler, host, poll_interval=0.05, block_on_close=False)

    def snapshot(self) -> int:
        with self._lock:
            return len(self.received)

    def since(self, mark: int) -> list[Received]:
        with self._lock:
            return list(self.received[mark:])
