"""The serving stack the end-to-end sections run against: a real embedded Redis, a model
directory bootstrapped like production, task images on disk served from loopback, and
benchmark worker subprocesses (``python -m bench.worker``)."""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import redis
import torch
from PIL import Image

from bench.measure import module_bytes, proc_memory_mb
from tests.support.services import ServiceProcess, folder_server

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="Foreground"/></BrushLabels></View>'
)


def write_images(
    directory: Path, n: int, height: int, width: int, seed: int, fmt: str = "jpeg"
) -> list[Path]:
    """``n`` synthetic scenes (coloured shapes on textured backgrounds) as image files."""
    from sam2unet.synthetic import generate

    directory.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if fmt == "jpeg" else fmt
    paths = []
    for i, (rgb, _) in enumerate(generate(n, (height, width), seed=seed)):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(
            buf, format=fmt.upper(), **({"quality": 90} if ext == "jpg" else {})
        )
        path = directory / f"img-{seed}-{i:05d}.{ext}"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


class FileServer:
    """Serves a folder on 127.0.0.1 (a stand-in for Label Studio's upload URLs)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._server = folder_server(directory)
        self.url = self._server.url

    def url_of(self, path: Path) -> str:
        return f"{self.url}/{path.relative_to(self.directory).as_posix()}"

    def close(self) -> None:
        self._server.close()


def prepare_model_dir(
    model_dir: Path, size: str, image_size: int, calibrate_on: list[np.ndarray] | None
) -> dict[str, float | str]:
    """Bootstrap ``model_dir`` as a worker would (random trunk written as the base checkpoint,
    first version promoted), then a second version, promoted: with ``calibrate_on`` images,
    its output bias puts the median probability on those images at 0.5, so that masks are not
    empty and the encoding stage does real work (an untrained head predicts nothing)."""
    from contracts.settings import Settings
    from modelstore.bootstrap import ensure_current_version
    from modelstore.registry import ModelRegistry
    from sam2unet.predictor import Predictor

    settings = Settings(model_size=size, image_size=image_size, model_dir=model_dir)
    registry = ModelRegistry(model_dir, None)
    first = ensure_current_version(registry, settings)
    loaded = registry.load(first.name)
    info: dict[str, float | str] = {
        "version": first.name,
        "model_mb": module_bytes(loaded.model) / 2**20,
    }
    if calibrate_on:
        predictor = Predictor(loaded.model, loaded.config, device="cpu", batch_size=4)
        probs = np.concatenate([p.ravel() for p in predictor.predict(calibrate_on)])
        median = float(np.clip(np.median(probs), 1e-6, 1 - 1e-6))
        with torch.no_grad():
            loaded.model.head.bias -= math.log(median / (1 - median))
    # promoted as a trained version either way: the first one's decoder is recorded as never
    # trained, and such a version skips the automatic path the benchmarks measure
    v = registry.create_version(
        loaded.model, loaded.config, loaded.base, parent=first.name, source="bench"
    )
    reason = "output bias calibrated" if calibrate_on else "the first version, as trained"
    registry.promote(v.name, reason=f"bench: {reason}")
    info["version"] = v.name
    return info


def worker_env(
    redis_url: str,
    model_dir: Path,
    size: str,
    image_size: int,
    batch_size: int,
    threads: int,
    device: str,
    bf16: bool = False,
    cpu_batch: int = 1,
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SAM2UNET_", "LABEL_STUDIO"))
        and k not in ("REDIS_URL", "MODEL_DIR", "OMP_NUM_THREADS")
    }
    env.update(
        REDIS_URL=redis_url,
        MODEL_DIR=str(model_dir),
        SAM2UNET_MODEL_SIZE=size,
        SAM2UNET_IMAGE_SIZE=str(image_size),
        SAM2UNET_BATCH_SIZE=str(batch_size),
        SAM2UNET_CPU_BATCH_SIZE=str(cpu_batch),
        SAM2UNET_TORCH_THREADS=str(threads),
        SAM2UNET_DEVICE=device,
        SAM2UNET_BF16="1" if bf16 else "0",
        SAM2UNET_ALLOW_HOSTS="127.0.0.1",
        SAM2UNET_JOB_TIMEOUT="7200",
        SAM2UNET_PREDICT_DEADLINE="86400",
        OMP_NUM_THREADS=str(threads),
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    return env


PRODUCTION_WORKER = ("cli", "worker")


class BenchWorker(ServiceProcess):
    """One ``python -m bench.worker`` subprocess (own process group), its log in a file;
    ``module=PRODUCTION_WORKER`` runs ``sam2unet-assist worker`` itself instead."""

    stop_waits = (30.0, 30.0)
    ready_poll = 0.05

    def __init__(
        self,
        env: dict[str, str],
        name: str,
        log_dir: Path,
        *args: str,
        module: tuple[str, ...] = ("bench.worker",),
    ) -> None:
        super().__init__(["--name", name, *args], env, name, log_dir, module=module)

    def wait_ready(self, conn: redis.Redis, timeout: float = 600.0) -> None:
        super().wait_ready(conn, timeout)

    def memory_mb(self) -> dict[str, float]:
        return proc_memory_mb(self.proc.pid)
