"""The model of one worker process: loaded once, reloaded between jobs when the registry's
current-version pointer moves."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from contracts.settings import Settings
from modelstore.bootstrap import ensure_current_version
from modelstore.registry import ModelRegistry, VersionInfo
from modelstore.version_heads import decoder_trained, head_checkpoint
from sam2unet.acquisition import acquire
from sam2unet.exceptions import CheckpointError

log = logging.getLogger(__name__)


class ModelRuntime:
    """Holds this process's predictor. ``ensure_current()`` is called between jobs, never
    during one; a version that fails to load is logged and the previous one kept, and its load
    is tried again on a later job after a delay that doubles with each failure, from
    :data:`RELOAD_RETRY_FIRST` seconds up to ``SAM2UNET_RELOAD_RETRY_MAX``."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.version: str | None = None
        self.info: VersionInfo | None = None
        self.predictor: Any = None
        self.labels: tuple[str, ...] = ()
        #: whether the held version's automatic head (U-Net decoder) was ever trained
        self.decoder_trained = True
        self._trunk_cache: dict[str, Any] = {}
        self._failed: dict[str, _FailedLoad] = {}  # versions whose last load failed
        self._lock = threading.Lock()
        self._job_checked = False  # the worker read the pointer for the job now running
        self.loads = 0
        # SAM2's promptable head on the model's trunk, when the base checkpoint carries it
        self.promptable: Any = None
        self.base_sha: str | None = None
        self._heads: dict[str, Any] = {}  # base sha256 -> its PromptHead (None: it has none)
        from worker.embeddings import EmbeddingCache  # imports torch

        self.embeddings = EmbeddingCache(settings.embedding_cache_mb * 2**20)
        self.worker_name: str | None = None  # set by the worker process: routes prompts here
        self._inflight: dict[tuple[str, str], _InFlight] = {}  # features being computed
        self._inflight_lock = threading.Lock()
        self.embed_waits = 0  # calls that waited for another thread's computation

    def begin_job(self) -> str:
        """Called by the worker right before each job: the pointer is read once here, and the
        job's own :meth:`ensure_current` (``in_job=True``) takes this check instead of reading
        it again."""
        self._job_checked = False
        version = self.ensure_current()
        self._job_checked = True
        return version

    def end_job(self) -> None:
        self._job_checked = False

    def ensure_current(self, in_job: bool = False) -> str:
        """Load the registry's current version if it is not the one held; return the held one.

        ``in_job``: called from a job function; when the worker checked the pointer right
        before this job (:meth:`begin_job`), that check stands and Redis is not asked again."""
        if in_job and self._job_checked and self.version is not None:
            return self.version
        name = self.registry.current()
        if name is None:
            name = ensure_current_version(self.registry, self.settings).name
        if name == self.version:
            return name
        failed = self._failed.get(name)
        if failed is not None and time.monotonic() < failed.retry_at:
            return self.version or name
        with self._lock:
            if name != self.version:
                self._load(name)
        return self.version or name

    def _load(self, name: str) -> None:
        from sam2unet.checkpoints import trunk_state_of  # imports torch
        from sam2unet.predictor import Predictor  # imports torch

        t0 = time.perf_counter()
        try:
            loaded = self.registry.load(name, trunk_cache=self._trunk_cache)
            info = self.registry.get(name)
        except Exception as e:
            self._load_failed(name, e)
            if self.predictor is None:
                raise
            return
        predictor = Predictor(
            loaded.model,
            loaded.config,
            device=self.settings.device,
            batch_size=self.settings.batch_size,
            bf16=self.settings.bf16,
            cpu_batch_size=self.settings.cpu_batch_size or None,
        )
        # keep only the trunk that the new model uses, as the model's own (frozen, never
        # written) tensors on its device rather than a second copy of them in host memory
        if loaded.base is not None:
            self._trunk_cache = {loaded.base.sha256: trunk_state_of(predictor.model)}
        promptable, head_sha = self._promptable(loaded, predictor)
        old = self.version
        self.predictor, self.version, self.info = predictor, name, info
        self.promptable = promptable
        self.base_sha = head_sha
        self.labels = tuple(loaded.config.labels)
        self.decoder_trained = decoder_trained(info)
        self.loads += 1
        failed = self._failed.pop(name, None)
        log.info(
            "loaded model version %s on %s in %.2fs (previous: %s)%s",
            name,
            predictor.device,
            time.perf_counter() - t0,
            old,
            f" after {failed.attempts} failed attempt(s)" if failed else "",
        )

    def _load_failed(self, name: str, error: Exception) -> None:
        """Note a failed load of ``name`` and when to try again; logged when the failure is new
        or its error changed, not on every retry."""
        failed = self._failed.get(name)
        attempts = failed.attempts + 1 if failed is not None else 1
        cap = max(RELOAD_RETRY_FIRST, float(self.settings.reload_retry_max))
        delay = min(cap, RELOAD_RETRY_FIRST * 2 ** (attempts - 1))
        message = f"{type(error).__name__}: {error}"
        self._failed[name] = _FailedLoad(attempts, time.monotonic() + delay, message)
        if failed is None or failed.error != message:
            log.error(
                "cannot load model version %s, keeping %s: %s (retrying after %.0f s, then "
                "less often, up to every %.0f s)",
                name,
                self.version,
                message,
                delay,
                cap,
            )
        else:
            log.debug("model version %s still fails to load (attempt %d)", name, attempts)

    @property
    def prompt_head(self) -> str:
        """Which head answers keypoint and rectangle prompts: "sam2" (SAM2's prompt encoder
        and mask decoder) or "crop" (crop-and-segment around the automatic model)."""
        return "sam2" if self.promptable is not None else "crop"

    def _promptable(self, loaded: Any, predictor: Any) -> tuple[Any, str | None]:
        """SAM2's promptable head on ``predictor``'s trunk and the sha256 of the checkpoint it
        came from (the embedding cache's key), or (None, None) with a log line why. Which
        checkpoint: :func:`modelstore.version_heads.head_checkpoint`."""
        from sam2unet.checkpoints import sha256_file  # imports torch
        from sam2unet.prompt_head import PromptableSAM2, load_prompt_head  # imports torch

        dirs = [self.registry.base_dir, self.registry.model_dir]
        path, why = head_checkpoint(loaded, dirs)
        if path is None:
            log.info(
                "prompts are answered by crop-and-segment: %s (%s)", why, self.registry.base_dir
            )
            return None, None
        sha = sha256_file(path)
        if self._heads.get(sha) is None:
            try:
                self._heads = {sha: load_prompt_head(path, loaded.config.size)}
            except CheckpointError as e:
                log.info("prompts are answered by crop-and-segment: %s: %s", path.name, e)
                self._heads = {}
                return None, None
        log.info("prompts are answered by SAM2's own head of %s", path.name)
        return PromptableSAM2(predictor.model.encoder, self._heads[sha], self.settings.bf16), sha

    def cached_features(self, digest: str) -> Any:
        """The image's SAM2 features when the embedding cache holds them (no computation,
        no wait), else None."""
        if self.promptable is None or self.base_sha is None:
            return None
        return self.embeddings.get(digest, self.base_sha)

    def image_features(self, image: np.ndarray, digest: str) -> tuple[Any, bool]:
        """SAM2 features of ``image`` (content sha256 ``digest``) from the embedding cache, or
        computed and cached; (features, whether they were not computed by this call).

        One computation per image at a time: a call for an image whose features another
        thread of this process is computing (a prewarm, a first click) waits for them."""
        assert self.promptable is not None and self.base_sha is not None
        key = (digest, self.base_sha)
        while True:
            found = self.embeddings.get(*key)
            if found is not None:
                return found, True
            with self._inflight_lock:
                flight = self._inflight.get(key)
                mine = flight is None
                if mine:
                    flight = self._inflight[key] = _InFlight()
            assert flight is not None
            if not mine:
                flight.done.wait()
                self.embed_waits += 1
                if flight.features is not None:
                    return flight.features, True
                continue  # its computation failed: try again
            try:
                features = self.promptable.embed(image)
                flight.features = features
                self.embeddings.put(*key, features)
            finally:
                with self._inflight_lock:
                    self._inflight.pop(key, None)
                flight.done.set()
                release_freed_memory()
            return features, False

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Per image, K x H x W probabilities at the image's size (K = number of labels)."""
        if self.predictor is None:
            self.ensure_current()
        return self.predictor.predict(images)

    def acquire(self, images: list[np.ndarray], strategy: str, keys: list[str]) -> list[Any]:
        """Per image, the prediction and its acquisition uncertainty
        (:func:`sam2unet.acquisition.acquire`)."""

        if self.predictor is None:
            self.ensure_current()
        return acquire(
            self.predictor, images, strategy, threshold=self.settings.threshold, keys=keys
        )


