"""The trainer's side of the event stream (:mod:`contracts.events`): its consumer group, the
entries it reads, holds for rounds to come, acknowledges, and takes over from dead trainers.

Entries are read as :class:`contracts.events.TrainerEvent` and handed to a ``handle(event_id,
event, now)`` that says whether a round to come holds the event; one that asks for nothing, or
cannot be read at all, is acknowledged at once (an unreadable one is logged). A held event is
acknowledged by :meth:`EventInbox.ack` once its round ended. The consumer name stays the same
across restarts (the host name by default), so a trainer that died gets its unacknowledged
events again when it starts; another trainer takes them over (XAUTOCLAIM) once they were left
idle for ``SAM2UNET_TRAINER_CLAIM_IDLE`` seconds, and a live trainer keeps those it holds fresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from contracts.events import EVENTS_STREAM, TrainerEvent

log = logging.getLogger(__name__)

GROUP = "sam2unet-trainer"

#: ``handle(event_id, event, now)``: whether a round to come now holds the event.
Handler = Callable[[str, TrainerEvent, float], bool]


class EventInbox:
    """One trainer's consumer ``consumer`` of the group :data:`GROUP` on the event stream."""

    def __init__(self, connection: redis.Redis, consumer: str, claim_idle: float) -> None:
        self.redis = connection
        self.consumer = consumer
        self.claim_idle = claim_idle
        self.held: set[str] = set()  # ids of the events rounds to come hold
        self._last_claim = 0.0
        self._recovered = False

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(EVENTS_STREAM, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def take(self, entries: list[Any], handle: Handler) -> None:
        """Hand stream entries to ``handle``; acknowledge at once those that ask for nothing
        (unknown action, no project) or cannot be read."""
        now = time.monotonic()
        for _, messages in entries or []:
            for msg_id, fields in messages or []:
                if msg_id is None:  # deleted from the stream while pending (Redis 6)
                    continue
                mid = _text(msg_id)
                if mid in self.held:
                    continue
                try:
                    held = handle(mid, TrainerEvent.from_fields(fields), now)
                except Exception as e:  # a malformed entry must not stop the trainer
                    log.warning("event %s unreadable (%s); acknowledged and dropped", mid, e)
                    held = False
                if held:
                    self.held.add(mid)
                else:
                    self.ack([mid])

    def ack(self, ids: list[str]) -> None:
        """Acknowledge events. They leave :attr:`held` first: should Redis fail here, they stay
        pending and come back through :meth:`claim_stale`."""
        if not ids:
            return
        self.held.difference_update(ids)
        self.redis.xack(EVENTS_STREAM, GROUP, *ids)

    def touch_held(self) -> None:
        """Reset the idle time of the events this trainer holds (XCLAIM to itself), so that no
        other trainer takes them over while this one lives."""
        held = list(self.held)
        for i in range(0, len(held), 500):
            self.redis.xclaim(
                EVENTS_STREAM, GROUP, self.consumer, 0, held[i : i + 500], justid=True
            )

    def claim_stale(self, handle: Handler) -> int:
        """Take over the events other consumers (a dead trainer, this one's predecessor under
        another name) left unacknowledged for ``claim_idle`` seconds; how many were taken."""
        self.touch_held()
        idle_ms = max(1, int(self.claim_idle * 1000))
        start: Any = "0-0"
        taken = 0
        for _ in range(100):  # at most 10,000 entries per call
            answer = self.redis.xautoclaim(
                EVENTS_STREAM, GROUP, self.consumer, idle_ms, start_id=start, count=100
            )
            start, messages = answer[0], answer[1]
            fresh = [(i, f) for i, f in messages if i is not None and _text(i) not in self.held]
            if fresh:
                log.info("took over %d event(s) left unacknowledged by another trainer", len(fresh))
                taken += len(fresh)
                self.take([(EVENTS_STREAM, fresh)], handle)
            if _text(start) == "0-0":
                break
        return taken

    def poll(self, handle: Handler, block_ms: int = 1000) -> bool:
        """Read new events (and, first, events this consumer got but never acknowledged, and
        those stale elsewhere); False when the stream was gone (Redis lost its data) and is
        recreated: changes may have been missed."""
        if not self._recovered:
            # once per process: what this consumer read before it died without acknowledging
            self.ensure_group()
            self.take(self.redis.xreadgroup(GROUP, self.consumer, {EVENTS_STREAM: "0"}), handle)
            self._recovered = True
        now = time.monotonic()
        if now - self._last_claim >= min(self.claim_idle / 3, 60.0):
            self._last_claim = now
            try:
                self.claim_stale(handle)
            except redis.exceptions.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
        try:
            entries = self.redis.xreadgroup(
                GROUP, self.consumer, {EVENTS_STREAM: ">"}, count=1000, block=block_ms
            )
        except redis.exceptions.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("the event stream is gone (Redis lost its data?); recreating it")
            self.ensure_group()
            return False
        self.take(entries, handle)
        return True


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
