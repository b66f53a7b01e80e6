"""The connections this process opens, seen through Python's audit hooks (``socket.connect``
events): tests use it to show that a refused address is never contacted and that a failed call
is not retried, without timing anything. Also a DNS-rebinding resolver for such tests."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Iterator

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
