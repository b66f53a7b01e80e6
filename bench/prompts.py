"""Section 7: interactive prompts answered by SAM2's promptable head in a worker's model
runtime: the first prompt on an image (trunk + neck + prompt encoder + mask decoder) against
the second on the same image (embedding cache hit: prompt encoder + mask decoder only), through
the worker's whole path (Label Studio context in, brush RLE out), and the worker's memory with
its embedding cache full.

The base is an official-format checkpoint with random weights (the timings do not depend on
the weights). The runtime runs in a spawned process of its own, so that its resident memory
is a worker's: model, promptable head and cache, not the bench's.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

FIRST_VS_SECOND_TARGET = 5.0  # the second prompt at least this many times faster (p50)


def _image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 90 + 60).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 4) ** 2] = (230, 200, 40)
    return img


def _context(x: float, y: float, box: bool) -> dict[str, Any]:
    items: list[dict[str, Any]] = [
        {
            "type": "keypointlabels",
            "to_name": "image",
            "is_positive": True,
            "value": {"x": x, "y": y, "keypointlabels": ["object"]},
        }
    ]
    if box:
        items.append(
            {
                "type": "rectanglelabels",
                "to_name": "image",
                "value": {"x": 20.0, "y": 20.0, "width": 60.0, "height": 60.0},
            }
        )
    return {"result": items}


def _child(
    model_dir: str, size: str, images: int, hw: tuple[int, int], cache_mb: int, threads: int, queue
) -> None:
    import torch

    from bench.measure import proc_memory_mb, summary
    from contracts.jobs import PredictItem, PredictPayload
    from contracts.settings import Settings
    from labelstudio.labelconfig import Target, target_to_json
    from modelstore.bootstrap import ensure_current_version
    from modelstore.registry import ModelRegistry
    from worker.pipeline import run_predict
    from worker.runtime import ModelRuntime, set_mmap_threshold

    torch.set_num_threads(threads)
    start = proc_memory_mb(os.getpid())
    settings = Settings(
        model_size=size, image_size=352, model_dir=Path(model_dir), device="cpu",
        embedding_cache_mb=cache_mb,
    )  # fmt: skip
    set_mmap_threshold(settings.mmap_threshold_mb)  # as a worker process does at its start
    registry = ModelRegistry(model_dir, None)
    ensure_current_version(registry, settings)
    rt = ModelRuntime(settings, registry)
    rt.ensure_current()
    assert rt.prompt_head == "sam2", rt.prompt_head
    loaded = proc_memory_mb(os.getpid())
    target = Target("tag", "image", "brush", ("object",), "image")
    h, w = hw
    data = [_image(i, h, w) for i in range(images + 1)]
    from PIL import Image

    encoded = []
    for arr in data:
        import io

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        encoded.append(buf.getvalue())

    def ask(i: int, ctx: dict[str, Any]) -> float:
        payload = PredictPayload(
            items=(PredictItem(0, f"img{i}.png", i),),
            target=target_to_json(target),
            reply_key=None,
            context=ctx,
        )
        t0 = time.perf_counter()
        (res,) = run_predict(payload, rt, lambda u, b, t=None: encoded[i], None)
        dt = time.perf_counter() - t0
        assert res.error is None, res.error
        return dt

    ask(images, _context(50.0, 50.0, False))  # warm-up, on an image not measured
    first, second = [], []
    for i in range(images):
        first.append(ask(i, _context(45.0, 40.0, False)))
        second.append(ask(i, _context(55.0, 50.0, True)))
    runs_before = rt.promptable.trunk_runs
    # fill the cache to its bound
    i = images + 1
    while rt.embeddings.bytes + rt.embeddings.bytes // max(len(rt.embeddings), 1) <= (
        cache_mb * 2**20
    ):
        rt.image_features(_image(1000 + i, h, w), f"fill-{i}")
        i += 1
    full = proc_memory_mb(os.getpid())
    queue.put(
        {
            "first_ms": summary(first, 1000.0),
            "second_ms": summary(second, 1000.0),
            "trunk_runs_during_seconds": runs_before - (images + 1),
            "embedding_bytes_per_image": rt.embeddings.bytes // max(len(rt.embeddings), 1),
            "cache_entries": len(rt.embeddings),
            "cache_bytes": rt.embeddings.bytes,
            "rss_mb_start": start.get("rss"),
            "rss_mb_loaded": loaded.get("rss"),
            "rss_mb_cache_full": full.get("rss"),
            "hwm_mb": full.get("hwm"),
        }
    )


def run_prompts(
    size: str, images: int, hw: tuple[int, int], cache_mb: int, threads: int, tmp: Path
) -> dict[str, Any]:
    """Time first vs second prompts on ``images`` images of ``hw`` with a ``size`` base."""
    from sam2unet.prompt_head import head_image_size
    from sam2unet.random_weights import write_random_sam2_checkpoint

    model_dir = tmp / f"prompts-{size}"
    write_random_sam2_checkpoint(model_dir / "base" / f"sam2.1_hiera_{size}.pt", size)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_child, args=(str(model_dir), size, images, hw, cache_mb, threads, queue)
    )
    proc.start()
    out = queue.get(timeout=3600)
    proc.join(timeout=60)
    p50_first, p50_second = out["first_ms"]["p50"], out["second_ms"]["p50"]
    out.update(
        size=size,
        images=images,
        image_hw=list(hw),
        head_input=head_image_size(size),
        cache_mb=cache_mb,
        speedup_p50=p50_first / p50_second,
        speedup_p99=out["first_ms"]["p99"] / out["second_ms"]["p99"],
        target=FIRST_VS_SECOND_TARGET,
    )
    return out


# --------------------------------------------------------------------------- through the backend


def _click(x: float = 45.0, y: float = 40.0) -> dict[str, Any]:
    return {
        "result": [
            {
                "type": "keypointlabels",
                "from_name": "kp",
                "to_name": "image",
                "is_positive": True,
                "value": {"x": x, "y": y, "keypointlabels": ["Foreground"]},
            }
        ]
    }


BACKEND_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="Foreground"/></BrushLabels>'
    '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Foreground"/>'
    "</KeyPointLabels></View>"
)


def run_backend_prompts(
    size: str,
    images: int,
    hw: tuple[int, int],
    cache_mb: int,
    threads: int,
    tmp: Path,
    annotators: int = 4,
    clicks: int = 4,
    worker_counts: tuple[int, ...] = (1, 2),
    lanes: tuple[bool, ...] = (False, True),
) -> dict[str, Any]:
    """Clicks through the backend (its Flask app in this process, real Redis, real
    ``sam2unet-assist worker`` processes, images from loopback): per click the time from the
    request to the answer. ``cold``: the first click on an image nobody opened; ``prewarmed``:
    the first click after the task was opened (a one-task /predict) and its prewarm finished;
    ``hit``: a later click. Then ``annotators`` simulated annotators at once, each opening
    ``clicks``-click images one after another (prewarm off: each first click is an encode), on
    1 and 2 workers, with the prompt lane off and on. And each worker's resident memory."""
    import redis as redis_lib

    from backend.app import create_app
    from bench.measure import summary
    from bench.stack import PRODUCTION_WORKER, BenchWorker, FileServer, worker_env, write_images
    from contracts.routing import PREWARM_PENDING_PREFIX, ROUTE_PREFIX
    from contracts.settings import Settings
    from launcher.redis_server import EmbeddedRedis
    from modelstore.bootstrap import ensure_current_version
    from modelstore.registry import ModelRegistry
    from sam2unet.random_weights import write_random_sam2_checkpoint

    model_dir = tmp / f"backend-prompts-{size}"
    write_random_sam2_checkpoint(model_dir / "base" / f"sam2.1_hiera_{size}.pt", size)
    ensure_current_version(
        ModelRegistry(model_dir, None), Settings(model_size=size, model_dir=model_dir)
    )
    total = images * 3 + annotators * clicks * 8
    paths = write_images(tmp / f"prompt-images-{size}", total, hw[0], hw[1], seed=5, fmt="png")
    files = FileServer(paths[0].parent)
    urls = iter(files.url_of(p) for p in paths)
    out: dict[str, Any] = {"size": size, "image_hw": list(hw), "cache_mb": cache_mb}
    logs = tmp / "prompt-logs"
    logs.mkdir(exist_ok=True)

    def body(url: str, context: Any) -> dict[str, Any]:
        return {
            "tasks": [{"id": 1, "data": {"image": url}}],
            "label_config": BACKEND_CONFIG,
            "params": {"context": context},
        }

    with EmbeddedRedis() as server:
        conn = redis_lib.Redis.from_url(server.url)

        def stack(workers: int, lane: bool, prewarm: bool):
            conn.flushdb()
            ModelRegistry(model_dir, conn).current()
            env = worker_env(server.url, model_dir, size, 352, 1, threads, "cpu")
            env.update(
                SAM2UNET_EMBEDDING_CACHE_MB=str(cache_mb),
                SAM2UNET_PROMPT_LANE="1" if lane else "0",
                SAM2UNET_PREWARM="1" if prewarm else "0",
                LOG_LEVEL="WARNING",
            )
            procs = [
                BenchWorker(env, f"pw{i}-{os.getpid()}", logs, module=PRODUCTION_WORKER)
                for i in range(workers)
            ]
            for p in procs:
                p.wait_ready(conn)
            app = create_app(Settings.from_env(env), conn)
            return procs, app

        def timed(client, url: str, context: Any) -> float:
            t0 = time.perf_counter()
            r = client.post("/predict", json=body(url, context))
            dt = time.perf_counter() - t0
            res = r.get_json()["results"][0]
            assert r.status_code == 200 and res["result"], res
            return dt

        # one annotator: cold, prewarmed and cache-hit clicks
        procs, app = stack(1, True, True)
        client = app.test_client()
        mem = [procs[0].memory_mb()]
        cold, warm, hit = [], [], []
        try:
            timed(client, next(urls), _click())  # warm-up
            for _ in range(images):
                url = next(urls)
                cold.append(timed(client, url, _click()))
                hit.append(timed(client, url, _click(55.0, 50.0)))
                url = next(urls)
                client.post("/predict", json=body(url, None))  # the task is opened
                key = ROUTE_PREFIX
                deadline = time.monotonic() + 600
                while conn.keys(PREWARM_PENDING_PREFIX + "*") and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert conn.keys(key + "*")
                warm.append(timed(client, url, _click()))
                hit.append(timed(client, url, _click(55.0, 50.0)))
            mem.append(procs[0].memory_mb())
        finally:
            for p in procs:
                p.stop()
        out["one_annotator_ms"] = {
            "cold": summary(cold, 1000.0),
            "prewarmed": summary(warm, 1000.0),
            "hit": summary(hit, 1000.0),
        }
        out["worker_rss_mb"] = {"loaded": mem[0], "after": mem[1]}

        # several annotators at once
        from concurrent.futures import ThreadPoolExecutor

        def annotator(app, n_images: int) -> tuple[list[float], list[float]]:
            c = app.test_client()
            firsts, hits = [], []
            for _ in range(n_images):
                url = next(urls)
                firsts.append(timed(c, url, _click()))
                for k in range(clicks - 1):
                    time.sleep(0.2)  # the annotator looks at the answer
                    hits.append(timed(c, url, _click(50.0 + k, 45.0)))
            return firsts, hits

        many: dict[str, Any] = {}
        for workers in worker_counts:
            for lane in lanes:
                procs, app = stack(workers, lane, False)
                try:
                    timed(app.test_client(), next(urls), _click())  # warm-up
                    with ThreadPoolExecutor(annotators) as pool:
                        done = [
                            f.result()
                            for f in [pool.submit(annotator, app, 2) for _ in range(annotators)]
                        ]
                finally:
                    for p in procs:
                        p.stop()
                many[f"{workers} worker(s), lane {'on' if lane else 'off'}"] = {
                    "first_ms": summary([x for f, _ in done for x in f], 1000.0),
                    "hit_ms": summary([x for _, h in done for x in h], 1000.0),
                }
        out["annotators"] = annotators
        out["several_annotators_ms"] = many
        conn.close()
    files.close()
    return out
