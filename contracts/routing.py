"""Routing an image's prompts to the worker that holds its SAM2 features.

Every worker also listens on a queue of its own, ``sam2unet-interactive:<worker name>``, ahead
of the shared ones. A worker that embedded an image for a prompt records, under a key made
from the image's URL (with the project's Label Studio URL), its name with a TTL
(:func:`remember_route`). The backend sends the next interactive request for that image to
that worker's queue when the worker is registered with rq (:func:`routed_queue`); otherwise to
the shared interactive queue. A route is only a hint: the worker's cache is keyed by the
image's content, so a changed image is embedded again.

Prewarming (:func:`prewarm`) follows the same routes: when an annotator opens a task, its image's
features are computed at the lowest priority on the worker that will get its clicks: the
worker holding the image's route when it is alive (its own prewarm queue,
``sam2unet-prewarm:<worker name>``), otherwise any worker (the shared prewarm queue); the worker
that takes it records the route before computing, so the first click follows it there.

A routed job never waits on a worker that cannot take it: :func:`rescue_routed` (run every
second by a waiting request, and by idle workers' maintenance) moves to the shared interactive
queue every job of a worker queue whose worker is gone, and every job that has waited there
longer than ``grace`` seconds (its worker is busy, or was killed and still looks registered).
The move takes the job id off the worker queue with ``LREM`` first, so a job is never run
twice by the move.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime, timezone
from typing import Any

from contracts.jobs import PREWARM_TTL, QUEUE_INTERACTIVE, QUEUE_PREWARM, enqueue_prewarm

log = logging.getLogger(__name__)

ROUTE_PREFIX = "sam2unet:embed-route:"
WORKER_QUEUE_PREFIX = QUEUE_INTERACTIVE + ":"
ROUTE_TTL = 30 * 60  # seconds a route is kept after the image's last prompt
PREWARM_QUEUE_PREFIX = QUEUE_PREWARM + ":"
PREWARM_PENDING_PREFIX = "sam2unet:prewarm-pending:"
LANE_SUFFIX = "~prompts"
ROUTE_GRACE = 2.0  # seconds a routed job may wait for its worker before any worker takes it


def worker_queue(worker_name: str) -> str:
    """The interactive queue of one worker."""
    return WORKER_QUEUE_PREFIX + worker_name


def lane_name(worker_name: str) -> str:
    """The rq name of a worker's prompt lane: a thread of that worker process, not a worker."""
    return worker_name + LANE_SUFFIX


def worker_count(connection: Any) -> int:
    """Live prediction workers (worker processes; their prompt lanes are not counted)."""
    # rq: only where a queue is used; worker.pipeline reads the routes without it
    from rq.worker import Worker

    return sum(1 for key in Worker.all_keys(connection=connection) if not key.endswith(LANE_SUFFIX))


def worker_prewarm_queue(worker_name: str) -> str:
    """The prewarm queue of one worker (served after every other queue)."""
    return PREWARM_QUEUE_PREFIX + worker_name


def route_key(ls_base: str | None, url: str) -> str:
    digest = hashlib.sha256(f"{ls_base or ''}\n{url}".encode()).hexdigest()[:32]
    return ROUTE_PREFIX + digest


def remember_route(
    connection: Any, ls_base: str | None, url: str, worker_name: str, ttl: int = ROUTE_TTL
) -> None:
    """Record that ``worker_name`` holds the features of the image at ``url``."""
    connection.set(route_key(ls_base, url), worker_name, ex=int(ttl))


def routed_worker(connection: Any, ls_base: str | None, url: str) -> str | None:
    """The name of the live worker holding the image's route, or None."""
    raw = connection.get(route_key(ls_base, url))
    if raw is None:
        return None
    name = raw.decode() if isinstance(raw, bytes) else str(raw)
    return name if _worker_alive(connection, name) else None


def prewarm(
    connection: Any, ls_base: str | None, url: str, task_id: int | None, settings: Any
) -> Any:
    """Enqueue the computation of the image's SAM2 features on the worker that will get its
    clicks (see the module docstring); None when a prewarm of the image is already pending
    (one per image per :data:`contracts.jobs.PREWARM_TTL`)."""
    # rq: only where a queue is used; worker.pipeline reads the routes without it
    from rq import Queue

    pending = PREWARM_PENDING_PREFIX + route_key(ls_base, url)[len(ROUTE_PREFIX) :]
    if not connection.set(pending, 1, nx=True, ex=PREWARM_TTL):
        return None
    worker = routed_worker(connection, ls_base, url)
    name = worker_prewarm_queue(worker) if worker is not None else QUEUE_PREWARM
    return enqueue_prewarm(Queue(name, connection=connection), url, ls_base, task_id, settings)


def prewarm_done(connection: Any, ls_base: str | None, url: str) -> None:
    """Clear the image's pending-prewarm mark (its features are computed or cached)."""
    connection.delete(PREWARM_PENDING_PREFIX + route_key(ls_base, url)[len(ROUTE_PREFIX) :])


def _worker_alive(connection: Any, worker_name: str) -> bool:
    # rq: only where a queue is used; worker.pipeline reads the routes without it
    from rq.worker import Worker

    return bool(connection.exists(Worker.redis_worker_namespace_prefix + worker_name))


def routed_queue(connection: Any, ls_base: str | None, url: str) -> str | None:
    """The queue of the live worker holding the image's features, or None."""
    name = routed_worker(connection, ls_base, url)
    return None if name is None else worker_queue(name)


def rescue_routed(connection: Any, grace: float = ROUTE_GRACE) -> list[str]:
    """Move the jobs of worker queues that their worker cannot take (see the module
    docstring) to the shared interactive queue; returns the ids moved."""
    # rq: only where a queue is used; worker.pipeline reads the routes without it
    from rq import Queue
    from rq.registry import StartedJobRegistry

    moved: list[str] = []
    shared = Queue(QUEUE_INTERACTIVE, connection=connection)
    now = time.time()
    for queue in Queue.all(connection=connection):
        if not queue.name.startswith(WORKER_QUEUE_PREFIX):
            continue
        worker = queue.name[len(WORKER_QUEUE_PREFIX) :]
        alive = _worker_alive(connection, worker)
        # jobs whose lease ran out (their worker died) go back to its queue, then on from here
        StartedJobRegistry(queue.name, connection=connection).cleanup()
        for job in queue.get_jobs():
            if job is None:
                continue
            enqueued = _timestamp(job.enqueued_at)
            if alive and now - enqueued < grace:
                continue
            if not connection.lrem(queue.key, 1, job.id):  # its worker took it meanwhile
                continue
            shared.enqueue_job(job, at_front=True)
            moved.append(job.id)
            log.warning(
                "job %s waited for worker %s (%s); moved to the shared interactive queue",
                job.id,
                worker,
                "busy" if alive else "gone",
            )
        if not alive and not queue.count:
            queue.delete(delete_jobs=False)
    return moved


def _timestamp(when: datetime | None) -> float:
    if when is None:
        return 0.0
    if when.tzinfo is None:  # rq stores UTC
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
