"""Section 1: raw model forward throughput against the FLOP-count limit.

FLOPs per image come from :class:`torch.utils.flop_counter.FlopCounterMode` (one image, the
whole ``SAM2UNet.forward``: trunk, adapters, RFBs, decoder and the three output upsamplings);
the peak is the best FLOP/s of a large square matmul measured in the same run and dtype.
"""

from __future__ import annotations

import gc
import logging
import statistics
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.measure import repeat_timed, sync
from sam2unet.config import ModelConfig
from sam2unet.random_weights import random_model

log = logging.getLogger(__name__)


def _sdpa_flops(q_shape, k_shape, v_shape, *args: Any, **kwargs: Any) -> int:
    """Q K^T and A V of a B x H x L x D attention: 2 multiply-adds per product term."""
    b, h, lq, d = q_shape
    lk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _custom_flop_mapping() -> dict[Any, Any]:
    # On the CPU, attention runs as this op, which the flop counter does not know.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flops} if op is not None else {}


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA; fp32 (no autocast) otherwise."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.inference_mode()
def count_flops(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """FLOPs of one forward pass of one image (multiply-add = 2 FLOPs)."""
    x = torch.randn(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_custom_flop_mapping())
    with counter:
        model(x)
    return int(counter.get_total_flops())


def peak_matmul(
    device: torch.device, dtype: str, n: int | None = None, min_seconds: float = 1.0
) -> dict[str, Any]:
    """Best FLOP/s of an n x n @ n x n matmul (n: 2048 on a CPU, 8192 on a GPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=tdtype)
    b = torch.randn(n, n, device=device, dtype=tdtype)
    times = repeat_timed(lambda: a @ b, device, warmup=1, repeats=3, min_seconds=min_seconds)
    best = min(times)
    return {"n": n, "dtype": dtype, "flops_per_s": 2.0 * n**3 / best, "seconds": best}


def forward_throughput(
    model: torch.nn.Module,
    batch: int,
    image_size: int,
    device: torch.device,
    dtype: str,
    warmup: int,
    repeats: int,
    min_seconds: float,
) -> dict[str, Any]:
    """Images/s of ``model(x)`` for a B x 3 x S x S batch already on the device."""
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def step() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = repeat_timed(step, device, warmup, repeats, min_seconds)
    med = statistics.median(times)
    row = {
        "batch": batch,
        "dtype": dtype,
        "seconds": times,
        "median_s": med,
        "images_per_s": batch / med,
    }
    if device.type == "cuda":
        row["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def run_forward(
    sizes: list[str],
    batches: list[int],
    image_size: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    min_seconds: float,
) -> dict[str, Any]:
    """The forward section: a peak per dtype, then every (size, dtype, batch)."""
    dtypes = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    peaks = {d: peak_matmul(device, d) for d in dtypes}
    for d, p in peaks.items():
        log.info("peak %s matmul: %.1f GFLOP/s", d, p["flops_per_s"] / 1e9)
    rows = []
    for size in sizes:
        config = ModelConfig(size=size, image_size=image_size)
        model = random_model(config, seed=0).model.to(device).eval()
        flops = count_flops(model, image_size, device)
        for dtype in dtypes:
            for batch in batches:
                row = forward_throughput(
                    model, batch, image_size, device, dtype, warmup, repeats, min_seconds
                )
                achieved = flops * row["images_per_s"]
                row.update(
                    size=size,
                    image_size=image_size,
                    flops_per_image=flops,
                    achieved_flops_per_s=achieved,
                    peak_flops_per_s=peaks[dtype]["flops_per_s"],
                    efficiency=achieved / peaks[dtype]["flops_per_s"],
                )
                log.info(
                    "forward %s b%d %s: %.2f images/s, %.1f%% of peak",
                    size,
                    batch,
                    dtype,
                    row["images_per_s"],
                    100 * row["efficiency"],
                )
                rows.append(row)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sync(device)
    return {
        "peaks": peaks,
        "rows": rows,
        "bf16": "measured" if "bf16" in dtypes else "n/a (no CUDA)",
    }


def raw_images_per_s(section: dict[str, Any], size: str, batch: int, dtype: str) -> float | None:
    """The forward section's throughput for one (size, batch, dtype), if measured."""
    for row in section.get("rows", []):
        if row["size"] == size and row["batch"] == batch and row["dtype"] == dtype:
            return row["images_per_s"]
    return None
