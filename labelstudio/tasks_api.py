"""The task calls of :class:`~labelstudio.client.LabelStudioClient`: tasks one by one and page
by page (``GET /api/tasks``, Label Studio's data manager queries), their annotations, and which
tasks hold a prediction of a model version."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from contracts.errors import LabelStudioError


def holding_version(tasks: list[dict[str, Any]], version: str) -> set[int]:
    """Ids of the tasks (as the task list returns them) that hold a prediction of exactly
    ``version`` (the data manager's version filter matches substrings)."""
    return {
        t["id"]
        for t in tasks
        if isinstance(t.get("id"), int)
        and version
        in {p.get("model_version") for p in t.get("predictions") or [] if isinstance(p, dict)}
    }


class TaskCalls:
    """Mixed into :class:`~labelstudio.client.LabelStudioClient`, whose ``request``, ``_json``
    and ``api_error`` these calls use."""

    def iter_tasks(
        self, project: int, page_size: int = 100, fields: str = "all"
    ) -> Iterator[dict[str, Any]]:
        """All tasks of a project, fetched page by page from ``GET /api/tasks``.

        Label Studio 1.23 answers ``{"tasks": [...], "total": N, "total_annotations": ...,
        "total_predictions": ...}`` and 404 for a page past the end.
        """
        page, seen = 1, 0
        while True:
            params = {"project": int(project), "page": page, "page_size": page_size}
            if fields:
                params["fields"] = fields
            r = self.request("GET", "/api/tasks", params=params, ok=(200, 404))
            if r.status_code == 404:
                if page == 1:
                    raise self.api_error("GET", f"/api/tasks?project={int(project)}", r)
                return
            try:
                body = r.json()
            except ValueError as e:
                raise LabelStudioError("GET /api/tasks: Label Studio answered non-JSON") from e
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            seen += len(tasks)
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks:
                return
            # Label Studio may cap page_size (TASK_API_PAGE_SIZE_MAX): trust "total" when given
            done = seen >= total if isinstance(total, int) else len(tasks) < page_size
            if done:
                return
            page += 1

    def get_task(self, task: int) -> dict[str, Any]:
        """``GET /api/tasks/{id}``."""
        return self._json("GET", f"/api/tasks/{int(task)}")

    def list_annotations(self, task: int) -> list[dict[str, Any]]:
        """``GET /api/tasks/{id}/annotations``."""
        return self._json("GET", f"/api/tasks/{int(task)}/annotations")

    def task_page(
        self,
        project: int,
        page: int,
        page_size: int,
        *,
        include: tuple[str, ...] = (),
        full: bool = False,
        query: dict[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """One page of ``GET /api/tasks``: (tasks, total); ([], total) past the last page.

        ``include`` names the only fields wanted (Label Studio's ``include=``); ``full`` adds
        the annotations and predictions (``fields=all``); ``query`` is a data manager query
        (``filters``, ``selectedItems``, ``ordering``)."""
        params: dict[str, Any] = {"project": int(project), "page": page, "page_size": page_size}
        if full:
            params["fields"] = "all"
        if include:
            params["include"] = ",".join(include)
        if query:
            params["query"] = json.dumps(query)
        r = self.request("GET", "/api/tasks", params=params, ok=(200, 404))
        if r.status_code == 404:
            return [], None
        try:
            body = r.json()
        except ValueError as e:
            raise LabelStudioError("GET /api/tasks: Label Studio answered non-JSON") from e
        if isinstance(body, list):
            return body, None
        total = body.get("total") if isinstance(body, dict) else None
        tasks = body.get("tasks", []) if isinstance(body, dict) else []
        return tasks, total if isinstance(total, int) else None

    def tasks_with_prediction_of(
        self, project: int, version: str, tasks: list[int], page_size: int = 100
    ) -> set[int]:
        """Which of ``tasks`` hold a prediction of exactly ``version``.

        The data manager's model-version filter matches substrings (``v1`` finds ``v10``): it
        narrows the tasks down, their predictions' versions are then compared exactly."""
        wanted = sorted({int(t) for t in tasks})
        held: set[int] = set()
        for start in range(0, len(wanted), page_size):
            chunk = wanted[start : start + page_size]
            query = {
                "filters": {
                    "conjunction": "and",
                    "items": [
                        {
                            "filter": "filter:tasks:predictions_model_versions",
                            "operator": "contains",
                            "type": "List",
                            "value": [version],
                        }
                    ],
                },
                "selectedItems": {"all": False, "included": chunk},
            }
            found, _ = self.task_page(project, 1, len(chunk), full=True, query=query)
            held |= holding_version(found, version)
        return held

    def tasks_with_prediction_between(
        self, project: int, version: str, first: int, last: int, page_size: int = 100
    ) -> set[int]:
        """Which tasks with ids ``first``..``last`` hold a prediction of exactly ``version``:
        one query for the id range (a run's page), narrowed by the data manager's model-version
        filter (substrings: the versions found are compared exactly)."""
        items = [
            {
                "filter": "filter:tasks:id",
                "operator": "greater_or_equal",
                "type": "Number",
                "value": int(first),
            },
            {
                "filter": "filter:tasks:id",
                "operator": "less_or_equal",
                "type": "Number",
                "value": int(last),
            },
            {
                "filter": "filter:tasks:predictions_model_versions",
                "operator": "contains",
                "type": "List",
                "value": [version],
            },
        ]
        query = {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}
        held: set[int] = set()
        page, seen = 1, 0
        while True:
            found, total = self.task_page(project, page, page_size, full=True, query=query)
            seen += len(found)
            held |= holding_version(found, version)
            if not found or len(found) < page_size or seen >= (total or 0):
                return held
            page += 1
