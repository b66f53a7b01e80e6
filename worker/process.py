"""The worker process: an rq SimpleWorker (one model per process, no fork after CUDA is
initialised) that holds a short lease on the job it runs, so that a killed worker's job is
retried on another worker within seconds instead of rq's default of many minutes."""

from __future__ import annotations

import contextlib
import importlib
import logging
import socket
import threading
import time
import uuid

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.scheduler import RQScheduler
from rq.timeouts import TimerDeathPenalty

from contracts.jobs import QUEUE_PREWARM, QUEUES
from contracts.routing import lane_name, rescue_routed, worker_prewarm_queue, worker_queue
from contracts.settings import Settings
from labelstudio.client import LabelStudioClient
from labelstudio.fetch import FetchPolicy, ImageFetcher
from labelstudio.writeback import make_write_back
from modelstore.registry import ModelRegistry
from modelstore.threads import apply_torch_threads
from worker.runtime import ModelRuntime, WorkerContext, install_context, set_mmap_threshold

log = logging.getLogger(__name__)


class RqMaintenanceFilter(logging.Filter):
    """rq's maintenance lines (``cleaning registries for queue``, ``cleaning group
    registries``: one per queue every maintenance interval) demoted to DEBUG: shown only when
    the ``rq.worker`` logger is at DEBUG. Other rq lines keep their level."""

    MESSAGES = ("cleaning registries", "cleaning group registries")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not isinstance(record.msg, str):
            return True
        if not any(m in record.msg for m in self.MESSAGES):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_rq_maintenance() -> None:
    """Install :class:`RqMaintenanceFilter` on rq's worker logger (once)."""
    logger = logging.getLogger("rq.worker")
    if not any(isinstance(f, RqMaintenanceFilter) for f in logger.filters):
        logger.addFilter(RqMaintenanceFilter())


