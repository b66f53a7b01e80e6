"""Model version registry: immutable versions on disk under ``MODEL_DIR``, the current-version
pointer in Redis.

Layout::

    MODEL_DIR/
      base/                     SAM2 / SAM2.1 checkpoints (or a generated random trunk)
      versions/<name>/model.pt  our delta checkpoint (adapters + decoder)
      versions/<name>/meta.json version info: parent, base, metrics, training data size, ...
      promotions.jsonl          append-only log of pointer flips (promotions and rollbacks)
      superseded.jsonl          candidates not promoted because the pointer moved during their
                                round (a rollback, another promotion)

A version directory is written under a temporary name and renamed into place, so a reader
never sees a partial version; a version never changes afterwards. Promotion appends to the log
(fsync) and then flips the Redis pointer; if Redis loses its data, the pointer is recovered from
the log's last line.

Writers hold the registry lock (Redis; a file lock on ``MODEL_DIR`` without Redis). A round
promotes with :meth:`ModelRegistry.promote_from`: a compare-and-set against the pointer the
round started from (its version and the number of flips so far), so a rollback made during the
round is never undone by it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from contracts.errors import NotFound

if TYPE_CHECKING:  # torch-free at import time: the backend uses this module too
    from sam2unet.checkpoints import BaseRef, LoadedModel
    from sam2unet.config import ModelConfig
    from sam2unet.modeling import SAM2UNet

log = logging.getLogger(__name__)

POINTER_KEY = "sam2unet:registry:current"
LOCK_KEY = "sam2unet:registry:lock"
SUPERSEDED_LOG = "superseded.jsonl"
_NAME_RE = re.compile(r"^sam2unet-(?P<size>[a-z_]+)-v(?P<n>\d+)$")


@dataclass(frozen=True)
class VersionInfo:
    """What the registry knows of one version (the content of its meta.json)."""

    name: str
    number: int
    created_at: float
    size: str
    labels: tuple[str, ...]
    base: dict[str, str] | None
    parent: str | None = None
    source: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    train_size: int = 0
    note: str = ""
    #: whether the automatic head (the U-Net decoder) was ever trained; None in meta.json files
    #: written before it was recorded (see :func:`modelstore.version_heads.decoder_trained`)
    decoder_trained: bool | None = None
    #: whether the base checkpoint holds SAM2's prompt encoder and mask decoder; None: not
    #: recorded (see :func:`modelstore.version_heads.prompt_head_for`)
    base_prompt_decoder: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VersionInfo:
        d = dict(d)
        d["labels"] = tuple(d.get("labels") or ())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Pointer:
    """The current version and the number of pointer flips (promotion log entries) so far:
    what a round remembers when it starts, to promote only if nothing moved meanwhile."""

    version: str | None
    flips: int


class ModelRegistry:
    """Versions under ``model_dir``; the current pointer in ``redis_client`` (may be None for
    read-only use from a CLI without Redis, in which case the promotion log is the pointer)."""

    def __init__(self, model_dir: str | os.PathLike[str], redis_client: redis.Redis | None) -> None:
        self.model_dir = Path(model_dir)
        self.versions_dir = self.model_dir / "versions"
        self.base_dir = self.model_dir / "base"
        self.log_path = self.model_dir / "promotions.jsonl"
        self.superseded_path = self.model_dir / SUPERSEDED_LOG
        self.redis = redis_client

    # ------------------------------------------------------------------ reading

    def versions(self) -> list[VersionInfo]:
        """All complete versions, oldest first."""
        out = []
        if not self.versions_dir.is_dir():
            return out
        for d in self.versions_dir.iterdir():
            if d.name.startswith(".") or not (d / "meta.json").is_file():
                continue
            try:
                out.append(VersionInfo.from_dict(json.loads((d / "meta.json").read_text())))
            except (OSError, ValueError, TypeError) as e:
                log.warning("skipping unreadable version %s: %s", d.name, e)
        return sorted(out, key=lambda v: v.number)

    def get(self, name: str) -> VersionInfo:
        path = self.versions_dir / name / "meta.json"
        if not _NAME_RE.match(name) or not path.is_file():
            raise NotFound(f"no model version {name!r}")
        return VersionInfo.from_dict(json.loads(path.read_text()))

    def model_path(self, name: str) -> Path:
        return self.versions_dir / name / "model.pt"

    def base_path(self, name: str) -> Path | None:
        """The base checkpoint file called ``name`` (in ``base/`` or ``MODEL_DIR``), if any."""
        for d in (self.base_dir, self.model_dir):
            if (d / name).is_file():
                return d / name
        return None

    def promotions(self) -> list[dict[str, Any]]:
        """The promotion log, oldest first."""
        if not self.log_path.is_file():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    log.warning("ignoring a torn line at the end of %s", self.log_path)
        return out

    def superseded(self) -> dict[str, dict[str, Any]]:
        """Candidates that were not promoted because the pointer moved during their round:
        version name -> its entry (``parent``, ``current``, ``at``, ``reason``)."""
        if not self.superseded_path.is_file():
            return {}
        out = {}
        for line in self.superseded_path.read_text().splitlines():
            try:
                entry = json.loads(line)
                out[str(entry["version"])] = entry
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def pointer(self) -> Pointer:
        """The current version and the number of flips so far (see :class:`Pointer`)."""
        return Pointer(self.current(), len(self.promotions()))

    def current_and(self, *keys: str) -> tuple[str | None, list[Any]]:
        """:meth:`current` and the values of other Redis ``keys``, in one round trip."""
        if self.redis is None or not keys:
            return self.current(), [None] * len(keys)
        pointer, *values = self.redis.mget([POINTER_KEY, *keys])
        if pointer is None:
            return self.current(), values
        return (pointer.decode() if isinstance(pointer, bytes) else str(pointer)), values

    def current(self) -> str | None:
        """The current version: Redis pointer, else the promotion log's last entry (and the
        pointer is restored from it)."""
        if self.redis is not None:
            value = self.redis.get(POINTER_KEY)
            if value is not None:
                return value.decode() if isinstance(value, bytes) else str(value)
        entries = self.promotions()
        if not entries:
            return None
        name = entries[-1]["version"]
        if self.redis is not None:
            self.redis.set(POINTER_KEY, name, nx=True)
            log.warning(
                "current-version pointer was missing in Redis; restored %s from the log", name
            )
        return name

    def current_info(self) -> VersionInfo | None:
        name = self.current()
        return self.get(name) if name else None

    # ------------------------------------------------------------------ writing

    @contextmanager
    def lock(self, timeout: float = 60.0) -> Iterator[None]:
        """Serialise writers (version creation, promotion) across processes."""
        if self.redis is None:  # a CLI without Redis: a file lock, for this machine
            self.model_dir.mkdir(parents=True, exist_ok=True)
            with open(self.model_dir / ".registry.lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
            return
        with self.redis.lock(LOCK_KEY, timeout=timeout, blocking_timeout=timeout):
            yield

    def _next_number(self) -> int:
        numbers = [v.number for v in self.versions()]
        if self.versions_dir.is_dir():
            for d in self.versions_dir.iterdir():
                m = _NAME_RE.match(d.name)
                if m:
                    numbers.append(int(m.group("n")))
        return max(numbers, default=0) + 1

    def create_version(
        self,
        model: SAM2UNet,
        config: ModelConfig,
        base: BaseRef | None,
        *,
        parent: str | None = None,
        source: str = "",
        metrics: dict[str, Any] | None = None,
        train_size: int = 0,
        note: str = "",
        train_state: dict[str, Any] | None = None,
        extra_files: dict[str, bytes] | None = None,
        decoder_trained: bool = True,
    ) -> VersionInfo:
        """Write a new, not yet promoted version atomically and return its info.

        ``decoder_trained``: False for a version whose U-Net decoder is freshly initialised
        (made from an official SAM2 checkpoint or a random trunk): it makes no automatic
        predictions. Whether the base checkpoint holds SAM2's prompt decoder is read from the
        base file here and recorded too."""
        # torch: loaded only by the processes that write versions; the backend reads them
        from sam2unet.checkpoints import has_prompt_decoder, save_delta

        base_path = None if base is None else self.base_path(base.name)
        prompt_decoder = base_path is not None and has_prompt_decoder(base_path)

        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.versions_dir))
        try:
            while True:
                number = self._next_number()
                name = f"sam2unet-{config.size}-v{number}"
                info = VersionInfo(
                    name=name,
                    number=number,
                    created_at=time.time(),
                    size=config.size,
                    labels=tuple(config.labels),
                    base=None if base is None else {"name": base.name, "sha256": base.sha256},
                    parent=parent,
                    source=source,
                    metrics=dict(metrics or {}),
                    train_size=int(train_size),
                    note=note,
                    decoder_trained=bool(decoder_trained),
                    base_prompt_decoder=prompt_decoder,
                )
                save_delta(
                    tmp / "model.pt",
                    model,
                    config,
                    base,
                    metrics=metrics,
                    train_state=train_state,
                    meta={
                        "version": name,
                        "parent": parent,
                        "decoder_trained": bool(decoder_trained),
                    },
                )
                for fname, data in (extra_files or {}).items():
                    (tmp / fname).write_bytes(data)
                _write_json(tmp / "meta.json", info.to_dict())
                _fsync_dir(tmp)
                try:
                    os.rename(tmp, self.versions_dir / name)
                except OSError:
                    # another writer took this number in the meantime: take the next one
                    if (self.versions_dir / name).exists():
                        continue
                    raise
                _fsync_dir(self.versions_dir)
                log.info("created model version %s (parent %s, %s)", name, parent, source)
                return info
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def promote(
        self, name: str, reason: str = "promoted", metrics: dict[str, Any] | None = None
    ) -> None:
        """Make ``name`` current: append to the promotion log, then flip the Redis pointer.
        Unconditional, and without the lock: the caller holds it (see :meth:`promote_from`
        for a round's promotion, :meth:`rollback` for an operator's)."""
        info = self.get(name)
        if not self.model_path(name).is_file():
            raise NotFound(f"model version {name!r} has no model file")
        entry = {
            "version": info.name,
            "at": time.time(),
            "reason": reason,
            "metrics": metrics or {},
        }
        _append_line(self.log_path, entry)
        if self.redis is not None:
            self.redis.set(POINTER_KEY, info.name)
        log.info("model version %s is now current (%s)", name, reason)

    def promote_from(
        self,
        name: str,
        start: Pointer,
        reason: str = "promoted",
        metrics: dict[str, Any] | None = None,
    ) -> bool:
        """Promote ``name`` only if the pointer is still ``start`` (the one its round trained
        from), under the registry lock: True when promoted. Otherwise (a rollback or another
        promotion came in between) nothing moves, the candidate is recorded as superseded
        (:meth:`superseded`) and False is returned."""
        with self.lock():
            now = self.pointer()
            if now == start:
                self.promote(name, reason=reason, metrics=metrics)
                return True
            _append_line(
                self.superseded_path,
                {
                    "version": name,
                    "parent": start.version,
                    "current": now.version,
                    "at": time.time(),
                    "reason": reason,
                },
            )
        log.warning(
            "model version %s is not promoted: it was trained from %s, and the current version "
            "changed during its round (now %s, %d pointer change(s) since); it is kept as "
            "superseded",
            name,
            start.version,
            now.version,
            now.flips - start.flips,
        )
        return False

    def rollback(self, name: str) -> None:
        """Make ``name`` current again (an operator's command), under the registry lock."""
        with self.lock():
            self.promote(name, reason="rollback")

    # ------------------------------------------------------------------ loading

    def load(self, name: str, trunk_cache: dict[str, Any] | None = None) -> LoadedModel:
        # torch: loaded only by the processes that run the model; the backend reads versions
        from sam2unet.checkpoints import load_delta

        return load_delta(
            self.model_path(name),
            search_dirs=[self.base_dir, self.model_dir],
            trunk_cache=trunk_cache,
        )


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line and fsync it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
