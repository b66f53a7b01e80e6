"""Training step throughput of N data-parallel processes against one, same global batch.

``python -m bench.distributed [--devices cpu:2] [--size test] [--image-size 128] ...``

One process runs :func:`sam2unet.training.train` with all the machine's CPU threads (or on one
GPU); N processes run :func:`sam2unet.parallel_training.train_parallel` with the threads divided among
them (or one GPU each). Both train the same synthetic set with the same global batch for a few
epochs without validation; the figure is steps (global batches) per second over the epochs after
the first (the first warms up), read from each epoch's own time, so process start-up and the
rendezvous are not counted. Prints a Markdown table and, with ``--json``, the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any


def measure(
    devices: str,
    size: str,
    image_size: int,
    batch: int,
    images: int,
    epochs: int,
) -> dict[str, Any]:
    import torch

    from sam2unet.config import ModelConfig
    from sam2unet.data import ArraySource, SegmentationDataset
    from sam2unet.distributed.launcher import parse_devices
    from sam2unet.parallel_training import train_parallel
    from sam2unet.random_weights import random_model
    from sam2unet.synthetic import generate
    from sam2unet.train_config import TrainConfig
    from sam2unet.training import train

    plan = parse_devices(devices)
    if plan is None:
        raise SystemExit(f"--devices {devices!r} asks for one process; give cpu:N or GPUs")
    loaded = random_model(ModelConfig(size=size, image_size=image_size), seed=0)
    data = SegmentationDataset(ArraySource(generate(images, image_size, seed=0)), image_size)
    one_device = "cuda:0" if plan.backend == "nccl" else "cpu"
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch, device=one_device, progress_bar=False, seed=0
    )
    steps = math.ceil(images / batch)
    cores = os.cpu_count() or 1

    def rate(history: Sequence[Any]) -> float:
        timed = history[1:]
        return steps * len(timed) / sum(r.seconds for r in timed)

    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    single = train(copy.deepcopy(loaded), data, None, cfg)
    single_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    several = train_parallel(plan, loaded, data, None, cfg, threads=max(1, cores // plan.nprocs))
    several_wall = time.perf_counter() - t0
    load = os.getloadavg()
    return {
        "devices": devices,
        "processes": plan.nprocs,
        "size": size,
        "image_size": image_size,
        "global_batch": batch,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "cores": cores,
        "one_steps_per_s": rate(single.history),
        "n_steps_per_s": rate(several.history),
        "one_wall_s": single_wall,
        "n_wall_s": several_wall,
        "loadavg_1m_after": load[0],
    }


def table(r: dict[str, Any]) -> str:
    speedup = r["n_steps_per_s"] / r["one_steps_per_s"]
    return "\n".join(
        [
            "| processes | steps/s (global batch "
            f"{r['global_batch']}) | images/s | wall time incl. start-up |",
            "|---|---|---|---|",
            f"| 1 | {r['one_steps_per_s']:.3f} | {r['one_steps_per_s'] * r['global_batch']:.1f} "
            f"| {r['one_wall_s']:.0f} s |",
            f"| {r['processes']} ({r['devices']}) | {r['n_steps_per_s']:.3f} | "
            f"{r['n_steps_per_s'] * r['global_batch']:.1f} | {r['n_wall_s']:.0f} s |",
            "",
            f"speed-up {speedup:.2f}x; model {r['size']} at {r['image_size']} px, "
            f"{r['steps_per_epoch']} steps per epoch, epochs 2-{r['epochs']} timed; "
            f"{r['cores']} cores, 1-minute load average {r['loadavg_1m_after']:.1f} after the run",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__)
    p.add_argument("--devices", default="cpu:2", help="the N processes (default cpu:2)")
    p.add_argument("--size", default="test", help="model size (default test)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = measure(a.devices, a.size, a.image_size, a.batch, a.images, a.epochs)
    print(json.dumps(r, indent=1) if a.json else table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
