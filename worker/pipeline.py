"""One predict job: fetch images, run the model in device batches, encode Label Studio results.

A prediction's score is its acquisition score (:mod:`sam2unet.acquisition`; the job's strategy or
``SAM2UNET_ACQUISITION``): sorting by prediction score ascending lists the tasks to label next.
A ``diverse`` pre-annotation run rewrites its scores once completed (:mod:`worker.diverse_order`).

Per-task failures (unreachable or undecodable image) become an error on that task only.
Results are cached per (image content hash, model version, target) in Redis.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from contracts.errors import AssistError
from contracts.jobs import ItemResult, PredictPayload
from contracts.routing import remember_route
from contracts.untrained import untrained_version
from labelstudio.codecs import brush_result, polygon_results
from labelstudio.labelconfig import Target, target_from_json
from labelstudio.prompts import label_channels
from sam2unet.acquisition import prediction_score, sort_score
from sam2unet.exceptions import ImageError
from sam2unet.transforms import decode_image
from worker.answer_without_head import apply_prompts
from worker.prompt_parsing import parse_context

log = logging.getLogger(__name__)

CACHE_PREFIX = "sam2unet:cache:"


@dataclass
class StageTimes:
    """Seconds spent per stage of one job (summed over its images)."""

    fetch: float = 0.0
    decode: float = 0.0
    forward: float = 0.0
    encode: float = 0.0
    cache_hits: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def encode_results(
    prob: np.ndarray, target: Target, channels: list[tuple[int, str]], threshold: float
) -> tuple[list[dict[str, Any]], float]:
    """K x H x W probabilities -> (Label Studio result items, prediction score).

    One result per label with a non-empty mask (brush: one RLE item; polygon: one item per
    component). The prediction's score is the mean of the per-label scores.
    """
    results: list[dict[str, Any]] = []
    scores = []
    for k, label in channels:
        p = prob[k]
        mask = p >= threshold
        score = prediction_score(p, mask)
        scores.append(score)
        if not mask.any():
            continue
        if target.kind == "brush":
            results.append(brush_result(mask, target, label, score))
        else:
            results.extend(polygon_results(mask, target, label, score))
    return results, float(np.mean(scores)) if scores else 0.0


def encode_feature(feature: np.ndarray) -> str:
    """A pooled feature as base64 of its float16 bytes (for the JSON result cache)."""
    return base64.b64encode(np.asarray(feature, dtype="<f2").tobytes()).decode()


def decode_feature(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f2")


def _cache_key(
    digest: str, version: str, target: Target, threshold: float, strategy: str = ""
) -> str:
    sig = hashlib.sha1(
        json.dumps(
            [target.from_name, target.to_name, target.kind, list(target.labels), threshold]
            + ([strategy] if strategy else [])
        ).encode()
    ).hexdigest()[:16]
    return f"{CACHE_PREFIX}{version}:{digest}:{sig}"


def answer_with_sam2(
    runtime: Any,
    rgb: np.ndarray,
    digest: str,
    url: str,
    task_id: int | None,
    payload: PredictPayload,
    target: Target,
    channels: list[tuple[int, str]],
    redis_client: redis.Redis | None,
    times: StageTimes,
    threshold: float = 0.5,
) -> tuple[list[dict[str, Any]], float]:
    """One image's interactive call answered by SAM2's promptable head: features from the
    worker's embedding cache or the trunk, then the prompt encoder and mask decoder."""
    from worker.answer_with_head import answer_prompts  # imports torch: only for SAM2's head

    height, width = rgb.shape[:2]
    prompts = parse_context(payload.context, height, width, target.to_name)
    if not prompts:  # nothing to click on: the automatic model's answer, if it was trained
        if not runtime.decoder_trained:
            log.info("task %s: no prompt, and the automatic head was never trained", task_id)
            return [], 0.0
        prob = runtime.predict([rgb])[0]
        return encode_results(prob, target, channels, threshold)
    t0 = time.perf_counter()
    features, hit = runtime.image_features(rgb, digest)
    times.extra["embed"] = times.extra.get("embed", 0.0) + time.perf_counter() - t0
    times.extra["embedding_hits"] = times.extra.get("embedding_hits", 0) + int(hit)
    if redis_client is not None and runtime.worker_name:
        try:
            remember_route(redis_client, payload.ls_base, url, runtime.worker_name)
        except redis.exceptions.RedisError as e:
            log.warning("could not record the route of an image's prompts: %s", e)
    result, score, info = answer_prompts(runtime.promptable, features, prompts, target, channels)
    log.info(
        "task %s: prompts: %s; image features %s",
        task_id,
        info,
        "from the cache" if hit else "computed",
    )
    return result, score


@dataclass
class _Job:
    """What the stages of one predict job share."""

    payload: PredictPayload
    runtime: Any
    target: Target
    version: str
    channels: list[tuple[int, str]]
    strategy: str
    threshold: float
    times: StageTimes
    results: dict[int, ItemResult]
    acquired: dict[int, tuple[float, np.ndarray]] | None


