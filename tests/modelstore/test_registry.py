"""The model registry under interleavings of version creation, rounds (start, promote),
rollbacks, restarts and Redis losing its data, on real files and a real Redis: hypothesis looks
for a sequence that leaves the pointer on a missing version, lets a round undo a rollback made
after it started, or makes the promotion log disagree with the pointer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from modelstore.registry import POINTER_KEY, ModelRegistry


@pytest.fixture(scope="module")
def tiny_model():
    """The test-size model (random trunk) to write versions of: (model, config, base)."""
    from contracts.settings import Settings
    from modelstore.bootstrap import ensure_current_version

    d = Path(tempfile.mkdtemp(prefix="registry-model-"))
    try:
        registry = ModelRegistry(d, None)
        first = ensure_current_version(
            registry, Settings(model_size="test", image_size=64, model_dir=d)
        )
        loaded = registry.load(first.name)
        base = registry.base_path(loaded.base.name)
        yield loaded.model, loaded.config, loaded.base, base.read_bytes()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(600)
def test_registry_pointer_under_rounds_rollbacks_and_restarts(redis_url, tiny_model):
    model, config, base, base_bytes = tiny_model

    class Registry(RuleBasedStateMachine):
        rounds = Bundle("rounds")

        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(prefix="registry-"))
            (self.dir / "base").mkdir()
            (self.dir / "base" / base.name).write_bytes(base_bytes)
            self.conn = redis.Redis.from_url(redis_url)
            self.conn.flushdb()
            self.registry = ModelRegistry(self.dir, self.conn)
            self.made: list[str] = []
            self.step = 0
            self.last_operator_move = -1  # step of the last rollback
            self.expected: str | None = None  # the pointer as the rules moved it
            self.flips = 0  # pointer flips (promotions, rollbacks) as the rules made them

        def teardown(self) -> None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.conn.close()

        def _tick(self) -> int:
            self.step += 1
            return self.step

        @initialize()
        def first_version(self) -> None:
            info = self.registry.create_version(model, config, base, source="initial")
            with self.registry.lock():
                self.registry.promote(info.name, reason="initial")
            self.made.append(info.name)
            self.expected, self.flips = info.name, 1

        @rule()
        def create_version(self) -> None:
            info = self.registry.create_version(model, config, base, source="by hand")
            self.made.append(info.name)

        @rule(target=rounds)
        def start_round(self):
            return (self._tick(), self.registry.pointer())

        @rule(started=consumes(rounds))
        def promote(self, started) -> None:
            at, start = started
            info = self.registry.create_version(
                model, config, base, parent=start.version, source="round"
            )
            self.made.append(info.name)
            promoted = self.registry.promote_from(info.name, start)
            if at < self.last_operator_move:
                assert not promoted, f"a round started at step {at} undid a later rollback"
            # a compare-and-set: promoted exactly when nothing moved since the round started
            assert promoted == (start.version == self.expected and start.flips == self.flips)
            if promoted:
                self.expected, self.flips = info.name, self.flips + 1
            else:
                assert info.name in self.registry.superseded()

        @rule(data=st.data())
        def rollback(self, data) -> None:
            name = data.draw(st.sampled_from(self.made))
            self.registry.rollback(name)
            self.expected, self.flips = name, self.flips + 1
            self.last_operator_move = self._tick()

        @rule()
        def restart(self) -> None:
            self.registry = ModelRegistry(self.dir, redis.Redis.from_url(redis_url))

        @rule()
        def redis_loses_the_pointer(self) -> None:
            self.conn.delete(POINTER_KEY)

        @invariant()
        def pointer_is_a_version_on_disk(self) -> None:
            current = self.registry.current()
            assert current == self.expected
            assert current in [v.name for v in self.registry.versions()]
            assert self.registry.model_path(current).is_file()

        @invariant()
        def the_log_replays_to_the_pointer(self) -> None:
            log = self.registry.promotions()
            assert log and log[-1]["version"] == self.registry.current()
            assert ModelRegistry(self.dir, None).current() == self.registry.current()

    run_state_machine_as_test(
        Registry,
        settings=settings(
            max_examples=50,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
