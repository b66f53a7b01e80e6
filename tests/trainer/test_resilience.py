"""A trainer that never dies of a round: the real TrainerService on a real Redis, its events
recorded by the real backend, its Label Studio client talking to a port where nothing listens
(Label Studio down). Every failed sync becomes a ``failed`` round with its reason (rounds list,
metrics, /health, /versions), its events are acknowledged, the round lock is free, retries back
off per project, and malformed stream entries are acknowledged and logged."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from backend.app import create_app
from contracts.events import EVENTS_STREAM
from contracts.metrics import ROUNDS, ROUNDS_KEY, TRAINER_STATUS_KEY
from contracts.settings import Settings
from labelstudio.client import LabelStudioClient
from launcher.redis_server import free_port
from tests.support.services import ROOT, service_env
from trainer.inbox import GROUP
from trainer.service import LOCK_KEY, TrainerService


def down_client() -> LabelStudioClient:
    """A Label Studio client for a port where nothing listens."""
    return LabelStudioClient(f"http://127.0.0.1:{free_port()}", "a" * 40)


def make_trainer(conn, tmp_path, env: dict[str, str] | None = None, **overrides):
    settings = Settings.from_env(
        env or {}, model_dir=tmp_path, train_debounce=0.0, train_min_new=1, **overrides
    )
    trainer = TrainerService(settings, conn, down_client(), fetch=None, consumer="t1")
    return settings, trainer


def steps(trainer, seconds: float, until=None) -> list:
    """Run the trainer's main loop turn by turn (as run_forever does) for ``seconds`` or until
    ``until()``; the rounds it ran, with the time each ended."""
    reports = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for r in trainer.step(block_ms=20):
            reports.append((time.monotonic(), r))
        if until is not None and until():
            break
    return reports


def pending(conn) -> int:
    return conn.xpending(EVENTS_STREAM, GROUP)["pending"]


def test_label_studio_down_fails_the_round_and_the_trainer_goes_on(redis_conn, tmp_path):
    settings, trainer = make_trainer(redis_conn, tmp_path)
    app = create_app(settings, redis_conn).test_client()
    for body in (
        {"action": "START_TRAINING", "project": {"id": 999999}},
        {"action": "ANNOTATION_CREATED", "project": {"id": 5}, "annotation": {"id": 3}},
    ):
        assert app.post("/webhook", json=body).status_code == 200
    reports = [r for _, r in steps(trainer, 15, until=lambda: pending(redis_conn) == 0)]
    assert sorted((r.project, r.status) for r in reports) == [(5, "failed"), (999999, "failed")]
    assert all("Label Studio unreachable" in r.reason for r in reports)
    assert pending(redis_conn) == 0
    assert not redis_conn.exists(LOCK_KEY)
    recorded = [json.loads(x) for x in redis_conn.lrange(ROUNDS_KEY, 0, -1)]
    assert sorted(r["project"] for r in recorded) == [5, 999999]
    assert all(r["status"] == "failed" and "unreachable" in r["reason"] for r in recorded)
    assert redis_conn.hget(ROUNDS.key, json.dumps(["failed"])) == b"2"
    assert redis_conn.hget(TRAINER_STATUS_KEY, "state") == b"idle"
    health = app.get("/health").get_json()
    last = health["trainer"]["last_round"]
    assert last["status"] == "failed" and "unreachable" in last["reason"]
    failing = {f["project"]: f for f in health["trainer"]["failing"]}
    assert set(failing) == {5, 999999} and failing[5]["failures"] == 1
    versions = app.get("/versions").get_json()
    assert versions["trainer"]["last_round"]["status"] == "failed"
    metrics = app.get("/metrics").get_data(as_text=True)
    assert 'sam2unet_training_rounds_total{status="failed"} 2.0' in metrics
    url = redis_conn.connection_pool.connection_kwargs
    env = service_env(f"redis://{url['host']}:{url['port']}/{url['db']}", tmp_path)
    out = subprocess.run([sys.executable, "-m", "cli", "versions"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "failing rounds: project 5, 1 in a row: Label Studio unreachable" in out.stdout


def test_failed_rounds_back_off_per_project_and_log_once(redis_conn, tmp_path, caplog):
    env = {"SAM2UNET_TRAIN_BACKOFF": "0.4", "SAM2UNET_TRAIN_BACKOFF_MAX": "1.0"}
    settings, trainer = make_trainer(redis_conn, tmp_path, env)
    app = create_app(settings, redis_conn).test_client()
    caplog.set_level(logging.DEBUG, logger="trainer")
    assert app.post("/webhook", json={"action": "START_TRAINING", "project": 7}).status_code == 200
    t0 = time.monotonic()
    rounds = steps(trainer, 4.2)
    ends = [t for t, r in rounds if r.project == 7]
    assert all(r.status == "failed" for _, r in rounds)
    gaps = [b - a for a, b in zip([t0, *ends], ends, strict=False)]
    # at once, then after 0.4 s, 0.8 s, then 1 s (the cap) each
    assert 4 <= len(ends) <= 6, gaps
    for gap, want in zip(gaps[1:], (0.4, 0.8, 1.0, 1.0), strict=False):
        assert want <= gap < want + 0.4, gaps
    # a webhook during the back-off is acknowledged at once and brings no round forward
    assert app.post("/webhook", json={"action": "START_TRAINING", "project": 7}).status_code == 200
    trainer.poll(block_ms=20)
    assert pending(redis_conn) == 0
    assert trainer.projects[7].forced and trainer.projects[7].retry_at > time.monotonic()
    failing = [r for r in caplog.records if "rounds of project 7 fail" in r.getMessage()]
    assert len(failing) == 1 and failing[0].levelno == logging.WARNING
    assert not redis_conn.exists(LOCK_KEY)


entry_fields = st.dictionaries(
    st.one_of(
        st.sampled_from([b"action", b"project", b"annotations", b"count", b"tasks"]),
        st.binary(min_size=1, max_size=8),
    ),
    st.one_of(
        st.sampled_from(
            [b"START_TRAINING", b"ANNOTATION_CREATED", b"ANNOTATIONS_DELETED", b"SCHEDULED_ROUND"]
        ),
        st.sampled_from([b"all", b"12", b"", b"-3", b"\xb2", b"1e3", b"[1]", b"{", b"5"]),
        st.binary(max_size=12),
        st.integers(min_value=-(2**70), max_value=2**70).map(lambda i: str(i).encode()),
    ),
    min_size=1,
    max_size=5,
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=entry_fields)
def test_malformed_stream_entries_never_stop_the_trainer(redis_conn, tmp_path, fields):
    """Whatever an entry holds, the trainer's turn ends normally; an entry it cannot act on is
    acknowledged at once, and what stays pending is only what it holds for a round to come."""
    note(f"entry {fields!r}")
    env = {"SAM2UNET_TRAIN_BACKOFF": "30", "SAM2UNET_TRAIN_BACKOFF_MAX": "30"}
    _, trainer = make_trainer(redis_conn, tmp_path, env)
    redis_conn.delete(EVENTS_STREAM)
    entry = redis_conn.xadd(EVENTS_STREAM, fields).decode()
    for _ in range(3):
        trainer.step(block_ms=10)
    held = trainer.held_events()
    left = {
        p["message_id"].decode()
        for p in redis_conn.xpending_range(EVENTS_STREAM, GROUP, "-", "+", 10)
    }
    assert left <= held
    project = fields.get(b"project", b"")
    if not (project.isdigit() or project == b"all"):
        assert entry not in left


def test_an_unexpected_error_in_a_round_is_a_failed_round(redis_conn, tmp_path):
    settings, trainer = make_trainer(redis_conn, tmp_path)
    app = create_app(settings, redis_conn).test_client()
    trainer.client = None  # the sync raises AttributeError
    assert app.post("/webhook", json={"action": "START_TRAINING", "project": 8}).status_code == 200
    reports = [r for _, r in steps(trainer, 10, until=lambda: pending(redis_conn) == 0)]
    assert [r.status for r in reports] == ["failed"]
    assert "AttributeError" in reports[0].reason
    assert pending(redis_conn) == 0 and not redis_conn.exists(LOCK_KEY)