@dataclass
class _Forward:
    """The model's answers for the decoded images, in ``order``: a probability map (``None``
    for an item answered otherwise or failed), the acquisition uncertainty and pooled
    feature of automatic predictions, and the finished results of SAM2-prompted items."""

    order: list[int]
    probs: list[np.ndarray | None]
    uncertainty: dict[int, float] = field(default_factory=dict)
    features: dict[int, np.ndarray] = field(default_factory=dict)
    answered: dict[int, tuple[list[dict[str, Any]], float]] = field(default_factory=dict)


def run_predict(
    payload: PredictPayload,
    runtime: Any,
    fetch: Callable[[str, str | None, int | None], bytes],
    redis_client: redis.Redis | None,
    *,
    threshold: float = 0.5,
    cache_ttl: int = 0,
    max_pixels: int = 64_000_000,
    fetch_threads: int = 8,
    times: StageTimes | None = None,
    acquired: dict[int, tuple[float, np.ndarray]] | None = None,
) -> list[ItemResult]:
    """Compute the results of every item of ``payload`` (never raises for a per-item problem).

    With the ``diverse`` strategy, ``acquired`` (when given) receives per item index the
    uncertainty and pooled trunk feature (float16) of each automatic prediction, cached or not."""
    times = times if times is not None else StageTimes()
    target = target_from_json(payload.target)
    version = runtime.ensure_current(in_job=True)
    if payload.context is None and not runtime.decoder_trained:
        return _untrained_results(payload, version)
    if payload.context is not None:  # a prompted result depends on the prompts: not cached
        cache_ttl = 0
    settings = getattr(runtime, "settings", None)
    job = _Job(
        payload,
        runtime,
        target,
        version,
        label_channels(runtime.labels, target),
        payload.acquisition or getattr(settings, "acquisition", "confidence"),
        threshold,
        times,
        {it.index: ItemResult(it.index, it.task_id, model_version=version) for it in payload.items},
        acquired,
    )
    fetched = _fetch_images(job, fetch, fetch_threads)
    keys = {
        i: _cache_key(d, version, target, threshold, job.strategy) for i, (_, d) in fetched.items()
    }
    if redis_client is not None and cache_ttl > 0 and keys:
        _take_cached(job, redis_client, keys, fetched)
    order, images = _decode_images(job, fetched, max_pixels)
    if images:
        forward = _forward(job, order, images, fetched, redis_client)
        to_cache = _encode(job, forward, keys)
        if redis_client is not None and cache_ttl > 0 and to_cache:
            _store_cached(redis_client, to_cache, cache_ttl)
    for r in job.results.values():
        if r.error:
            log.warning("task %s: no prediction: %s", r.task_id, r.error)
    return [job.results[it.index] for it in payload.items]


def _untrained_results(payload: PredictPayload, version: str) -> list[ItemResult]:
    """The automatic head was never trained: its maps are noise, so none are made."""
    log.info(
        "request %s: %d task(s) get no automatic prediction: %s",
        payload.request_id,
        len(payload.items),
        f"the automatic head of {version} was never trained",
    )
    marked = untrained_version(version)
    return [
        ItemResult(it.index, it.task_id, score=0.0, model_version=marked) for it in payload.items
    ]


def _fetch_images(
    job: _Job, fetch: Callable[[str, str | None, int | None], bytes], threads: int
) -> dict[int, tuple[bytes, str]]:
    """Every item's image bytes and content hash, fetched in threads (network I/O and hashing
    overlap); a failed fetch becomes that item's error."""
    items, results = job.payload.items, job.results

    def load(item):  # runs in a thread: network I/O and decoding overlap
        t0 = time.perf_counter()
        data = fetch(item.url, job.payload.ls_base, item.task_id)
        t1 = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        return data, digest, t1 - t0

    def take(index: int, outcome: Callable[[], tuple[bytes, str, float]]) -> None:
        try:
            data, digest, dt = outcome()
            job.times.fetch += dt
            fetched[index] = (data, digest)
        except AssistError as e:
            results[index].error = e.message
        except Exception as e:  # one bad task must not fail the others
            log.exception("unexpected error fetching the image of item %d", index)
            results[index].error = f"image fetch failed: {type(e).__name__}"

    fetched: dict[int, tuple[bytes, str]] = {}
    if len(items) == 1:  # nothing to overlap: no thread
        (only,) = items
        take(only.index, lambda: load(only))
    else:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items)))) as pool:
            futures = {it.index: pool.submit(load, it) for it in items}
            for index, fut in futures.items():
                take(index, fut.result)
    return fetched