class AssistWorker(SimpleWorker):
    """SimpleWorker with a lease: while a job runs, a thread renews the job's entry in the
    started-job registry three times within ``lease - 1`` seconds with a TTL of ``lease``
    (at least :data:`MIN_LEASE`). If the process dies, the entry expires after at most
    ``lease`` seconds and the next registry cleanup (run by idle workers every ``lease``
    seconds and by waiting backend requests) retries the job.

    Before each job, the model runtime reloads the registry's current version if it moved;
    the job is claimed (leased, marked started) before that reload, so that nobody takes it for
    a lost job while the model loads.
    """

    lease: int = 15
    runtime: ModelRuntime | None = None
    stopping: bool = False  # a stop was requested (SIGTERM/SIGINT)
    _last_beat: float = float("-inf")  # monotonic time of the last heartbeat of our own
    _due: RQScheduler | None = None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        quiet_rq_maintenance()

    def request_stop(self, signum, frame) -> None:
        self.stopping = True
        super().request_stop(signum, frame)

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        self.enqueue_due_retries()
        try:  # prompts routed to a worker that is gone or busy
            rescue_routed(self.connection)
        except redis.exceptions.RedisError as e:
            log.warning("could not check the workers' own queues: %s", e)

    def enqueue_due_retries(self) -> None:
        """Move scheduled jobs whose time has come (retries with an interval, such as those of
        pre-annotation pages) to their queues. rq's own scheduler would do it in a forked
        process, which a worker holding a model must not start."""
        if self._due is None:  # one instance: each holds its own connection pool
            self._due = RQScheduler(
                self.queues,
                connection=self.connection,
                name=f"{self.name}-due",
                logging_level=logging.WARNING,  # not a line per maintenance
            )
        scheduler = self._due
        try:
            if scheduler.acquire_locks():  # one worker at a time
                scheduler.enqueue_scheduled_jobs()
        except redis.exceptions.RedisError as e:
            log.warning("could not enqueue due retries: %s", e)
        finally:
            with contextlib.suppress(redis.exceptions.RedisError):
                scheduler.release_locks()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return max(MIN_LEASE, self.lease)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:  # type: ignore[no-untyped-def]
        """rq's worker heartbeat (extend the worker's key TTL), sent as one pipeline instead of
        three round trips, and skipped when the last one is under a second old: rq's loop
        beats three times between two jobs. Beats inside a caller's pipeline are unchanged."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        if timeout is None and time.monotonic() - self._last_beat < HEARTBEAT_MIN_INTERVAL:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipeline=pipe)
            pipe.execute()
        self._last_beat = time.monotonic()

    def execute_job(self, job: Job, queue: Queue) -> None:
        # rq's SimpleWorker.execute_job, with the model check before and the lease around the
        # job (the idle state is set by rq's dequeue that follows)
        if job.get_status(refresh=False) == JobStatus.FINISHED:
            # a copy requeued by a registry cleanup while the job still ran (its lease was not
            # renewed in time: a stalled process); the job has finished since: never twice
            log.warning("job %s has already finished; its requeued copy is not run", job.id)
            if len(self.queues) == 1:  # rq moved it to the queue's intermediate list
                queue.intermediate_queue.remove(job.id)
            return
        # Claim the job before anything slow (a model reload takes seconds): in the started-job
        # registry with a lease, renewed from now on, and marked started. Until then it is
        # "queued" in no queue, which a waiting request takes for a job lost by a dead worker
        # and requeues: another worker would run it too.
        execution = self.prepare_execution(job)
        lease = _Lease()
        threading.Thread(
            target=self._renew_lease, args=(job, execution, lease), name="lease", daemon=True
        ).start()
        try:
            self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
            if self.runtime is not None:
                try:
                    self.runtime.begin_job()
                except Exception:  # keep serving with the model held; the job reports its version
                    log.exception("model reload check failed before job %s", job.id)
            self.perform_job(job, queue, execution)
        finally:
            if self.runtime is not None:
                self.runtime.end_job()
            lease.end()  # no renewal after this returns; the thread exits when it wakes

    def _renew_lease(self, job: Job, execution, lease: _Lease) -> None:
        # rq scores the registry in whole seconds, so a lease of L seconds lasts L - 1 to L:
        # renewed three times within L - 1
        interval = max(0.25, (max(MIN_LEASE, self.lease) - 1) / 3)
        while not lease.ended.wait(interval):
            with lease.lock:
                if lease.ended.is_set():
                    return
                try:
                    self.maintain_heartbeats(job, execution)
                except redis.exceptions.RedisError as e:
                    log.warning("could not renew the lease of job %s: %s", job.id, e)


class PromptLaneWorker(AssistWorker):
    """The worker's prompt lane: a second rq worker in a thread of the same process, on the
    worker's own interactive queue only (clicks routed here because this process holds their
    image's SAM2 features: the prompt encoder and mask decoder, tens of milliseconds). It runs
    them while the main loop runs something slow (another image's encode, a prewarm, a batch
    prediction), so that a click on a cached image never waits behind another image's encode.

    It shares the process's model runtime without reloading it (the main loop reloads between
    its jobs); job timeouts use a timer thread instead of SIGALRM, and it installs no signal
    handlers (the main loop's stop ends it)."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        pass

    def stop_lane(self) -> None:
        self.stopping = True
        self._stop_requested = True


def start_prompt_lane(
    settings: Settings, connection: redis.Redis, worker_name: str
) -> tuple[threading.Thread, list[PromptLaneWorker]]:
    """Start the prompt lane of worker ``worker_name`` (see :class:`PromptLaneWorker`) in a
    daemon thread; returns the thread and a one-item list holding its current rq worker."""
    holder: list[PromptLaneWorker] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            lane = PromptLaneWorker(
                [Queue(worker_queue(worker_name), connection=connection)],
                connection=connection,
                name=lane_name(worker_name),
                maintenance_interval=max(1, settings.job_lease),
                worker_ttl=settings.job_lease + 15,
            )
            lane.lease = settings.job_lease
            holder[:] = [lane]
            try:
                lane.work(with_scheduler=False, logging_level=settings.log_level)
            except redis.exceptions.RedisError as e:
                log.error("prompt lane of %s lost its Redis connection: %s", worker_name, e)
            except Exception:  # the lane must never take the worker down
                log.exception("prompt lane of %s failed", worker_name)
            if lane.stopping or stop.is_set():
                return
            time.sleep(1.0)
            with contextlib.suppress(redis.exceptions.RedisError):
                lane.register_death()

    thread = threading.Thread(target=serve, name="prompt-lane", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread, holder


def stop_prompt_lane(thread: threading.Thread, holder: list[PromptLaneWorker]) -> None:
    thread.stop.set()  # type: ignore[attr-defined]
    for lane in holder:
        lane.stop_lane()


MIN_LEASE = 2  # seconds
HEARTBEAT_MIN_INTERVAL = 1.0  # seconds; the worker key lives worker_ttl + 60 s after a beat


class _Lease:
    """The end of one job's lease: once :meth:`end` returns, the renewing thread renews no more
    (it holds ``lock`` while renewing), without waiting for it to exit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ended = threading.Event()

    def end(self) -> None:
        with self.lock:
            self.ended.set()


def make_context(settings: Settings, connection: redis.Redis) -> WorkerContext:
    """The job context of a worker process: registry, model runtime, image fetcher."""

    ls_client = None
    if settings.label_studio_url and not settings.label_studio_api_key:
        log.warning(
            "LABEL_STUDIO_URL is set without LABEL_STUDIO_API_KEY: Label Studio images are fetched "
            "without credentials and results cannot be written back"
        )
    elif settings.label_studio_url:
        ls_client = LabelStudioClient(
            settings.label_studio_url, settings.label_studio_api_key, timeout=settings.fetch_timeout
        )
    fetcher = ImageFetcher(ls_client, FetchPolicy.from_settings(settings))
    registry = ModelRegistry(settings.model_dir, connection)
    runtime = ModelRuntime(settings, registry)

    return WorkerContext(
        settings=settings,
        redis=connection,
        runtime=runtime,
        fetch=fetcher.fetch,
        ls_client=ls_client,
        write_back=make_write_back(ls_client),
    )


def run_worker(
    settings: Settings,
    connection: redis.Redis,
    queues: tuple[str, ...] = QUEUES,
    burst: bool = False,
    name: str | None = None,
) -> None:
    """Load the model, then work on ``queues`` (in priority order) until stopped."""
    apply_torch_threads(settings)
    set_mmap_threshold(settings.mmap_threshold_mb)  # before the model's first allocations
    context = make_context(settings, connection)
    install_context(context)
    version = context.runtime.ensure_current()
    # the job functions' modules now, not during the first job (that import takes a second)
    importlib.import_module("worker.jobs")
    name = name or f"sam2unet-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    context.runtime.worker_name = name
    # its own queue first: prompts on images whose SAM2 features it holds (contracts/routing.py);
    # prewarms last, its own before the shared ones
    prewarms = (worker_prewarm_queue(name), QUEUE_PREWARM) if QUEUE_PREWARM in queues else ()
    queues = (worker_queue(name), *(q for q in queues if q != QUEUE_PREWARM), *prewarms)
    lane = (
        None if burst or not settings.prompt_lane else start_prompt_lane(settings, connection, name)
    )
    log.info(
        "worker ready with model version %s (prompts: %s head)",
        version,
        context.runtime.prompt_head,
    )
    while True:
        worker = AssistWorker(
            [Queue(q, connection=connection) for q in queues],
            connection=connection,
            name=name,
            maintenance_interval=max(1, settings.job_lease),
            # a short TTL keeps the blocking dequeue short, so idle workers reap abandoned jobs
            worker_ttl=settings.job_lease + 15,
        )
        worker.lease = settings.job_lease
        worker.runtime = context.runtime
        try:
            worker.work(burst=burst, with_scheduler=False, logging_level=settings.log_level)
        except redis.exceptions.RedisError as e:  # rq's teardown could not reach Redis either
            log.error("worker %s lost its Redis connection: %s", name, e)
        if burst or worker.stopping:
            if lane is not None:
                stop_prompt_lane(*lane)
            return
        # rq's loop quits on a Redis error in the middle of a job (or a Redis timeout): wait
        # for Redis and work again under the same name; the interrupted job is retried once
        # its lease has run out.
        log.error("worker %s stopped without a stop request; reconnecting to Redis", name)
        if not _wait_for_redis(connection, worker):
            return
        with contextlib.suppress(redis.exceptions.RedisError):
            worker.register_death()  # its registration may have survived in Redis


def _wait_for_redis(connection: redis.Redis, worker: AssistWorker) -> bool:
    """Block until Redis answers (True) or a stop is requested meanwhile (False)."""
    delay = 0.5
    try:
        while not worker.stopping:
            try:
                connection.ping()
                log.info("Redis is reachable again")
                return True
            except redis.exceptions.RedisError as e:
                log.warning("Redis still unreachable (%s); retrying in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)
    except StopRequested:  # rq's signal handler, when the stop comes while waiting
        pass
    return False
