"""The connections this process opens, seen through Python's audit hooks (``socket.connect``
events): tests use it to show that a refused address is never contacted and that a failed call
is not retried, without timing anything."""

from __future__ import annotations

import contextlib
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
