"""The prediction calls of :class:`~labelstudio.client.LabelStudioClient`: one prediction
created, rescored or listed, many imported in one call, and Label Studio's refusal of such an
import."""

from __future__ import annotations

import json
from typing import Any

import requests

from contracts.errors import LabelStudioError


class PredictionsRefused(LabelStudioError):
    """Label Studio refused a bulk prediction import as a whole (HTTP 400): none was stored."""

    status = 400
    code = "predictions_refused"


def refusal_reason(r: requests.Response) -> str:
    """Label Studio's reason for a 400, shortened: its validation errors or its detail."""
    try:
        body = r.json()
    except ValueError:
        return "HTTP 400"
    if isinstance(body, dict):
        detail = body.get("validation_errors") or body.get("detail") or body
    else:
        detail = body
    text = detail if isinstance(detail, str) else json.dumps(detail)
    return text if len(text) <= 300 else text[:297] + "..."


class PredictionCalls:
    """Mixed into :class:`~labelstudio.client.LabelStudioClient`, whose ``request`` and
    ``_json`` these calls use."""

    def create_prediction(
        self,
        task: int,
        result: list[dict[str, Any]],
        score: float | None,
        model_version: str,
    ) -> dict[str, Any]:
        """``POST /api/predictions``; returns the stored prediction."""
        body = {"task": int(task), "result": result, "score": score, "model_version": model_version}
        return self._json("POST", "/api/predictions", json_body=body)

    def update_prediction_score(self, prediction: int, score: float) -> dict[str, Any]:
        """``PATCH /api/predictions/{id}/`` with a new score only."""
        return self._json(
            "PATCH", f"/api/predictions/{int(prediction)}/", json_body={"score": float(score)}
        )

    def list_predictions(self, task: int) -> list[dict[str, Any]]:
        """``GET /api/predictions?task=ID``."""
        return self._json("GET", "/api/predictions", params={"task": int(task)})

    def import_predictions(self, project: int, predictions: list[dict[str, Any]]) -> int:
        """``POST /api/projects/{id}/import/predictions``: many predictions in one call (each
        ``{"task", "result", "score", "model_version"}``); returns how many Label Studio stored.

        Label Studio 1.23 answers ``{"created": N}``, no ids. It checks every item's task id
        before storing any and refuses the whole call (HTTP 400, raised as
        :class:`PredictionsRefused`) when one is not a task of the project; an item whose result
        does not fit the labelling config is left out silently (``created`` is then smaller).
        """
        path = f"/api/projects/{int(project)}/import/predictions"
        r = self.request("POST", path, json_body=predictions, ok=(200, 201, 400))
        if r.status_code == 400:
            raise PredictionsRefused(refusal_reason(r))
        try:
            created = r.json().get("created")
        except (ValueError, AttributeError) as e:
            raise LabelStudioError(f"POST {path}: Label Studio answered non-JSON") from e
        if not isinstance(created, int):
            raise LabelStudioError(f"POST {path}: no count of created predictions")
        return created
