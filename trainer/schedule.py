"""Scheduled rounds, run by rq's own cron scheduler (``rq.cron``, croniter expressions).

The trainer runs an :class:`rq.cron.CronScheduler` in a thread (its own loop, so that stopping
the trainer stops it; the scheduler's ``start()`` would take over the process's signals). At each
firing it enqueues :func:`fire` on the ``sam2unet-schedule`` queue; the trainer's main loop
performs those jobs between rounds (an rq ``SimpleWorker`` in burst mode), and each one puts a
``SCHEDULED_ROUND`` event on the trainer's event stream. The scheduled round then runs as any
other round: one at a time under the round lock, so a firing during a round waits for it; a
scheduled round whose project has nothing new since its last round is skipped and logged.
"""

from __future__ import annotations

import logging
import threading

import redis
from rq import Queue, SimpleWorker, get_current_job
from rq.cron import CronScheduler

from contracts.events import SCHEDULED_ROUND, TrainerEvent, append
from contracts.schedule import JOB_PREFIX, SCHEDULE_QUEUE, Schedule

log = logging.getLogger(__name__)


def fire(target: str) -> str:
    """The scheduled job: ask the trainer for a round of ``target`` (a project id or ``all``)."""
    job = get_current_job()
    assert job is not None, "fire() runs as an rq job"
    event_id = append(job.connection, TrainerEvent(SCHEDULED_ROUND, str(target)))
    log.info("scheduled round for %s requested (event %s)", target, event_id)
    return event_id


class _InProcessWorker(SimpleWorker):
    """Performs scheduled jobs in the trainer's main loop; leaves the trainer's own signal
    handlers in place."""

    def _install_signal_handlers(self) -> None:
        pass


class ScheduleRunner:
    """rq's cron scheduler for ``schedule``, in a thread of the trainer."""

    def __init__(self, connection: redis.Redis, schedule: Schedule, name: str = "") -> None:
        self.connection = connection
        self.schedule = schedule
        self.queue = Queue(SCHEDULE_QUEUE, connection=connection)
        self.scheduler = CronScheduler(connection=connection, name=name)
        for target, expr in schedule.jobs().items():
            self.scheduler.register(
                fire,
                SCHEDULE_QUEUE,
                args=(target,),
                cron=expr,
                name=JOB_PREFIX + target,
                job_timeout=60,
                result_ttl=24 * 3600,
            )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.schedule:
            return
        self._thread = threading.Thread(target=self._run, name="train-schedule", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        """rq's ``CronScheduler.start`` loop, stoppable: enqueue what is due, save the next
        times (read by ``/health`` and ``versions``), heartbeat, sleep until the next one."""
        sched = self.scheduler
        for target, expr in self.schedule.jobs().items():
            log.info("scheduled rounds for %s: %r", target, expr)
        while not self._stop.is_set():
            try:
                sched.register_birth()
                break
            except redis.exceptions.RedisError as e:
                log.error("training schedule: Redis unavailable (%s); retrying", e)
                self._stop.wait(2)
        try:
            while not self._stop.is_set():
                try:
                    if sched.enqueue_jobs():
                        sched.save()
                    sched.heartbeat()
                except redis.exceptions.RedisError as e:
                    log.error("training schedule: Redis unavailable (%s); retrying", e)
                    self._stop.wait(2)
                    continue
                self._stop.wait(min(sched.calculate_sleep_interval(), 5.0))
        finally:
            try:
                sched.register_death()
            except Exception as e:  # gone with Redis, or never registered
                log.debug("training schedule: %s", e)

    def perform_due(self) -> int:
        """Perform the scheduled jobs waiting on the queue (in this thread); how many."""
        if self.queue.count == 0:
            return 0
        worker = _InProcessWorker([self.queue], connection=self.connection)
        worker.work(burst=True, logging_level="WARNING")
        return 1
