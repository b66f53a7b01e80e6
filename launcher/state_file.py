"""``MODEL_DIR/up.json``: the pids of a running ``up``, its embedded Redis and its services,
written once they are all started and removed when ``up`` stops; the next ``up`` of the same
``MODEL_DIR`` reads it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from launcher.processes import alive, is_redis_server

log = logging.getLogger(__name__)

STATE_FILE = "up.json"


def write(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file at ``path`` with ``state`` (atomically)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def check_not_running(path: Path, model_dir: Path) -> None:
    """Refuse to start next to a running `up` of the same MODEL_DIR (the state file at ``path``
    names it); stop the embedded Redis that a killed one left behind (its services died with
    it)."""
    try:
        state = json.loads(path.read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if pid != os.getpid() and alive(pid):
        raise SystemExit(
            f"`up` already runs for MODEL_DIR {model_dir} (pid {pid}); stop it "
            f"first, or remove {path} if that process is not `up`"
        )
    redis_pid = state.get("redis_pid")
    if isinstance(redis_pid, int) and is_redis_server(redis_pid):
        log.warning("a killed `up` (pid %d) left its Redis (pid %d): stopping it", pid, redis_pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(redis_pid):
            raise SystemExit(f"the Redis left by a killed `up` (pid {redis_pid}) does not stop")
