"""The worker's log: rq's maintenance lines (registry cleaning, every maintenance interval)
are at DEBUG, so an idle worker writes nothing at INFO."""

from __future__ import annotations

import logging

from rq import Queue

from contracts.jobs import QUEUES
from worker.process import AssistWorker


def _maintenance_records(caplog, redis_conn, level: int) -> list[logging.LogRecord]:
    worker = AssistWorker(
        [Queue(q, connection=redis_conn) for q in QUEUES], connection=redis_conn, name="quiet"
    )
    caplog.clear()
    with caplog.at_level(level):
        worker.clean_registries()
        worker.clean_group_registries()
    return [r for r in caplog.records if "cleaning" in r.getMessage()]


def test_registry_cleaning_is_not_logged_at_info(caplog, redis_conn):
    records = _maintenance_records(caplog, redis_conn, logging.INFO)
    assert records == [], [f"{r.levelname} {r.getMessage()}" for r in records]


def test_registry_cleaning_is_logged_at_debug(caplog, redis_conn):
    logging.getLogger("rq.worker").setLevel(logging.DEBUG)
    try:
        records = _maintenance_records(caplog, redis_conn, logging.DEBUG)
    finally:
        logging.getLogger("rq.worker").setLevel(logging.INFO)
    assert len(records) == len(QUEUES) + 1
    assert {r.levelno for r in records} == {logging.DEBUG}


def test_other_rq_lines_keep_their_level(caplog, redis_conn):
    AssistWorker([Queue(QUEUES[0], connection=redis_conn)], connection=redis_conn, name="q2")
    with caplog.at_level(logging.INFO):
        logging.getLogger("rq.worker").info("Worker x: started with PID 1")
    assert [r.levelno for r in caplog.records if "started" in r.getMessage()] == [logging.INFO]
