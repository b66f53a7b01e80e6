"""The backend's /health warnings reach the log once per state change, not once per poll:
Label Studio and operators poll /health every few seconds, from several gunicorn threads (and
processes, and backend replicas, all sharing one Redis)."""

from __future__ import annotations

import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from contracts.settings import Settings
from modelstore.registry import ModelRegistry

NEVER_TRAINED = "was never trained"


def _records(caplog, text: str, level: int) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "backend.protocol" and r.levelno == level and text in r.getMessage()
    ]


def test_untrained_warning_logged_once_per_state_change(model_dir, redis_url, tmp_path, caplog):
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)  # v1 (random trunk, decoder never trained), v2 trained
    conn = redis.Redis.from_url(redis_url)
    registry = ModelRegistry(models, conn)
    trained = registry.current()
    (untrained,) = [v.name for v in registry.versions() if v.name != trained]
    app = create_app(Settings(model_dir=models, redis_url=redis_url), conn)
    caplog.set_level(logging.INFO, logger="backend.protocol")

    def poll_many(n: int) -> None:
        """``n`` polls from 8 threads at once, each thread with its own client."""
        local = threading.local()

        def poll(_: int) -> None:
            if not hasattr(local, "client"):
                local.client = app.test_client()
            r = local.client.get("/health")
            assert r.status_code == 200

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(poll, range(n)))

    registry.promote(untrained, reason="rollback")
    poll_many(40)
    assert any(NEVER_TRAINED in w for w in app.test_client().get("/health").json["warnings"])
    assert len(_records(caplog, NEVER_TRAINED, logging.WARNING)) == 1

    registry.promote(trained)
    poll_many(20)
    assert len(_records(caplog, NEVER_TRAINED, logging.WARNING)) == 1
    cleared = _records(caplog, NEVER_TRAINED, logging.INFO)
    assert len(cleared) == 1 and "no longer" in cleared[0].getMessage()

    registry.promote(untrained, reason="rollback")  # entered again: logged again, once
    poll_many(20)
    assert len(_records(caplog, NEVER_TRAINED, logging.WARNING)) == 2


WARNINGS = ["a", "b", "c"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(polls=st.lists(st.sets(st.sampled_from(WARNINGS)), max_size=12))
def test_each_warning_logged_when_it_appears_and_when_it_goes(redis_url, polls, caplog):
    """Any sequence of polls: a warning is logged exactly when it appears (absent in the
    previous poll, present now), and an INFO line exactly when it goes."""
    from backend.protocol import log_health_changes

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="backend.protocol")
    for warnings in polls:
        log_health_changes(conn, sorted(warnings))
    previous: set[str] = set()
    appeared = dict.fromkeys(WARNINGS, 0)
    went = dict.fromkeys(WARNINGS, 0)
    for warnings in polls:
        for w in warnings - previous:
            appeared[w] += 1
        for w in previous - warnings:
            went[w] += 1
        previous = warnings
    for w in WARNINGS:
        logged = [r for r in caplog.records if r.name == "backend.protocol"]
        assert (
            sum(r.levelno == logging.WARNING and r.getMessage() == f"health: {w}" for r in logged)
            == appeared[w]
        ), (polls, w)
        assert (
            sum(
                r.levelno == logging.INFO and r.getMessage() == f"health: no longer: {w}"
                for r in logged
            )
            == went[w]
        ), (polls, w)
