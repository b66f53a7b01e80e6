"""Every test under tests/system is marked ``system``: it starts Label Studio, service processes
(backend, workers, ``up``), a browser or multi-process training. ``make test-fast`` leaves this
folder out; ``make test`` runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.system)
