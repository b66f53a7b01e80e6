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
    from contracts.bootstrap import ensure_current_version
    from contracts.jobs import PredictItem, PredictPayload
    from contracts.registry import ModelRegistry
    from contracts.settings import Settings
    from labelstudio.labelconfig import Target, target_to_json
    from worker.pipeline import run_predict
    from worker.runtime import ModelRuntime

    torch.set_num_threads(threads)
    start = proc_memory_mb(os.getpid())
    settings = Settings(
        model_size=size, image_size=352, model_dir=Path(model_dir), device="cpu",
        embedding_cache_mb=cache_mb,
    )  # fmt: skip
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
    from sam2unet.promptable import head_image_size, write_random_sam2_checkpoint

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
