"""Job functions run by the workers. Thin: they parse the payload and call the pipeline."""

from __future__ import annotations

import logging
from typing import Any

from rq import get_current_job

from contracts import preannotate as runs
from contracts.jobs import PredictPayload, deliver_reply, encode_reply
from contracts.metrics import record_job
from contracts.untrained import is_untrained
from worker.pipeline import StageTimes, run_predict
from worker.runtime import get_context

log = logging.getLogger(__name__)


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict every item of a :class:`PredictPayload` and push the results to its reply list."""
    p = PredictPayload.from_json(payload)
    ctx = get_context()
    rt = ctx.runtime
    if p.run_id and not runs.is_running(ctx.redis, p.run_id):
        log.info("request %s: run %s is no longer running; skipped", p.request_id, p.run_id)
        return {"items": 0, "skipped": len(p.items)}
    times = StageTimes()
    strategy = p.acquisition or rt.settings.acquisition
    acquired: dict | None = {} if p.run_id and strategy == "diverse" else None
    results = run_predict(
        p,
        rt,
        ctx.fetch,
        ctx.redis,
        threshold=rt.settings.threshold,
        cache_ttl=rt.settings.cache_ttl,
        max_pixels=rt.settings.max_image_pixels,
        times=times,
        acquired=acquired,
    )
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
    job = get_current_job()
    job_id = job.id if job is not None else "local"
    late = bool(p.reply_key) and deliver_reply(
        ctx.redis, p.reply_key, encode_reply(job_id, results), max(60, rt.settings.result_ttl)
    )
    record_job(ctx.redis, job, times, results)  # after the reply: nobody waits for metrics
    if p.run_id and p.write_back and ctx.ls_client is not None:
        from worker.preannotate import after_predict

        # through the run's write buffer, in bulk; a diverse run's after its order is applied
        after_predict(ctx, p.run_id, results, acquired)
        return {"items": len(results), "errors": sum(1 for r in results if r.error)}
    written = 0
    if (p.write_back or late) and ctx.write_back is not None:
        written = ctx.write_back(p, results, ctx.redis, ctx.settings.write_batch)
    elif p.write_back:
        log.error("request %s: no Label Studio API configured to write results to", p.request_id)
    if p.run_id:
        untrained = sum(1 for r in results if is_untrained(r.model_version))
        from worker.preannotate import record

        record(
            ctx,
            p.run_id,
            done=written,
            failed=len(results) - written - untrained,
            skipped=untrained,
        )
    return {"items": len(results), "errors": sum(1 for r in results if r.error)}


def prewarm(payload: dict[str, Any]) -> dict[str, Any]:
    """Compute the SAM2 features of one task's image ahead of its first click (see
    :func:`contracts.routing.prewarm`), when the held version answers prompts with SAM2's head.
    The image's route names this worker before the computation starts, so a click arriving
    meanwhile comes here and waits for these features instead of computing them again."""
    import hashlib
    import time

    from contracts.errors import AssistError
    from contracts.routing import prewarm_done, remember_route
    from sam2unet.exceptions import ImageError
    from sam2unet.transforms import decode_image

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
    from worker.preannotate import process_page

    return process_page(get_context(), run_id, page)


def preannotate_order(run_id: str) -> dict[str, Any]:
    """Once every task of a ``diverse`` run is predicted: rank the whole run, give each of its
    buffered predictions the score of its rank and write them in bulk
    (:func:`worker.preannotate.order_and_write`)."""
    from worker.preannotate import order_and_write

    ctx = get_context()
    if ctx.ls_client is None:
        log.error("pre-annotation %s: no Label Studio API to write predictions to", run_id)
        return {"error": "no Label Studio API"}
    return order_and_write(ctx, run_id)
