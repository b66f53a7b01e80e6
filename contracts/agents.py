"""Train agents' presence in Redis: each running ``sam2unet-assist train-agent`` keeps a key
with a short expiry alive (:func:`announce`) and its name in a set; ``/health``, ``versions``
and the trainer read them (:func:`train_agents`: the set and one MGET, however many other keys
Redis holds). An agent that dies vanishes within :data:`AGENT_TTL` seconds."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

log = logging.getLogger(__name__)

AGENT_PREFIX = "sam2unet:trainer:agent:"
AGENT_NAMES = "sam2unet:trainer:agents"  # set of the names that announced themselves
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
    with connection.pipeline() as pipe:
        pipe.set(AGENT_PREFIX + name, json.dumps(row), ex=AGENT_TTL)
        pipe.sadd(AGENT_NAMES, name)
        pipe.execute()


def withdraw(connection: redis.Redis, name: str) -> None:
    with connection.pipeline() as pipe:
        pipe.delete(AGENT_PREFIX + name)
        pipe.srem(AGENT_NAMES, name)
        pipe.execute()


def train_agents(connection: Any) -> list[dict[str, Any]]:
    """The live train agents, by name: ``{name, state, devices, run_id, at}`` (and ``error``
    while refusing a round). Empty when none runs (or Redis is unreachable)."""
    try:
        names = sorted(n.decode() for n in connection.smembers(AGENT_NAMES))
        raws = connection.mget([AGENT_PREFIX + n for n in names]) if names else []
        gone = [n for n, raw in zip(names, raws, strict=True) if raw is None]
        if gone:  # died without withdrawing: their keys expired
            connection.srem(AGENT_NAMES, *gone)
    except redis.exceptions.RedisError as e:
        log.warning("could not read the train agents: %s", e)
        return []
    rows = []
    for raw in raws:
        if raw is None:
            continue
        try:
            rows.append(json.loads(raw))
        except ValueError:
            continue
    return sorted(rows, key=lambda r: str(r.get("name")))
