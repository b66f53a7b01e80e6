"""Queue names and job payloads shared by the backend (producer) and the workers (consumers).

Payloads are small JSON-serialisable dicts carrying references (task id, image URL), never image
bytes, and a version field. Results travel back on a per-request Redis list (``reply_key``):
each finished job pushes one JSON message, so a waiting request wakes up at once.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from contracts.errors import BadRequest

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1

QUEUE_INTERACTIVE = "sam2unet-interactive"  # drained first by every worker
QUEUE_BATCH = "sam2unet-batch"  # /predict requests from Label Studio
QUEUE_BACKGROUND = "sam2unet-background"  # project-wide pre-annotation, active learning
#: image features computed ahead of an annotator's first click (contracts/routing.py): last
QUEUE_PREWARM = "sam2unet-prewarm"
QUEUES = (QUEUE_INTERACTIVE, QUEUE_BATCH, QUEUE_BACKGROUND, QUEUE_PREWARM)

PREDICT_FUNC = "worker.jobs.predict"
PREWARM_FUNC = "worker.jobs.prewarm"
PREWARM_TTL = 120  # seconds a prewarm job may wait in its queue before it is dropped
REPLY_PREFIX = "sam2unet:reply:"
LATE_PREFIX = "sam2unet:late:"  # set when the waiting request gave up: results go to Label Studio


@dataclass(frozen=True)
class PredictItem:
    """One task to predict: its position in the request, its id and its image reference."""

    index: int
    url: str
    task_id: int | None = None


@dataclass(frozen=True)
class PredictPayload:
    """What a predict job needs. ``target`` is a :class:`labelstudio.labelconfig.Target` as a dict;
    ``context`` an interactive prompt (Label Studio's ``params.context``) or None.
    ``reply_key`` is the waiting request's reply list (None: nobody waits); ``write_back``
    stores the results in Label Studio through its API; ``run_id`` names the pre-annotation
    run whose progress the job counts; ``acquisition`` the strategy whose score the
    predictions carry (None: the workers' ``SAM2UNET_ACQUISITION``)."""

    items: tuple[PredictItem, ...]
    target: dict[str, Any]
    reply_key: str | None
    ls_base: str | None = None
    project: int | None = None
    model_version: str | None = None
    context: dict[str, Any] | None = None
    request_id: str = field(default_factory=lambda: secrets.token_hex(6))
    write_back: bool = False
    run_id: str | None = None
    acquisition: str | None = None
    v: int = PAYLOAD_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["items"] = [asdict(i) for i in self.items]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PredictPayload:
        if not isinstance(d, dict) or d.get("v") != PAYLOAD_VERSION:
            raise BadRequest(
                f"unsupported job payload version {d.get('v') if isinstance(d, dict) else d!r}"
            )
        d = dict(d)
        d["items"] = tuple(PredictItem(**i) for i in d["items"])
        return cls(**d)


@dataclass
class ItemResult:
    """The answer for one task: Label Studio result items, a score and the model version that
    computed them; or an error message (then ``result`` is empty)."""

    index: int
    task_id: int | None
    result: list[dict[str, Any]] = field(default_factory=list)
    score: float | None = None
    model_version: str | None = None
    error: str | None = None
    cached: bool = False
    prediction_id: int | None = None  # Label Studio's id, once written back

    def to_json(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies the result items, element by element of their
        # RLE lists (tens of ms per task), only to be serialised at once
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ItemResult:
        return cls(**d)


# A finished job hands its results over atomically: to the waiting request's reply list, or,
# once the request gave up (the late flag is set in the same transaction that drains the
# list), back to the worker, which writes them to Label Studio. Never both, never neither.
_DELIVER_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 0
"""


def deliver_reply(connection: Any, reply_key: str, message: str, ttl: int) -> bool:
    """Push a job's reply unless its request already gave up; True when it gave up (late)."""
    late = connection.eval(_DELIVER_LUA, 2, reply_key, LATE_PREFIX + reply_key, message, int(ttl))
    return bool(late)


def close_request(connection: Any, reply_key: str) -> list[bytes]:
    """Give up waiting: mark the request late and take the replies that arrived meanwhile."""
    with connection.pipeline(transaction=True) as pipe:
        pipe.set(LATE_PREFIX + reply_key, 1, ex=24 * 3600)
        pipe.lrange(reply_key, 0, -1)
        pipe.delete(reply_key)
        _, replies, _ = pipe.execute()
    return replies


def new_reply_key() -> str:
    return REPLY_PREFIX + secrets.token_hex(12)


def encode_reply(job_id: str, results: list[ItemResult]) -> str:
    return json.dumps({"job": job_id, "items": [r.to_json() for r in results]})


def decode_reply(raw: bytes | str) -> tuple[str, list[ItemResult]]:
    d = json.loads(raw)
    return d["job"], [ItemResult.from_json(i) for i in d["items"]]


def reap_abandoned(connection: Any, queue_names: tuple[str, ...] = QUEUES) -> None:
    """Retry (or fail, when out of retries) jobs whose worker stopped renewing its lease."""
    # rq: only where a queue is used; readers of the payloads (labelstudio.writeback) do without
    from rq.registry import StartedJobRegistry

    for name in queue_names:
        StartedJobRegistry(name, connection=connection).cleanup()


# Put a lost job back at the front of its queue, in one step with the checks that it is lost:
# still "queued" (a worker claims a job by marking it started before anything slow), and
# neither in its queue nor in its queue's started-job registry (any execution of it).
_REQUEUE_LOST_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
local prefix = ARGV[1] .. ':'
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if member == ARGV[1] or string.sub(member, 1, #prefix) == prefix then return 0 end
end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""


def requeue_lost(connection: Any, jobs: Sequence[Any], seen: set[str]) -> list[str]:
    """Put back at the front of their queue the ``jobs`` that a worker took off their queue and
    died before starting (killed between its pop and rq's bookkeeping: the job is still
    "queued" but in no queue, and no lease covers it). A live worker claims a job (a lease in
    the started-job registry, the job marked started) within milliseconds of taking it, before
    any model reload, so a job is only requeued when it was seen so on the previous call too
    (``seen``: those job ids, kept by the caller between calls, one call a second or less
    often), and the last check and the requeue are one atomic step: a job claimed in between
    is never requeued. Returns the ids requeued."""
    # rq: only where a queue is used; readers of the payloads (labelstudio.writeback) do without
    from rq import Queue
    from rq.job import JobStatus

    requeued = []
    for job in jobs:
        if job is None or job.get_status(refresh=False) != JobStatus.QUEUED or not job.origin:
            seen.discard(getattr(job, "id", ""))
            continue
        queue = Queue(job.origin, connection=connection)
        if connection.lpos(queue.key, job.id) is not None:  # waiting in its queue
            seen.discard(job.id)
            continue
        if job.id not in seen:
            seen.add(job.id)
            continue
        seen.discard(job.id)
        keys = (job.key, queue.key, queue.started_job_registry.key)
        if not connection.eval(_REQUEUE_LOST_LUA, 3, *keys, job.id):
            continue  # claimed (or back in its queue) since it was read
        requeued.append(job.id)
        log.warning(
            "job %s was taken off %s by a worker that stopped before starting it; requeued",
            job.id,
            job.origin,
        )
    return requeued


def enqueue_predict(
    queue: Any,
    items: Sequence[PredictItem],
    settings: Any,
    description: str,
    *,
    ttl: int | None = None,
    **payload_fields: Any,
) -> list[tuple[Any, tuple[PredictItem, ...]]]:
    """Enqueue ``items`` as predict jobs of ``settings.batch_size`` items each (one device
    batch per job), retried on another worker if theirs dies. Returns (job, items) pairs."""
    # rq: only where a queue is used; readers of the payloads (labelstudio.writeback) do without
    from rq import Queue, Retry

    size = max(1, settings.batch_size)
    datas, chunks = [], []
    for start in range(0, len(items), size):
        chunk = tuple(items[start : start + size])
        payload = PredictPayload(items=chunk, **payload_fields)
        datas.append(
            Queue.prepare_data(
                PREDICT_FUNC,
                args=(payload.to_json(),),
                timeout=settings.job_timeout,
                result_ttl=settings.result_ttl,
                failure_ttl=24 * 3600,
                ttl=ttl,
                retry=Retry(max=settings.job_retries),
                description=f"{description}: {len(chunk)} task(s)",
            )
        )
        chunks.append(chunk)
    jobs = queue.enqueue_many(datas) if datas else []
    return list(zip(jobs, chunks, strict=True))


def enqueue_prewarm(
    queue: Any, url: str, ls_base: str | None, task_id: int | None, settings: Any
) -> Any:
    """Enqueue a prewarm job: compute the SAM2 features of the image at ``url`` on a worker,
    at the lowest priority (``queue``: the shared prewarm queue or a worker's own). Dropped
    unrun after :data:`PREWARM_TTL` seconds in the queue; its result is not kept."""
    return queue.enqueue(
        PREWARM_FUNC,
        {"url": url, "ls_base": ls_base, "task_id": task_id, "v": PAYLOAD_VERSION},
        job_timeout=settings.job_timeout,
        ttl=PREWARM_TTL,
        result_ttl=0,
        failure_ttl=3600,
        description=f"prewarm the image features of task {task_id}",
    )
