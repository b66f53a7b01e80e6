"""A worker process for benchmarks: ``python -m bench.worker``.

``--runtime model`` is the production worker (:func:`worker.process.run_worker`) with timers
around its stages: after each job the seconds spent in fetch, decode, preprocess, the model,
the rest of ``Predictor.predict`` (upsampling to the image size), encoding and RLE (the fetch
phase as wall-clock time: images of one job are fetched in parallel threads), and the
wall-clock times the job function started and finished its work, are stored in Redis under
``bench:stages:<job id>``. ``--runtime noop`` is the same worker whose model answers zeros at
once (the pipeline around it unchanged), to measure what the queue costs. ``--rq-echo`` runs a
bare rq ``SimpleWorker`` whose job only pushes a reply: the floor any rq round trip pays.
:func:`raw_forward` is a job for these workers: the raw forward of their own model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

STAGES_PREFIX = "bench:stages:"
ECHO_QUEUE = "bench-echo"
ECHO_FUNC = "bench.worker.echo"
RAW_FORWARD_FUNC = "bench.worker.raw_forward"

log = logging.getLogger(__name__)


def echo(reply_key: str) -> None:
    """The rq-echo job: push one reply."""
    from rq import get_current_job

    job = get_current_job()
    job.connection.rpush(reply_key, job.id)


def raw_forward(batch: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Bench job, run by a worker: seconds per ``Predictor.forward_batch`` call of this
    process's own model on a random B x 3 x S x S batch (the worker's "model" stage alone)."""
    import torch

    from bench.measure import repeat_timed
    from worker.runtime import get_context

    predictor = get_context().runtime.predictor
    size = predictor.config.image_size
    x = torch.randn(batch, 3, size, size)
    times = repeat_timed(lambda: predictor.forward_batch(x), predictor.device, warmup, repeats)
    return {"batch": batch, "seconds": times, "pid": os.getpid()}


class StageClock:
    """Seconds per stage of the job running in this process (one job at a time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.started = 0.0
        self.work_end = 0.0
        self.times: Any = None

    def reset(self) -> None:
        self.seconds = defaultdict(float)
        self.started = time.time()
        self.work_end = 0.0
        self.times = None

    def timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - t0

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def record(self, job_id: str, items: int) -> dict[str, Any]:
        t = self.times
        return {
            "job": job_id,
            "pid": os.getpid(),
            "items": items,
            "start": self.started,
            "work_end": self.work_end,
            "end": time.time(),
            "fetch": t.fetch if t else 0.0,
            "decode": t.decode if t else 0.0,
            "predict": t.forward if t else 0.0,
            "encode": t.encode if t else 0.0,
            "cache_hits": t.cache_hits if t else 0,
            **{k: v for k, v in self.seconds.items()},
        }


def install_timers(clock: StageClock) -> None:
    """Wrap the worker's stage functions with ``clock``'s timers (this process only)."""
    import sam2unet.predictor as predictor_mod
    import worker.jobs as jobs_mod
    import worker.pipeline as pipeline_mod

    predictor_mod.preprocess = clock.timed("preprocess", predictor_mod.preprocess)
    forward_batch = predictor_mod.Predictor.forward_batch

    def timed_forward(self, batch):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = forward_batch(self, batch)
        if out.is_cuda:
            import torch

            torch.cuda.synchronize(out.device)
        clock.seconds["model"] += time.perf_counter() - t0
        return out

    predictor_mod.Predictor.forward_batch = timed_forward

    class TimedPool(pipeline_mod.ThreadPoolExecutor):
        """The pipeline's fetch thread pool: times the whole fetch phase (wall clock)."""

        def __enter__(self):  # type: ignore[no-untyped-def]
            self._t0 = time.perf_counter()
            return super().__enter__()

        def __exit__(self, *exc: object):  # type: ignore[no-untyped-def]
            try:
                return super().__exit__(*exc)
            finally:
                clock.seconds["fetch_wall"] += time.perf_counter() - self._t0

    pipeline_mod.ThreadPoolExecutor = TimedPool
    pipeline_mod.brush_result = clock.timed("rle", pipeline_mod.brush_result)
    pipeline_mod.polygon_results = clock.timed("rle", pipeline_mod.polygon_results)

    record_job, deliver_reply = jobs_mod.record_job, jobs_mod.deliver_reply

    def timed_deliver_reply(*args, **kwargs):  # type: ignore[no-untyped-def]
        clock.work_end = time.time()  # the work is done: the reply goes out
        return deliver_reply(*args, **kwargs)

    def timed_record_job(conn, job, times, results):  # type: ignore[no-untyped-def]
        clock.work_end = clock.work_end or time.time()
        clock.times = times
        return record_job(conn, job, times, results)

    jobs_mod.deliver_reply = timed_deliver_reply
    jobs_mod.record_job = timed_record_job
    predict = jobs_mod.predict

    def timed_predict(payload: dict[str, Any]) -> dict[str, Any]:
        from rq import get_current_job

        from worker.runtime import get_context

        clock.reset()
        try:
            return predict(payload)
        finally:
            job = get_current_job()
            if job is not None:
                stats = clock.record(job.id, len(payload.get("items") or ()))
                get_context().redis.set(STAGES_PREFIX + job.id, json.dumps(stats), ex=3600)

    # rq resolves "worker.jobs.predict" by name for every job: it finds this wrapper
    jobs_mod.predict = timed_predict


def install_noop_runtime() -> None:
    """Make the worker's model answer zeros instantly (the model is still loaded, unused)."""
    import worker.process as process_mod
    from worker.runtime import ModelRuntime

    class NoopRuntime(ModelRuntime):
        def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
            k = max(1, len(self.labels))
            return [np.zeros((k, *im.shape[:2]), dtype=np.float32) for im in images]

    process_mod.ModelRuntime = NoopRuntime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--runtime", choices=("model", "noop"), default="model")
    parser.add_argument("--rq-echo", action="store_true", help="bare rq SimpleWorker")
    args = parser.parse_args(argv)

    from contracts.connections import redis_client
    from contracts.settings import Settings

    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    conn = redis_client(settings.redis_url)
    if args.rq_echo:
        from rq import Queue, SimpleWorker

        SimpleWorker([Queue(ECHO_QUEUE, connection=conn)], connection=conn, name=args.name).work(
            with_scheduler=False, logging_level="WARNING"
        )
        return 0
    from worker.process import run_worker

    install_timers(StageClock())
    if args.runtime == "noop":
        install_noop_runtime()
    run_worker(settings, conn, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
