"""Job functions run by the workers. Thin: they parse the payload and call the pipeline."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from rq import get_current_job

from contracts import preannotate as runs
from contracts.errors import AssistError
from contracts.jobs import ItemResult, PredictPayload, deliver_reply, encode_reply
from contracts.metrics import record_job
from contracts.routing import prewarm_done, remember_route
from contracts.untrained import is_untrained
from sam2unet.exceptions import ImageError
from sam2unet.transforms import decode_image
from worker.pipeline import StageTimes, run_predict
from worker.preannotate import after_predict, order_and_write, record
from worker.run_pages import process_page
from worker.runtime import WorkerContext, get_context

log = logging.getLogger(__name__)


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict every item of a :class:`PredictPayload` and push the results to its reply list;
    then write them back to Label Studio when asked (or when nobody waited for the reply)."""
    p = PredictPayload.from_json(payload)
    ctx = get_context()
    if p.run_id and not runs.is_running(ctx.redis, p.run_id):
        log.info("request %s: run %s is no longer running; skipped", p.request_id, p.run_id)
        return {"items": 0, "skipped": len(p.items)}
    times = StageTimes()
    acquired = _acquired_of(p, ctx)
    results = _run_pipeline(p, ctx, times, acquired)
    _log_times(p, results, times)
    job = get_current_job()
    late = _reply(p, ctx, job, results)
    record_job(ctx.redis, job, times, results)  # after the reply: nobody waits for metrics
    _write_back(p, ctx, results, acquired, late)
    return {"items": len(results), "errors": sum(1 for r in results if r.error)}


def _acquired_of(p: PredictPayload, ctx: WorkerContext) -> dict | None:
    """Where a ``diverse`` run's job collects each prediction's uncertainty and feature."""
    strategy = p.acquisition or ctx.runtime.settings.acquisition
    return {} if p.run_id and strategy == "diverse" else None


def _run_pipeline(
    p: PredictPayload, ctx: WorkerContext, times: StageTimes, acquired: dict | None
) -> list[ItemResult]:
    s = ctx.runtime.settings
    return run_predict(
        p,
        ctx.runtime,
        ctx.fetch,
        ctx.redis,
        threshold=s.threshold,
        cache_ttl=s.cache_ttl,
        max_pixels=s.max_image_pixels,
        times=times,
        acquired=acquired,
    )


def _log_times(p: PredictPayload, results: list[ItemResult], times: StageTimes) -> None:
    log.info(
        "request %s: %d items (%d cached, %d failed) fetch %.3fs decode %.3fs forward %.3fs "
        "encode %.3fs",
        p.request_id,
        len(results),
        times.cache_hits,
        sum(1 for r in results if r.error),
        times.fetch,
        times.decode,
        times.forward,
        times.encode,
    )


def _reply(p: PredictPayload, ctx: WorkerContext, job: Any, results: list[ItemResult]) -> bool:
    """Push the results to the request's reply list; True when its caller stopped waiting."""
    job_id = job.id if job is not None else "local"
    ttl = max(60, ctx.runtime.settings.result_ttl)
    return bool(p.reply_key) and deliver_reply(
        ctx.redis, p.reply_key, encode_reply(job_id, results), ttl
    )


def _write_back(
    p: PredictPayload,
    ctx: WorkerContext,
    results: list[ItemResult],
    acquired: dict | None,
    late: bool,
) -> None:
    """A run's results go through its write buffer, in bulk (a diverse run's after its order
    is applied); others are written now when asked or late, and counted for their run."""
    if p.run_id and p.write_back and ctx.ls_client is not None:
        after_predict(ctx, p.run_id, results, acquired)
        return
    written = 0
    if (p.write_back or late) and ctx.write_back is not None:
        written = ctx.write_back(p, results, ctx.redis, ctx.settings.write_batch)
    elif p.write_back:
        log.error("request %s: no Label Studio API configured to write results to", p.request_id)
    if p.run_id:
        untrained = sum(1 for r in results if is_untrained(r.model_version))
        record(
            ctx,
            p.run_id,
            done=written,
            failed=len(results) - written - untrained,
            skipped=untrained,
        )


def prewarm(payload: dict[str, Any]) -> dict[str, Any]:
    """Compute the SAM2 features of one task's image ahead of its first click (see
    :func:`contracts.routing.prewarm`), when the held version answers prompts with SAM2's head.
    The image's route names this worker before the computation starts, so a click arriving
    meanwhile comes here and waits for these features instead of computing them again."""
    ctx = get_context()
    rt = ctx.runtime
    url, ls_base, task_id = payload.get("url"), payload.get("ls_base"), payload.get("task_id")
    if not isinstance(url, str) or not url:
        log.warning("prewarm job without an image URL: skipped")
        return {"prewarmed": False, "reason": "no image URL"}
    try:
        rt.ensure_current(in_job=True)
        if rt.prompt_head != "sam2":
            return {"prewarmed": False, "reason": "prompts are answered by crop-and-segment"}
        t0 = time.perf_counter()
        data = ctx.fetch(url, ls_base, task_id)
        digest = hashlib.sha256(data).hexdigest()
        if rt.worker_name:
            remember_route(ctx.redis, ls_base, url, rt.worker_name)
        if rt.cached_features(digest) is not None:
            return {"prewarmed": False, "reason": "cached"}
        rgb = decode_image(data, max_pixels=rt.settings.max_image_pixels)
        _, cached = rt.image_features(rgb, digest)
        log.info(
            "task %s: image features prewarmed in %.2fs%s",
            task_id,
            time.perf_counter() - t0,
            " (computed meanwhile by a click)" if cached else "",
        )
        return {"prewarmed": not cached}
    except (AssistError, ImageError) as e:
        log.info("task %s: no prewarm: %s", task_id, e)
        return {"prewarmed": False, "reason": str(e)}
    finally:
        try:
            prewarm_done(ctx.redis, ls_base, url)
        except Exception as e:  # Redis unreachable: the mark expires by itself
            log.warning("could not clear the prewarm mark of task %s: %s", task_id, e)


def preannotate_page(run_id: str, page: int) -> dict[str, Any]:
    """Read one page of a pre-annotation run's project and enqueue predictions for the tasks
    that have none of the current model version; then enqueue the next page."""
    return process_page(get_context(), run_id, page)


def preannotate_order(run_id: str) -> dict[str, Any]:
    """Once every task of a ``diverse`` run is predicted: rank the whole run, give each of its
    buffered predictions the score of its rank and write them in bulk
    (:func:`worker.preannotate.order_and_write`)."""
    ctx = get_context()
    if ctx.ls_client is None:
        log.error("pre-annotation %s: no Label Studio API to write predictions to", run_id)
        return {"error": "no Label Studio API"}
    return order_and_write(ctx, run_id)
