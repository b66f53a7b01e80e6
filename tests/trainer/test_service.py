"""Trainer scheduling on a real Redis with the captured webhook payloads: webhooks recorded by
the backend become events; bursts coalesce into one round; START_TRAINING starts one at once;
K changes start one; the interval starts one only if something changed; events are
acknowledged only after their round, so a trainer that died mid-round gets them again."""

from __future__ import annotations

import copy
import time

import pytest

from backend.app import create_app
from contracts.events import EVENTS_STREAM
from contracts.settings import Settings
from tests.support.protocol import fixture
from trainer.inbox import GROUP
from trainer.round import RoundReport
from trainer.service import TrainerService


class RecordingTrainer(TrainerService):
    """The real scheduler; the round itself (sync from Label Studio, training) is exercised by
    the loop and end-to-end tests, here it only records that it ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[tuple[int, str]] = []

    def round(self, project: int, reason: str, scheduled: bool = False) -> RoundReport:
        self.rounds.append((project, reason))
        return RoundReport("skipped", "recorded", project, None)


@pytest.fixture
def setup(redis_conn, tmp_path):
    settings = Settings(
        model_dir=tmp_path,
        train_debounce=0.3,
        train_min_new=3,
        train_interval_min=0.02,  # 1.2 s
    )
    client = create_app(settings, redis_conn).test_client()
    trainer = RecordingTrainer(settings, redis_conn, client=None, fetch=None, consumer="t1")
    return settings, client, trainer, redis_conn


def post(client, name: str, **changes):
    body = copy.deepcopy(fixture(name)["json"])
    body.update(changes)
    r = client.post("/webhook", json=body)
    assert r.status_code == 200, r.get_json()
    return r


def settle(trainer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        trainer.poll(block_ms=100)
        trainer.run_due()


def test_burst_of_webhooks_coalesces_into_one_round(setup):
    _, client, trainer, _ = setup
    for _ in range(5):
        post(client, "post_webhook_annotation_created.json")
        post(client, "post_webhook_annotation_updated.json")
    trainer.poll(block_ms=100)
    assert trainer.run_due() == []  # still within the debounce window
    settle(trainer, 1.0)
    assert trainer.rounds == [(1, "10 change(s)")]


def test_start_training_runs_at_once_and_per_project(setup):
    _, client, trainer, _ = setup
    post(client, "post_webhook_start_training.json")
    post(client, "post_webhook_start_training_polygon.json")
    settle(trainer, 0.8)
    assert sorted(trainer.rounds) == [(1, "START_TRAINING"), (2, "START_TRAINING")]


def test_fewer_than_k_changes_wait_for_the_interval(setup):
    _, client, trainer, _ = setup
    post(client, "post_webhook_annotation_created_polygon.json")
    settle(trainer, 0.6)
    assert trainer.rounds == []  # 1 change < K=3, interval not reached
    settle(trainer, 1.5)
    assert trainer.rounds == [(2, "1 change(s)")]
    settle(trainer, 1.5)
    assert len(trainer.rounds) == 1  # nothing changed since: no new round


def test_deletions_count_as_changes(setup):
    _, client, trainer, _ = setup
    for _ in range(3):
        post(client, "post_webhook_annotations_deleted.json")
    settle(trainer, 0.8)
    assert trainer.rounds == [(1, "3 change(s)")]


def test_unacknowledged_events_come_back_to_a_restarted_trainer(setup):
    settings, client, trainer, conn = setup
    post(client, "post_webhook_start_training.json")
    trainer.poll(block_ms=100)  # read, but the trainer "dies" before its round
    assert conn.xpending(EVENTS_STREAM, GROUP)["pending"] == 1
    again = RecordingTrainer(settings, conn, client=None, fetch=None, consumer="t1")
    settle(again, 0.8)
    assert again.rounds == [(1, "START_TRAINING")]
    assert conn.xpending(EVENTS_STREAM, GROUP)["pending"] == 0


def test_webhook_never_carries_labels_into_the_event(setup):
    _, client, _, conn = setup
    post(client, "post_webhook_annotation_created.json")
    ((_, fields),) = conn.xrange(EVENTS_STREAM)
    assert set(fields) == {
        b"action",
        b"project",
        b"annotations",
        b"count",
        b"tasks",
        b"updated_at",
        b"received_at",
    }
    assert b"rle" not in b"".join(fields.values())


def test_redis_losing_the_stream_is_survived_and_triggers_a_resync(setup):
    _, client, trainer, conn = setup
    trainer.poll(block_ms=10)
    conn.flushdb()
    trainer.poll(block_ms=10)  # NOGROUP: recreated, no exception
    assert trainer._last_resync == 0.0
    post(client, "post_webhook_start_training.json")
    settle(trainer, 0.8)
    assert trainer.rounds == [(1, "START_TRAINING")]


def test_a_dead_trainers_pending_events_are_claimed_by_another(setup):
    settings, client, _, conn = setup
    post(client, "post_webhook_start_training.json")
    dead = RecordingTrainer(settings, conn, client=None, fetch=None, consumer="old-host")
    dead.poll(block_ms=100)  # read, then the trainer (and its host) are gone before the round
    assert conn.xpending(EVENTS_STREAM, GROUP)["consumers"][0]["name"] == b"old-host"
    env = {"SAM2UNET_TRAINER_CONSUMER": "new-host", "SAM2UNET_TRAINER_CLAIM_IDLE": "0.5"}
    claim = Settings.from_env(
        env, model_dir=settings.model_dir, train_debounce=0.3, train_min_new=3
    )
    other = RecordingTrainer(claim, conn, client=None, fetch=None)
    assert other.consumer == "new-host"
    settle(other, 0.3)
    assert other.rounds == []  # not idle long enough yet: its owner may still be alive
    settle(other, 1.0)
    assert other.rounds == [(1, "START_TRAINING")]
    assert conn.xpending(EVENTS_STREAM, GROUP)["pending"] == 0


def test_the_consumer_name_is_stable_across_restarts(setup):
    import socket

    settings, client, _, conn = setup
    first = RecordingTrainer(settings, conn, client=None, fetch=None)
    assert first.consumer == socket.gethostname()
    post(client, "post_webhook_start_training.json")
    first.poll(block_ms=100)  # read, then the process dies
    again = RecordingTrainer(settings, conn, client=None, fetch=None)  # restarted, same host
    settle(again, 0.8)
    assert again.rounds == [(1, "START_TRAINING")]
    assert conn.xpending(EVENTS_STREAM, GROUP)["pending"] == 0
