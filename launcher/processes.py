"""Child processes of ``up``: one process group per service, liveness checks, and (on Linux) a
SIGTERM to each child when ``up`` itself dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    """One service process; ``proc.pid`` is also its process group id."""

    name: str
    proc: subprocess.Popen[bytes]
    relay: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (a reused id)
        return True
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_redis_server(pid: int) -> bool:
    """Whether ``pid`` is a live redis-server (Linux: read from /proc; elsewhere False)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"redis-server" in cmdline.split(b"\0", 1)[0]


def die_with_parent() -> None:
    """Run in the child before exec: SIGTERM when ``up`` dies (Linux only)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    # ctypes: prctl exists on Linux only
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def death_signal_hook() -> Any:
    """A ``preexec_fn`` that asks for SIGTERM when the parent dies, or None where unsupported."""
    return die_with_parent if _prctl is not None else None
