"""Settings, read once from the environment at each service's entry point and passed down.

The Label Studio ML backend ecosystem's names are used where they exist (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``, ``REDIS_URL``, ``MODEL_DIR``, ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``,
``LOG_LEVEL``); everything specific to this service is prefixed ``SAM2UNET_``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _tuple(v: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in v.split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    """All configuration of the backend, workers and trainer. See docs/configuration.md."""

    # Label Studio
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    # infrastructure
    redis_url: str = "redis://127.0.0.1:6379/0"
    model_dir: Path = Path("models")
    data_dir: Path | None = None  # derived training data cache; default MODEL_DIR/dataset
    log_level: str = "INFO"
    # backend
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    predict_deadline: float = 80.0  # seconds; Label Studio gives up after 100 s
    # shared secret every /webhook must carry (X-Sam2unet-Webhook-Secret or Bearer); None: open
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_max_bytes: int = 1024 * 1024  # largest /webhook (and /train) body; larger: 413
    # model / worker
    model_size: str = "tiny"
    image_size: int = 352
    device: str = "auto"
    batch_size: int = 8
    cpu_batch_size: int = 1  # images per forward pass on a CPU (0: batch_size)
    bf16: bool = False
    torch_threads: int = 0  # CPU threads for torch in workers and trainer; 0 = torch's default
    init_checkpoint: str | None = None
    job_timeout: int = 120  # seconds one job may run before rq kills it
    job_lease: int = 15  # seconds a dead worker's job stays claimed before it is retried
    job_retries: int = 2
    # seconds: most time between two tries to load a version that failed to load (doubling
    # from 1 s); the worker keeps serving the version it holds meanwhile
    reload_retry_max: float = 300.0
    result_ttl: int = 300  # seconds results stay in Redis
    cache_ttl: int = 7 * 24 * 3600  # result cache per (image hash, model version)
    threshold: float = 0.5
    embedding_cache_mb: int = 256  # SAM2 image features kept per worker for later prompts
    # glibc: allocations from this size (MiB) get mappings of their own, returned whole when
    # freed (an image encode's activations); 0 keeps glibc's sliding default
    mmap_threshold_mb: int = 16
    # compute an image's SAM2 features when its task is opened, before the first click
    prewarm: bool = True
    # a thread per worker answering clicks on images whose features it holds during encodes
    prompt_lane: bool = True
    # image fetching
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    fetch_timeout: float = 15.0
    allow_private_urls: bool = False
    allow_hosts: tuple[str, ...] = ()
    # a presigned URL that Label Studio's storage endpoint redirects to may be on a private address
    allow_private_storage: bool = False
    local_files_roots: tuple[str, ...] = ()
    # trainer
    train_min_new: int = 10  # corrections that start a round
    train_min_samples: int = 4  # fewest annotated tasks worth a round
    train_interval_min: float = 30.0  # minutes; a round then runs if anything changed
    train_debounce: float = 5.0  # seconds of quiet that close a burst of webhooks
    train_epochs: int = 10
    train_batch_size: int = 4
    train_lr: float = 1e-3
    train_holdout: float = 0.2  # share of annotated tasks held out for evaluation
    promote_metric: str = "miou"
    holdout_min: int = 5  # fewest held-out tasks (while at most half of them)
    promote_tolerance: float = 0.01  # promote if not worse by more than this (see promote_conf.)
    promote_confidence: float = 0.9  # confidence of the paired bootstrap's lower bound
    active_learning: bool = True  # after a promotion, re-predict unlabeled tasks
    # a finished pre-annotation run points its project's model version at the run's version
    set_project_version: bool = True
    train_devices: str = ""  # processes of a round: auto, cuda:0,cuda:1, cpu:N; empty: one
    train_nodes: int = 1  # machines in a round: the trainer's and TRAIN_NODES - 1 train agents'
    train_rdzv: str = ""  # host:port where they meet (the trainer's); default <host name>:29400
    train_join_timeout: float = 600.0  # seconds a round waits for its train agents
    train_addr: str = ""  # this machine's address for the other machines; default its host name
    train_cron: str = ""  # scheduled rounds: "EXPR" for every project, "; PROJECT=EXPR" each
    train_backoff: float = 60.0  # seconds before a project's failed round is tried again ...
    train_backoff_max: float = 3600.0  # ... doubling after each failure in a row, up to this
    trainer_consumer: str = ""  # the trainer's name on the event stream; default its host name
    trainer_claim_idle: float = 300.0  # seconds before another trainer's unacked events are taken
    acquisition: str = "confidence"  # prediction score: random, confidence, tta or diverse
    diverse_batch: int = 20  # diverse pre-annotation runs: suggestions spread out per batch
    diverse_depth: int = 2000  # ... over the first this many ranks; the rest by uncertainty
    # predictions per call of Label Studio's bulk import (POST /api/projects/<id>/import/predictions)
    write_batch: int = 500
    # the trainer's sync: an incremental read starts this many seconds before the last sync's
    # start (writes under way then); a full read of the project every this many seconds
    sync_margin: float = 300.0
    sync_full_every: float = 86400.0
    # annotations holding smart keypoints/rectangles but no mask of their label (submitted
    # before the suggestion was accepted): masks derived from them with SAM2's head (true), or
    # the annotations skipped and counted (false)
    derive_prompt_masks: bool = True

    _ENV: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # numpy (through sam2unet.acquisition): not loaded by importing the settings, which the
        # command line and the backend's gunicorn master do
        from sam2unet.acquisition import STRATEGIES

        if self.acquisition not in STRATEGIES:
            raise ValueError(
                f"invalid SAM2UNET_ACQUISITION {self.acquisition!r}; one of {list(STRATEGIES)}"
            )
        if not 0.5 <= self.promote_confidence < 1.0:
            raise ValueError(
                f"invalid SAM2UNET_PROMOTE_CONFIDENCE {self.promote_confidence}: need 0.5 <= c < 1"
            )
        if self.diverse_batch < 1 or self.diverse_depth < 0:
            raise ValueError("SAM2UNET_DIVERSE_BATCH must be >= 1 and SAM2UNET_DIVERSE_DEPTH >= 0")
        if self.train_nodes < 1 or self.train_join_timeout <= 0:
            raise ValueError(
                "SAM2UNET_TRAIN_NODES must be >= 1 and SAM2UNET_TRAIN_JOIN_TIMEOUT > 0"
            )
        if self.write_batch < 1:
            raise ValueError(f"invalid SAM2UNET_WRITE_BATCH {self.write_batch}: need >= 1")
        if self.webhook_max_bytes < 1:
            raise ValueError(f"invalid SAM2UNET_WEBHOOK_MAX_BYTES {self.webhook_max_bytes}")
        if not 0 <= self.train_backoff <= self.train_backoff_max or self.trainer_claim_idle <= 0:
            raise ValueError(
                "need 0 <= SAM2UNET_TRAIN_BACKOFF <= SAM2UNET_TRAIN_BACKOFF_MAX and "
                "SAM2UNET_TRAINER_CLAIM_IDLE > 0"
            )
        if self.holdout_min < 0:
            raise ValueError(f"invalid SAM2UNET_HOLDOUT_MIN {self.holdout_min}: need >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``env`` (default ``os.environ``); ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name.startswith("_"):
                continue
            name = _ENV_NAMES.get(f.name, "SAM2UNET_" + f.name.upper())
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _convert(f.name, raw)
            except ValueError as e:
                raise ValueError(f"invalid {name}: {e}") from e
        values.update(overrides)
        if values.get("label_studio_url"):
            values["label_studio_url"] = str(values["label_studio_url"]).rstrip("/")
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def dataset_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.model_dir / "dataset"

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)


_ENV_NAMES = {
    "label_studio_url": "LABEL_STUDIO_URL",
    "label_studio_api_key": "LABEL_STUDIO_API_KEY",
    "redis_url": "REDIS_URL",
    "model_dir": "MODEL_DIR",
    "log_level": "LOG_LEVEL",
    "basic_auth_user": "BASIC_AUTH_USER",
    "basic_auth_pass": "BASIC_AUTH_PASS",
}


def _convert(name: str, raw: str) -> Any:
    default = Settings.__dataclass_fields__[name].default
    if name in ("model_dir", "data_dir"):
        return Path(raw)
    if isinstance(default, bool):
        return _bool(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, tuple):
        return _tuple(raw)
    return raw
