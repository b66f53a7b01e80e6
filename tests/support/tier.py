"""The fast tier (``make test-fast``) leaves out tests/system: a test elsewhere that starts
Label Studio or a service process is refused when it starts one, not only by the import check
of tests/test_layout.py."""

from __future__ import annotations

import os

SYSTEM_TESTS = "tests/system/"


def require_system_test(what: str) -> None:
    """Raise when the running pytest test (``PYTEST_CURRENT_TEST``) is not under tests/system.
    Outside pytest (the benchmarks start the same harnesses) nothing is checked."""
    current = os.environ.get("PYTEST_CURRENT_TEST")
    if current and not current.startswith(SYSTEM_TESTS):
        test = current.split(" ")[0]
        raise RuntimeError(
            f"{test} starts {what}: tests that start Label Studio, service processes, a browser "
            f"or multi-process training belong in {SYSTEM_TESTS} (make test-fast leaves it out)"
        )
