"""What the trainer tells the other services about its rounds, read by ``/health``,
``/versions`` and ``sam2unet-assist versions``: its state, its last round and the projects whose
rounds fail (each with its failures in a row, the last reason and when it tries again).

The trainer (:mod:`trainer.service`) writes the rounds list and its state hash
(:data:`contracts.metrics.ROUNDS_KEY`, :data:`contracts.metrics.TRAINER_STATUS_KEY`) and the
hash :data:`FAILING_KEY` (project id -> JSON ``{"failures", "reason", "since", "next_try"}``,
times in Unix seconds), whose entry it removes when a round of the project works again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from contracts.metrics import ROUNDS_KEY, TRAINER_STATUS_KEY

log = logging.getLogger(__name__)

FAILING_KEY = "sam2unet:trainer:failing"
#: Failing projects listed at most (those with the most failures in a row first).
MAX_FAILING_LISTED = 20


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def trainer_summary(conn: redis.Redis) -> dict[str, Any]:
    """``{"state", "project", "last_round", "failing"}``; ``last_round`` is None before the
    first round; its ``prompt_masks`` counts the annotations holding smart keypoints/rectangles
    but no mask (``derived``: samples trained on masks derived from them, ``skipped``: not
    used). Empty values when Redis cannot be read."""
    out: dict[str, Any] = {"state": None, "project": None, "last_round": None, "failing": []}
    try:
        with conn.pipeline(transaction=False) as pipe:
            pipe.hgetall(TRAINER_STATUS_KEY)
            pipe.lindex(ROUNDS_KEY, 0)
            pipe.hgetall(FAILING_KEY)
            status, last, failing = pipe.execute()
    except redis.exceptions.RedisError as e:
        log.warning("could not read the trainer's state: %s", e)
        return out
    status = {_text(k): _text(v) for k, v in (status or {}).items()}
    out["state"] = status.get("state") or None
    project = status.get("project", "")
    out["project"] = int(project) if project.isdigit() else None
    if last is not None:
        try:
            r = json.loads(last)
            keys = ("status", "reason", "project", "parent", "candidate", "at", "prompt_masks")
            out["last_round"] = {k: r.get(k) for k in keys}
        except (ValueError, AttributeError):
            log.warning("unreadable last round in %s", ROUNDS_KEY)
    rows = []
    for k, v in (failing or {}).items():
        try:
            row = json.loads(v)
            rows.append({"project": int(_text(k)), **{n: row.get(n) for n in (
                "failures", "reason", "since", "next_try")}})  # fmt: skip
        except (ValueError, AttributeError):
            continue
    rows.sort(key=lambda r: (-(r["failures"] or 0), r["project"]))
    out["failing"] = rows[:MAX_FAILING_LISTED]
    out["failing_projects"] = len(rows)
    return out
