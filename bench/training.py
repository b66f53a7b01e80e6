"""Section 5: training throughput of a round against the bare train step, and peak memory.

Run in its own process (``python -m bench.training``, started by the bench command) so that
its peak RSS is training's alone. Both measurements use the same model size, image size,
batch and device:

* bare step: forward, deep-supervision loss, backward and AdamW step on one pre-made batch
  already on the device, repeated (what the hardware allows);
* round: :func:`sam2unet.training.train` exactly as the trainer's round calls it (no output
  folder, no validation inside, ``num_workers=0``) over synthetic samples stored at their
  own size, so that every epoch decodes nothing but resizes, flips and normalises each sample
  in the data loader.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from bench.measure import peak_rss_mb, repeat_timed

log = logging.getLogger(__name__)


def bare_steps(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    steps: int,
    bf16: bool,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
) -> list[float]:
    """Seconds per train step on a fixed batch (one warm-up step untimed)."""
    from sam2unet.modeling.loss import BCEMode, deep_supervision_loss

    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    cast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (lambda: nullcontext())
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with cast():
            outputs = model(x)
        loss = deep_supervision_loss([o.float() for o in outputs], y, BCEMode.AS_RELEASED.value)
        loss.backward()
        optimizer.step()
        float(loss.detach())  # the training loop reads the loss every step

    return repeat_timed(step, device, warmup=1, repeats=steps)


def run(
    size: str,
    image_size: int,
    batch: int,
    samples: int,
    epochs: int,
    source_hw: tuple[int, int],
    device_name: str,
    threads: int,
    bf16: bool,
) -> dict[str, Any]:
    """Both measurements in this process; returns the section's numbers."""
    from sam2unet.checkpoints import BaseRef, LoadedModel
    from sam2unet.config import ModelConfig
    from sam2unet.data import ArraySource, SegmentationDataset
    from sam2unet.predictor import pick_device
    from sam2unet.random_weights import random_model
    from sam2unet.synthetic import generate
    from sam2unet.train_config import TrainConfig
    from sam2unet.training import train

    torch.set_num_threads(threads)
    device = pick_device(device_name)
    use_bf16 = bf16 and device.type == "cuda"
    config = ModelConfig(size=size, image_size=image_size)
    data = SegmentationDataset(
        ArraySource(generate(samples, source_hw, seed=7)), image_size, train=True
    )
    # the bare step: one batch made once, on the device
    xs, ys = zip(*(data[i] for i in range(min(batch, len(data)))), strict=True)
    x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
    steps = max(2, samples * epochs // batch)
    model = random_model(config, seed=0).model
    times = bare_steps(model, x, y, device, steps, use_bf16)
    bare_ips = x.shape[0] / statistics.median(times)
    del model

    # the round: a fresh model, trained as the trainer does
    loaded = random_model(config, seed=0)
    # a round's model has a base checkpoint: name one so nothing embeds the trunk
    loaded = LoadedModel(loaded.model, config, BaseRef("bench-trunk.pt", "0" * 64), "random")
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch, device=device_name, bf16=bf16, progress_bar=False
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = train(loaded, data, None, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    round_ips = samples * epochs / seconds
    out: dict[str, Any] = {
        "size": size,
        "image_size": image_size,
        "batch": batch,
        "samples": samples,
        "epochs": epochs,
        "source_hw": list(source_hw),
        "device": str(device),
        "dtype": "bf16" if use_bf16 else "fp32",
        "bare_step_seconds": times,
        "bare_images_per_s": bare_ips,
        "round_seconds": seconds,
        "round_epoch_seconds": [r.seconds for r in result.history],
        "round_images_per_s": round_ips,
        "ratio": round_ips / bare_ips,
        "peak_rss_mb": peak_rss_mb(),
    }
    if device.type == "cuda":
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_in_subprocess(
    size: str,
    image_size: int,
    batch: int,
    samples: int,
    epochs: int,
    source_hw: tuple[int, int],
    device: str,
    threads: int,
    bf16: bool,
    timeout: float = 7200.0,
) -> dict[str, Any]:
    """:func:`run` in a fresh ``python -m bench.training`` process."""
    from bench.stack import ROOT

    args = [
        sys.executable, "-m", "bench.training",
        "--size", size, "--image-size", str(image_size), "--batch", str(batch),
        "--samples", str(samples), "--epochs", str(epochs),
        "--source-hw", f"{source_hw[0]}x{source_hw[1]}",
        "--device", device, "--threads", str(threads),
    ]  # fmt: skip
    if bf16:
        args.append("--bf16")
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"bench.training failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__)
    parser.add_argument("--size", default="test")
    parser.add_argument("--image-size", type=int, default=352)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--source-hw", default="480x640", help="stored sample size, HxW")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    h, w = (int(v) for v in a.source_hw.lower().split("x"))
    out = run(
        a.size, a.image_size, a.batch, a.samples, a.epochs, (h, w), a.device, a.threads, a.bf16
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
