"""The sections of a bench run, sharing one set of task images and one serving stack."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis
import torch

from bench.forward import forward_throughput, raw_images_per_s, run_forward
from bench.measure import summary

log = logging.getLogger(__name__)


class SectionRunner:
    """Runs each section with the options of one bench run (see :class:`bench.cli.BenchOptions`)."""

    def __init__(
        self, opts: Any, device: torch.device, threads: int, min_seconds: float, tmp: Path
    ) -> None:
        self.opts = opts
        self.device = device
        self.threads = threads
        self.min_seconds = min_seconds
        self.tmp = tmp
        self.images_dir = tmp / "images"
        self.forward_result: dict[str, Any] | None = None
        self._images: dict[str, list[Path]] = {}
        self._ctx: dict[str, Any] = {}
        self._e2e_images_per_s: float | None = None

    # ------------------------------------------------------------------ shared inputs

    def images(self, kind: str) -> list[Path]:
        """Task image files: ``warm`` (one batch), ``main`` (the throughput run), ``single``
        (1-task requests) at ``image_hw``; ``small`` (no-op requests) at 64 x 64 PNG."""
        if kind not in self._images:
            from bench.stack import write_images

            o = self.opts
            h, w = o.image_hw
            spec = {
                "warm": (o.e2e_batch, h, w, 1, "jpeg"),
                "main": (max(o.e2e_images, o.baseline_images), h, w, 2, "jpeg"),
                "single": (o.single_tasks, h, w, 3, "jpeg"),
                "small": (o.noop_requests + 5, 64, 64, 4, "png"),
            }[kind]
            n, hh, ww, seed, fmt = spec
            self._images[kind] = write_images(self.images_dir / kind, n, hh, ww, seed, fmt)
        return self._images[kind]

    # ------------------------------------------------------------------ 1. forward

    def forward(self) -> dict[str, Any]:
        o = self.opts
        self.forward_result = run_forward(
            o.sizes,
            o.batches,
            o.image_size,
            self.device,
            o.warmup,
            o.repeats,
            self.min_seconds,
        )
        return self.forward_result

    def _raw_now(self, size: str, batch: int, dtype: str, images: int) -> float:
        """Raw forward images/s of a model size and batch, measured now in this process over
        at least as many images as ``images``."""
        from sam2unet.config import ModelConfig
        from sam2unet.random_weights import random_model

        o = self.opts
        model = random_model(ModelConfig(size=size, image_size=o.image_size)).model
        model = model.to(self.device).eval()
        repeats = max(o.repeats, -(-images // batch))
        row = forward_throughput(
            model, batch, o.image_size, self.device, dtype, o.warmup, repeats, self.min_seconds
        )
        return row["images_per_s"]

    # ------------------------------------------------------------------ the stack

    @contextmanager
    def stack(self) -> Iterator[None]:
        """Redis, the image server, model folders and every worker the sections need, started
        together (their start-up overlaps), stopped at the end."""
        from bench.stack import (
            PRODUCTION_WORKER,
            BenchWorker,
            FileServer,
            prepare_model_dir,
            worker_env,
        )
        from launcher.redis_server import EmbeddedRedis
        from sam2unet.transforms import decode_image

        o = self.opts
        want_e2e, want_queue = "e2e" in o.sections, "queue" in o.sections
        with ExitStack() as stack:
            server = stack.enter_context(EmbeddedRedis())
            files = FileServer(self.images_dir)
            stack.callback(files.close)
            log_dir = self.tmp / "logs"
            log_dir.mkdir(exist_ok=True)
            workers: dict[str, list[BenchWorker]] = {}
            envs: dict[str, dict[str, str]] = {}
            dev = str(self.device)

            def url(db: int) -> str:
                return f"redis://127.0.0.1:{server.port}/{db}"

            if want_e2e:
                for kind in ("warm", "main", "single"):
                    self.images(kind)
                calib = [decode_image(p.read_bytes()) for p in self.images("warm")[:2]]
                info = prepare_model_dir(
                    self.tmp / "models-e2e", o.e2e_size, o.image_size, calibrate_on=calib
                )
                self._ctx["e2e_model"] = info
                envs["e2e"] = worker_env(
                    url(1),
                    self.tmp / "models-e2e",
                    o.e2e_size,
                    o.image_size,
                    o.e2e_batch,
                    self.threads,
                    dev,
                    o.bf16,
                    o.cpu_batch,
                )
                workers["e2e"] = [
                    BenchWorker(envs["e2e"], f"bench-e2e-{i}", log_dir)
                    for i in range(o.e2e_workers)
                ]
            if want_queue:
                self.images("small")
                prepare_model_dir(self.tmp / "models-noop", "test", 64, calibrate_on=None)
                envs["noop"] = worker_env(url(2), self.tmp / "models-noop", "test", 64, 1, 1, "cpu")
                envs["echo"] = worker_env(url(3), self.tmp / "models-noop", "test", 64, 1, 1, "cpu")
                workers["noop"] = [
                    BenchWorker(envs["noop"], "bench-noop", log_dir, "--runtime", "noop")
                ]
                workers["echo"] = [BenchWorker(envs["echo"], "bench-echo", log_dir, "--rq-echo")]
                # the production worker command, untouched: its first job after start-up
                envs["cold"] = worker_env(url(4), self.tmp / "models-noop", "test", 64, 1, 1, "cpu")
                workers["cold"] = [
                    BenchWorker(envs["cold"], "bench-cold", log_dir, module=PRODUCTION_WORKER)
                ]
            for procs in workers.values():
                for w in procs:
                    stack.callback(w.stop)
            for kind, procs in workers.items():
                conn = redis.Redis.from_url(envs[kind]["REDIS_URL"])
                for w in procs:
                    w.wait_ready(conn)
            ready_memory = {k: [w.memory_mb() for w in procs] for k, procs in workers.items()}
            self._ctx.update(files=files, workers=workers, envs=envs, ready_memory=ready_memory)
            yield

    def _client(self, kind: str) -> tuple[Any, redis.Redis]:
        from backend.app import create_app
        from contracts.settings import Settings

        env = self._ctx["envs"][kind]
        conn = redis.Redis.from_url(env["REDIS_URL"])
        app = create_app(Settings.from_env(env), conn)
        return app.test_client(), conn

    def _urls(self, kind: str) -> list[str]:
        files = self._ctx["files"]
        return [files.url_of(p) for p in self.images(kind)]

    # ------------------------------------------------------------------ 2 + 4. e2e, stages

    def e2e(self) -> dict[str, Any]:
        from bench.serving import (
            post_predict,
            raw_forward_in_worker,
            single_task_runs,
            stage_summary,
            throughput_run,
        )

        o = self.opts
        client, conn = self._client("e2e")
        post_predict(client, self._urls("warm"))  # first forward passes initialise kernels
        main_urls = self._urls("main")[: o.e2e_images]
        # the ratio's reference: the raw forward of the same model and batch, timed by a worker
        # on its own model over as many images, just before and just after the run (the load
        # of a shared machine drifts); the same measured in this process and section 1's figure
        # are kept beside it
        # images per forward pass in the worker: a CPU worker caps them (SAM2UNET_CPU_BATCH_SIZE)
        per_pass = o.e2e_batch
        if self.device.type == "cpu" and o.cpu_batch > 0:
            per_pass = min(o.e2e_batch, o.cpu_batch)
        calls = max(o.repeats, -(-len(main_urls) // per_pass))
        before = raw_forward_in_worker(conn, per_pass, calls, warmup=0)["seconds"]
        run = throughput_run(client, conn, main_urls, o.e2e_batch)
        memory = [w.memory_mb() for w in self._ctx["workers"]["e2e"]]
        dtype = "bf16" if o.bf16 and self.device.type == "cuda" else "fp32"
        after = raw_forward_in_worker(conn, per_pass, calls, warmup=0)["seconds"]
        raw = per_pass / statistics.median(before + after)
        raw_bench = self._raw_now(o.e2e_size, per_pass, dtype, len(main_urls))
        raw_section1 = raw_images_per_s(self.forward_result or {}, o.e2e_size, per_pass, dtype)
        singles = single_task_runs(client, conn, self._urls("single"))
        model_mb = float(self._ctx["e2e_model"]["model_mb"])
        self._e2e_images_per_s = run["images_per_s"]
        return {
            "size": o.e2e_size,
            "image_size": o.image_size,
            "batch": o.e2e_batch,
            "per_pass": per_pass,
            "workers": o.e2e_workers,
            "dtype": dtype,
            "image_hw": list(o.image_hw),
            "throughput": run,
            "raw_images_per_s": raw,
            "raw_seconds_in_worker": {"before": before, "after": after},
            "raw_images_per_s_bench_process": raw_bench,
            "raw_images_per_s_section1": raw_section1,
            "ratio": run["images_per_s"] / raw,
            # e2e throughput over what the worker's own forward passes allowed: immune to
            # load drift between the run and the raw measurement
            "ratio_to_worker_forward": run["model_seconds"] / run["seconds"],
            "single_task_ms": stage_summary(singles),
            "worker_memory_mb": memory,
            "worker_ready_memory_mb": self._ctx["ready_memory"]["e2e"],
            "model_mb": model_mb,
            "worker_rss_over_model_mb": max(m.get("hwm", 0.0) for m in memory) - model_mb,
        }

    # ------------------------------------------------------------------ 3. queue

    def queue(self) -> dict[str, Any]:
        from bench.serving import (
            post_predict,
            rq_echo_round_trips,
            single_task_runs,
            stage_summary,
        )

        o = self.opts
        client, conn = self._client("noop")
        urls = self._urls("small")
        single_task_runs(client, conn, urls[:5])  # warm-up
        before = conn.info("commandstats")
        runs = single_task_runs(client, conn, urls[5 : 5 + o.noop_requests])
        commands = redis_commands_per_request(before, conn.info("commandstats"), len(runs))
        echo_conn = redis.Redis.from_url(self._ctx["envs"]["echo"]["REDIS_URL"])
        echo = rq_echo_round_trips(echo_conn, o.echo_requests)
        # the first requests to a production worker that has just announced itself ready
        cold_client, _ = self._client("cold")
        cold = [post_predict(cold_client, [u])["seconds"] for u in urls[-6:]]
        return {
            "noop_requests": len(runs),
            "noop_ms": stage_summary(runs),
            "redis_commands_per_request": commands,
            "rq_echo_ms": summary(echo, 1000.0),
            "cold_start_ms": {
                "first": cold[0] * 1000.0,
                "next": summary(cold[1:], 1000.0),
            },
        }

    # ------------------------------------------------------------------ 5. training

    def train(self) -> dict[str, Any]:
        from bench.training import run_in_subprocess

        o = self.opts
        return run_in_subprocess(
            o.train_size,
            o.train_image_size or o.image_size,
            o.train_batch,
            o.train_samples,
            o.train_epochs,
            o.image_hw,
            str(self.device),
            self.threads,
            o.bf16,
        )

    # ------------------------------------------------------------------ 6. baseline

    def baseline(self) -> dict[str, Any]:
        from bench.baseline import run_baseline

        o = self.opts
        paths = self.images("main")[: o.baseline_images]
        out = run_baseline(
            o.e2e_size, o.image_size, o.e2e_batch, paths, self.device, self.images("warm")[:2]
        )
        out["worker_images_per_s"] = self._e2e_images_per_s
        return out

    # ------------------------------------------------------------------ 7. prompts

    def prompts(self) -> dict[str, Any]:
        from bench.prompts import run_prompts

        o = self.opts
        return run_prompts(
            o.prompt_size, o.prompt_images, o.image_hw, o.prompt_cache_mb, self.threads, self.tmp
        )


def redis_commands_per_request(
    before: dict[str, Any], after: dict[str, Any], requests: int
) -> dict[str, float]:
    """Redis commands per request, by command, from two ``INFO commandstats`` snapshots (the
    whole server: idle workers' blocking pops and maintenance are a small share)."""
    out: dict[str, float] = {}
    for key, stats in after.items():
        calls = stats["calls"] - before.get(key, {}).get("calls", 0)
        if calls > 0:
            out[key.removeprefix("cmdstat_")] = calls / max(1, requests)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