def _take_cached(
    job: _Job,
    redis_client: redis.Redis,
    keys: dict[int, str],
    fetched: dict[int, tuple[bytes, str]],
) -> None:
    """Results found in the cache are taken (with fresh ids) and their images dropped from
    ``fetched``."""
    order = list(keys)
    for i, raw in zip(order, redis_client.mget([keys[i] for i in order]), strict=True):
        if raw is None:
            continue
        cached = json.loads(raw)
        for item in cached["result"]:  # ids stay unique across tasks
            item["id"] = secrets.token_urlsafe(8)
        result = job.results[i]
        result.result, result.score = cached["result"], cached["score"]
        if job.acquired is not None and "feature" in cached:
            job.acquired[i] = (cached["uncertainty"], decode_feature(cached["feature"]))
        result.cached = True
        job.times.cache_hits += 1
        del fetched[i]


def _decode_images(
    job: _Job, fetched: dict[int, tuple[bytes, str]], max_pixels: int
) -> tuple[list[int], list[np.ndarray]]:
    """The fetched images decoded, with their item indexes; an undecodable one becomes that
    item's error."""
    images: list[np.ndarray] = []
    order = []
    t0 = time.perf_counter()
    for i, (data, _) in fetched.items():
        try:
            images.append(decode_image(data, max_pixels=max_pixels))
            order.append(i)
        except ImageError as e:
            job.results[i].error = str(e)
    job.times.decode += time.perf_counter() - t0
    return order, images


def _forward(
    job: _Job,
    order: list[int],
    images: list[np.ndarray],
    fetched: dict[int, tuple[bytes, str]],
    redis_client: redis.Redis | None,
) -> _Forward:
    """The model on the decoded images: the automatic head with its acquisition scores, or
    the job's prompts."""
    t0 = time.perf_counter()
    if job.payload.context is None:
        forward = _acquire(job, order, images)
    else:
        forward = _prompted(job, order, images, fetched, redis_client)
    job.times.forward += time.perf_counter() - t0
    return forward


def _acquire(job: _Job, order: list[int], images: list[np.ndarray]) -> _Forward:
    """Automatic predictions with their acquisition uncertainty and pooled features."""
    scored = job.runtime.acquire(
        images,
        job.strategy,
        [f"{job.payload.project}:{job.version}:{job.results[i].task_id}" for i in order],
    )
    return _Forward(
        order,
        [a.prob for a in scored],
        uncertainty={i: a.uncertainty for i, a in zip(order, scored, strict=True)},
        features={
            i: a.feature.astype(np.float16)
            for i, a in zip(order, scored, strict=True)
            if a.feature is not None
        },
    )


def _prompted(
    job: _Job,
    order: list[int],
    images: list[np.ndarray],
    fetched: dict[int, tuple[bytes, str]],
    redis_client: redis.Redis | None,
) -> _Forward:
    """An interactive call: SAM2's head, or prompts applied around the model; a refused
    prompt becomes that item's error."""
    forward = _Forward(order, [])
    payload, runtime = job.payload, job.runtime
    for i, rgb in zip(order, images, strict=True):
        prob = None
        try:
            if runtime.prompt_head == "sam2":
                item = next(it for it in payload.items if it.index == i)
                forward.answered[i] = answer_with_sam2(
                    runtime,
                    rgb,
                    fetched[i][1],
                    item.url,
                    item.task_id,
                    payload,
                    job.target,
                    job.channels,
                    redis_client,
                    job.times,
                    job.threshold,
                )
            else:
                prob, info = apply_prompts(
                    rgb,
                    payload.context,
                    runtime.predict,
                    job.threshold,
                    channels=job.channels,
                    to_name=job.target.to_name,
                )
                log.info("task %s: prompts: %s", job.results[i].task_id, info)
        except AssistError as e:
            job.results[i].error, prob = e.message, None
        forward.probs.append(prob)
    return forward


def _encode(job: _Job, forward: _Forward, keys: dict[int, str]) -> dict[str, str]:
    """Label Studio results of every answered item; returns the cache entries to store."""
    t0 = time.perf_counter()
    to_cache = {}
    for i, prob in zip(forward.order, forward.probs, strict=True):
        result = job.results[i]
        if i in forward.answered:
            result.result, result.score = forward.answered[i]
            continue
        if prob is None:
            continue
        res, score = encode_results(prob, job.target, job.channels, job.threshold)
        if i in forward.uncertainty:
            score = sort_score(forward.uncertainty[i])
        result.result, result.score = res, score
        entry: dict[str, Any] = {"result": res, "score": score}
        if i in forward.features:
            entry.update(
                uncertainty=forward.uncertainty[i], feature=encode_feature(forward.features[i])
            )
            if job.acquired is not None:
                job.acquired[i] = (forward.uncertainty[i], forward.features[i])
        to_cache[keys[i]] = json.dumps(entry)
    job.times.encode += time.perf_counter() - t0
    return to_cache


def _store_cached(redis_client: redis.Redis, to_cache: dict[str, str], ttl: int) -> None:
    with redis_client.pipeline(transaction=False) as pipe:
        for k, v in to_cache.items():
            pipe.set(k, v, ex=ttl)
        pipe.execute()
