"""Writing predictions to Label Studio through its API, for results that a waiting /predict
request could not return in time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from contracts.errors import AssistError
from contracts.heads import is_untrained
from contracts.jobs import ItemResult, PredictPayload

log = logging.getLogger(__name__)


def make_write_back(ls_client: Any) -> Callable[[PredictPayload, list[ItemResult]], int] | None:
    """A function that stores each successful result as a prediction of its task and returns
    how many it stored (each stored result gets Label Studio's ``prediction_id``), or None when no Label Studio API is configured. The empty answers of a
    version whose automatic head was never trained are not stored."""
    if ls_client is None:
        return None

    def write_back(payload: PredictPayload, results: list[ItemResult]) -> int:
        written = 0
        for r in results:
            if r.error or r.task_id is None or is_untrained(r.model_version):
                continue
            try:
                stored = ls_client.create_prediction(r.task_id, r.result, r.score, r.model_version)
                r.prediction_id = stored.get("id") if isinstance(stored, dict) else None
                written += 1
            except AssistError as e:
                log.error("task %s: could not write the prediction back: %s", r.task_id, e.message)
        return written

    return write_back
