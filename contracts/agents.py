"""Train agents' presence in Redis: each running ``sam2unet-assist train-agent`` keeps a key
with a short expiry alive (:func:`announce`); ``/health``, ``versions`` and the trainer read
them (:func:`train_agents`). An agent that dies vanishes within :data:`AGENT_TTL` seconds."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

log = logging.getLogger(__name__)

AGENT_PREFIX = "sam2unet:trainer:agent:"
AGENT_TTL = 30  # seconds without a heartbeat after which an agent is gone
HEARTBEAT = 10.0  # seconds between an agent's heartbeats


def announce(
    connection: redis.Redis,
    name: str,
    state: str,
    devices: list[str],
    run_id: str = "",
    error: str = "",
) -> None:
    """Record (or refresh) agent ``name``: ``state`` is ``idle``, ``training`` or ``refused``
    (round ``run_id``, for the reason ``error``)."""
    row = {"name": name, "state": state, "devices": devices, "run_id": run_id, "at": time.time()}
    if error:
        row["error"] = error
    connection.set(AGENT_PREFIX + name, json.dumps(row), ex=AGENT_TTL)


def withdraw(connection: redis.Redis, name: str) -> None:
    connection.delete(AGENT_PREFIX + name)


def train_agents(connection: Any) -> list[dict[str, Any]]:
    """The live train agents, by name: ``{name, state, devices, run_id, at}`` (and ``error``
    while refusing a round). Empty when none
    runs (or Redis is unreachable)."""
    try:
        keys = sorted(connection.scan_iter(match=AGENT_PREFIX + "*", count=100))
        raws = connection.mget(keys) if keys else []
    except redis.exceptions.RedisError as e:
        log.warning("could not read the train agents: %s", e)
        return []
    rows = []
    for raw in raws:
        if raw is None:  # expired between the scan and the read
            continue
        try:
            rows.append(json.loads(raw))
        except ValueError:
            continue
    return sorted(rows, key=lambda r: str(r.get("name")))