class _InFlight:
    """One image's features being computed: set ``done`` once finished (``features`` None:
    the computation failed)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.features: Any = None


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``): an image encode's
    activations (hundreds of MiB at SAM2's 1024 input) are freed to the allocator, which
    otherwise keeps them in the process's resident memory. A no-op without glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def set_mmap_threshold(mb: int) -> bool:
    """Serve allocations of ``mb`` MiB and more from mappings of their own (glibc ``mallopt``;
    0 or without glibc: nothing changes). glibc's default threshold slides up to 32 MiB after
    the first large free, so later 4-32 MiB blocks (an encode's activations) come from the
    heap, where the long-lived blocks allocated among them keep whole stretches resident; a
    fixed threshold gives such blocks back whole when freed. True when it was set."""
    libc = _libc()
    if mb <= 0 or libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mb) * 2**20))
    if not ok:
        log.warning("mallopt refused an mmap threshold of %d MiB; glibc's default stays", mb)
    return ok


@functools.cache
def _libc() -> Any:
    """The C library with ``malloc_trim`` and ``mallopt`` typed, or None without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


RELOAD_RETRY_FIRST = 1.0  # seconds before the first retry of a version that failed to load


@dataclass
class _FailedLoad:
    attempts: int
    retry_at: float  # time.monotonic() from which a load is tried again
    error: str


@dataclass
class WorkerContext:
    """What job functions of this process use: settings, Redis, the model runtime, the image
    fetcher and (when configured) the Label Studio client for writing results back."""

    settings: Settings
    redis: redis.Redis
    runtime: ModelRuntime
    fetch: Callable[[str, str | None], bytes]
    ls_client: Any = None
    write_back: Callable[[Any, list[Any]], None] | None = None


_context: WorkerContext | None = None


def install_context(context: WorkerContext) -> None:
    """Make ``context`` this process's job context (called by the worker entry point)."""
    global _context
    _context = context


def get_context() -> WorkerContext:
    if _context is None:
        raise RuntimeError(
            "no worker context in this process: predict jobs run in `sam2unet-assist worker`"
        )
    return _context
