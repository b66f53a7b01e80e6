"""Scheduled rounds with a real Redis and rq's own cron scheduler: a cron expression firing
every two seconds starts one round; later firings with no new labels are skipped; a firing
during a round waits for it and does not start a second one; new labels make the next firing
train again. ``/health`` and ``versions`` show the next scheduled round.

The trainer is the real service (schedule thread, event stream, round lock, real rounds on the
test-size model); only the sync from Label Studio is replaced by a local annotated set that the
test changes (the sync itself is covered by the end-to-end tests).
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from rq.cron import get_cron_job_ids

from backend.app import create_app
from contracts.schedule import JOB_PREFIX, SCHEDULE_QUEUE, parse_schedule, scheduled_rounds
from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from sam2unet.synthetic import generate
from tests.support.services import round_settings
from trainer.service import LOCK_KEY, TrainerService

EVERY_2S = "* * * * * */2"  # croniter: a sixth field is seconds


class LocalTrainer(TrainerService):
    def __init__(self, *args, samples, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samples = samples
        self.hold_until_fired = False
        self.fired_during_round: list[str] = []

    def training_set(self, project):
        revisions = [t for t, _, _ in self.samples]
        digest = hashlib.sha256(json.dumps(revisions).encode()).hexdigest()
        return ["object"], list(self.samples), digest

    def _run_round(self, project, reason, labels, samples):
        if self.hold_until_fired:
            # keep the round (and its lock) until the scheduler has fired again meanwhile
            before = set(get_cron_job_ids(JOB_PREFIX + "1", self.redis))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                new = set(get_cron_job_ids(JOB_PREFIX + "1", self.redis)) - before
                if new:
                    self.fired_during_round = sorted(new)
                    break
                time.sleep(0.1)
            assert self.redis.exists(LOCK_KEY)
        return super()._run_round(project, reason, labels, samples)


def test_cron_syntax():
    s = parse_schedule(" 0 2 * * * ;7=0 * * * 1-5; 12=off ")
    assert s.default == "0 2 * * *"
    assert s.projects == {7: "0 * * * 1-5", 12: None}
    assert s.jobs() == {"all": "0 2 * * *", "7": "0 * * * 1-5"}
    assert s.covers_by_default(3) and not s.covers_by_default(7) and not s.covers_by_default(12)
    assert not parse_schedule("") and not parse_schedule("5=off")
    for bad in ("0 2 * *", "x=0 2 * * *", "off", "0 2 * * *; 1 2 * * *", "3=99 * * * *"):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="invalid SAM2UNET_TRAIN_CRON"):
        TrainerService(Settings.from_env({"SAM2UNET_TRAIN_CRON": "nope"}), None, None, None)


def run_until(trainer, done, timeout: float = 120.0) -> list:
    reports = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(reports):
        reports += trainer.step(block_ms=100)
    assert done(reports), reports
    return reports


def test_scheduled_rounds(redis_conn, model_dir, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    settings = round_settings(
        models,
        train_debounce=0.0,
        train_cron=f"1={EVERY_2S}",
    )
    pool = [(i + 1, img, m) for i, (img, m) in enumerate(generate(10, 64, seed=5))]
    trainer = LocalTrainer(settings, redis_conn, None, None, consumer="t1", samples=pool[:8])
    registry = ModelRegistry(models, redis_conn)
    versions = len(registry.versions())
    trainer.start_schedule()
    try:
        # the first firing trains; the scheduler fires again while that round runs
        trainer.hold_until_fired = True
        first = run_until(trainer, lambda r: len(r) >= 1)
        trainer.hold_until_fired = False
        assert [r.status for r in first] == [first[0].status]
        assert first[0].status in ("promoted", "rejected") and first[0].reason
        assert trainer.fired_during_round  # a firing came while the round held the lock
        assert len(registry.versions()) == versions + 1

        # that firing (and the next ones) find nothing new: skipped, no version written
        skipped = run_until(trainer, lambda r: len(r) >= 2)
        assert {r.status for r in skipped} == {"skipped"}
        assert all("nothing new" in r.reason for r in skipped)
        assert len(registry.versions()) == versions + 1

        # /health and versions show the next scheduled round
        health = create_app(settings, redis_conn).test_client().get("/health").get_json()
        (row,) = health["scheduled_rounds"]
        assert row["project"] == 1 and row["cron"] == EVERY_2S
        assert scheduled_rounds(redis_conn) and redis_conn.llen(SCHEDULE_QUEUE) <= 1

        # new labels: the next firing trains again
        trainer.samples = pool
        again = run_until(trainer, lambda r: any(x.status != "skipped" for x in r))
        assert again[-1].status in ("promoted", "rejected")
        assert len(registry.versions()) == versions + 2
    finally:
        trainer.scheduler.stop()
    assert not redis_conn.exists(LOCK_KEY)
    assert scheduled_rounds(redis_conn) == []  # the stopped scheduler left the registry
