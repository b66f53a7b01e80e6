"""The trainer's event stream (contracts.events) on a real Redis: what the backend and the
schedule append is what the trainer reads back; any entry either reads as an event or is
refused with a ValueError (which the trainer logs and acknowledges), never anything else."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from contracts.events import (
    CHANGE_ACTIONS,
    EVENTS_STREAM,
    MAX_CHANGES,
    SCHEDULED_ROUND,
    TRAINER_ACTIONS,
    TrainerEvent,
    append,
)

NAMES = ("action", "project", "annotations", "count", "tasks", "updated_at", "received_at")
ids = st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=5).map(tuple)
events = st.builds(
    TrainerEvent,
    action=st.text(min_size=1, max_size=30),
    project=st.one_of(st.just(""), st.just("all"), st.integers(0, 2**64).map(str), st.text()),
    annotations=ids,
    count=st.none() | st.integers(min_value=0, max_value=2**70),
    tasks=ids,
    updated_at=st.text(max_size=64),
    received_at=st.floats(allow_nan=False, allow_infinity=False),
)
# values as they come back from Redis (bytes), as a test or another writer may pass them
# (text), and the shapes the fields hold (JSON lists, numbers, garbage)
values = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers() | st.text(max_size=3) | st.none(), max_size=3).map(json.dumps),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(sorted(TRAINER_ACTIONS | {SCHEDULED_ROUND})),
)
field_dicts = st.dictionaries(
    st.sampled_from(NAMES) | st.text(max_size=8) | st.binary(max_size=8), values, max_size=9
)


@given(fields=field_dicts | st.none() | st.integers() | st.lists(st.text()))
def test_any_entry_is_an_event_or_a_clear_value_error(fields) -> None:
    try:
        event = TrainerEvent.from_fields(fields)
    except ValueError as e:
        assert str(e), "the error names what is wrong"
        return
    note(repr(event))
    assert event.action
    assert 1 <= event.changes <= MAX_CHANGES
    assert event.project_id is None or str(event.project_id) == event.project
    assert TrainerEvent.from_fields(event.to_fields()) == event


@given(event=events)
def test_an_event_reads_back_as_itself(event: TrainerEvent) -> None:
    assert TrainerEvent.from_fields(event.to_fields()) == event


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(event=events)
def test_an_event_appended_to_redis_reads_back_as_itself(redis_conn, event) -> None:
    event_id = append(redis_conn, event)
    ((read_id, fields),) = redis_conn.xrange(EVENTS_STREAM, event_id, event_id)
    assert read_id.decode() == event_id
    assert TrainerEvent.from_fields(fields) == event


def test_entries_written_before_the_event_type_still_read() -> None:
    """The fields the backend and the schedule wrote by hand: a webhook's seven, a scheduled
    round's three."""
    webhook = {
        b"action": b"ANNOTATION_CREATED",
        b"project": b"7",
        b"annotations": b"[1, 2]",
        b"count": b"3",
        b"tasks": b"[4]",
        b"updated_at": b"2025-01-01T10:00:00Z",
        b"received_at": b"1700000000.125",
    }
    assert TrainerEvent.from_fields(webhook) == TrainerEvent(
        "ANNOTATION_CREATED", "7", (1, 2), 3, (4,), "2025-01-01T10:00:00Z", 1700000000.125
    )
    scheduled = {b"action": b"SCHEDULED_ROUND", b"project": b"all", b"received_at": b"17.5"}
    event = TrainerEvent.from_fields(scheduled)
    assert (event.action, event.project, event.project_id) == (SCHEDULED_ROUND, "all", None)


def test_changes_count_the_recorded_count_else_the_ids() -> None:
    action = sorted(CHANGE_ACTIONS)[0]
    assert TrainerEvent(action, "1", annotations=(1, 2), count=250).changes == 250
    assert TrainerEvent(action, "1", annotations=(1, 2)).changes == 2
    assert TrainerEvent(action, "1").changes == 1
    assert TrainerEvent(action, "1", count=0).changes == 1
    assert TrainerEvent(action, "1", count=10**9).changes == MAX_CHANGES


def test_unreadable_fields_name_the_field() -> None:
    for fields, word in (
        (None, "no fields"),
        ({"project": "1"}, "no action"),
        ({"action": "START_TRAINING", "annotations": "[1,"}, "annotations"),
        ({"action": "START_TRAINING", "tasks": '["a"]'}, "tasks"),
        ({"action": "START_TRAINING", "count": "-1"}, "count"),
        ({"action": "START_TRAINING", "received_at": "nan"}, "received_at"),
    ):
        try:
            TrainerEvent.from_fields(fields)
        except ValueError as e:
            assert word in str(e), (fields, e)
        else:
            raise AssertionError(f"{fields!r} read as an event")
