"""``python -m bench``: every section on this machine in one run; writes
``<out>/latest.json`` and ``<out>/latest.md``. See docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

SECTIONS = ("forward", "e2e", "queue", "train", "baseline", "prompts")
LARGE_SIZES = ("small", "base_plus", "large")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _hw(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


@dataclass
class BenchOptions:
    """Everything a run measures; the defaults are the documented run."""

    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    sizes: list[str] = field(default_factory=lambda: ["test", "tiny"])
    image_size: int = 352
    batches: list[int] = field(default_factory=lambda: [1, 4, 8])
    device: str = "auto"
    threads: int = 0  # 0: every usable core
    warmup: int = -1  # -1: 1 on a CPU, 5 on a GPU
    repeats: int = 3
    min_seconds: float = -1.0  # -1: 0 on a CPU, 1 s on a GPU
    image_hw: tuple[int, int] = (480, 640)
    e2e_size: str = "tiny"
    e2e_batch: int = 8
    cpu_batch: int = 1  # the workers' SAM2UNET_CPU_BATCH_SIZE (0: e2e_batch)
    e2e_images: int = 32
    e2e_workers: int = 1
    bf16: bool = False
    single_tasks: int = 5
    noop_requests: int = 200
    echo_requests: int = 200
    train_size: str = "test"
    train_image_size: int = 0  # 0: image_size
    train_batch: int = 4
    train_samples: int = 16
    train_epochs: int = 2
    baseline_images: int = 16
    prompt_size: str = "tiny"
    prompt_images: int = 8
    prompt_cache_mb: int = 64
    out: Path = Path(__file__).resolve().parent / "results"

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        """Minimal sizes: every section in seconds (the smoke test's run)."""
        values: dict[str, Any] = dict(
            sizes=["test"],
            image_size=64,
            batches=[1, 2],
            repeats=2,
            image_hw=(96, 128),
            e2e_size="test",
            e2e_batch=2,
            e2e_images=4,
            single_tasks=2,
            noop_requests=20,
            echo_requests=20,
            train_batch=2,
            train_samples=4,
            train_epochs=1,
            baseline_images=2,
            prompt_size="test",
            prompt_images=2,
            prompt_cache_mb=1,
        )
        values.update(overrides)
        return cls(**values)


def parse_args(argv: Sequence[str] | None) -> BenchOptions:
    d = BenchOptions()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="minimal sizes (seconds; smoke test)")
    p.add_argument("--sections", type=_names, help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--sizes", type=_names, help=f"model sizes (default {','.join(d.sizes)})")
    p.add_argument(
        "--large-sizes", action="store_true", help=f"also {', '.join(LARGE_SIZES)} (slow on CPU)"
    )
    p.add_argument("--image-size", type=int, help=f"network input side (default {d.image_size})")
    p.add_argument("--batches", type=_ints, help="forward batch sizes (default 1,4,8)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, help="torch CPU threads everywhere (default: all cores)")
    p.add_argument("--warmup", type=int, help="untimed forward calls per measurement")
    p.add_argument("--repeats", type=int, help="timed forward calls per measurement (at least)")
    p.add_argument("--min-seconds", type=float, help="measure each forward at least this long")
    p.add_argument("--image-hw", type=_hw, help="task image size HxW (default 480x640)")
    p.add_argument("--e2e-size", help="model size of the serving sections (default tiny)")
    p.add_argument("--e2e-batch", type=int, help="worker batch size (default 8)")
    p.add_argument(
        "--cpu-batch",
        type=int,
        help="images per forward pass of a CPU worker (SAM2UNET_CPU_BATCH_SIZE; default 1, "
        "0: --e2e-batch)",
    )
    p.add_argument("--e2e-images", type=int, help="tasks in the throughput run (default 32)")
    p.add_argument("--e2e-workers", type=int, help="worker processes (default 1)")
    p.add_argument(
        "--bf16", action="store_true", help="workers and training use bf16 autocast (CUDA only)"
    )
    p.add_argument("--single-tasks", type=int, help="1-task requests for the stage breakdown")
    p.add_argument("--noop-requests", type=int, help="1-task requests to the no-op worker")
    p.add_argument("--echo-requests", type=int, help="round trips through bare rq")
    p.add_argument("--train-size", help="model size of the training section (default test)")
    p.add_argument("--train-image-size", type=int, help="default: --image-size")
    p.add_argument("--train-batch", type=int)
    p.add_argument("--train-samples", type=int)
    p.add_argument("--train-epochs", type=int)
    p.add_argument("--baseline-images", type=int)
    p.add_argument("--prompt-size", help="model size of the prompts section (default tiny)")
    p.add_argument("--prompt-images", type=int, help="images prompted twice (default 8)")
    p.add_argument("--prompt-cache-mb", type=int, help="worker embedding cache (default 64)")
    p.add_argument("--out", type=Path, help="results folder (default bench/results)")
    a = vars(p.parse_args(argv))
    quick, large = a.pop("quick"), a.pop("large_sizes")
    given = {k: v for k, v in a.items() if v is not None and v is not False}
    opts = BenchOptions.quick(**given) if quick else BenchOptions(**given)
    if large:
        opts.sizes = [*opts.sizes, *(s for s in LARGE_SIZES if s not in opts.sizes)]
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return opts


def run(opts: BenchOptions, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Run the selected sections; the results as one JSON-ready dict."""
    import torch

    from bench.measure import load_average, machine_info, usable_cores
    from sam2unet.predictor import pick_device

    threads = opts.threads or usable_cores()
    torch.set_num_threads(threads)
    device = pick_device(opts.device)
    gpu = device.type == "cuda"
    if opts.min_seconds < 0:
        opts.min_seconds = 1.0 if gpu else 0.0
    if opts.warmup < 0:
        opts.warmup = 5 if gpu else 1
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench", *argv]),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "machine": machine_info(device, threads),
        "load_start": load_average(),
        "started": time.time(),
        "section_seconds": {},
    }
    log.info("load average at start: %s", results["load_start"])

    def timed_section(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        if name not in opts.sections:
            return
        t0 = time.perf_counter()
        log.info("section %s ...", name)
        results[name] = fn()
        results["section_seconds"][name] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="sam2unet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        from bench.sections import SectionRunner

        runner = SectionRunner(opts, device, threads, opts.min_seconds, tmp)
        timed_section("forward", runner.forward)
        if {"e2e", "queue"} & set(opts.sections):
            with runner.stack():
                timed_section("e2e", runner.e2e)
                timed_section("queue", runner.queue)
        timed_section("baseline", runner.baseline)
        timed_section("train", runner.train)
        timed_section("prompts", runner.prompts)
    results["load_end"] = load_average()
    results["finished"] = time.time()
    log.info("load average at end: %s", results["load_end"])
    return results


def write_results(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    from bench.report import to_markdown

    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "latest.json", out / "latest.md"
    js.write_text(json.dumps(results, indent=1) + "\n")
    md.write_text(to_markdown(results))
    return js, md


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    opts = parse_args(argv)
    results = run(opts, argv)
    js, md = write_results(results, opts.out)
    print(md.read_text())
    print(f"written: {md} and {js}")
    return 0
