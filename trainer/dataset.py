"""The training set of a project, derived from Label Studio (the source of truth).

:meth:`DatasetCache.sync` turns each annotated task's latest submitted annotation into per-label
masks at the image's resolution. The local cache is derived data, keyed by (image content hash,
annotation id, updated_at): an unchanged annotation is not fetched again, a changed one replaces
its sample, and a deleted or cancelled one removes it. Deleting the cache only costs a
re-download.

A sync is *incremental* when it can be: Label Studio touches a task's ``updated_at`` when one of
its annotations is created, updated or deleted, so only the annotated tasks updated since the
last sync's start (Label Studio's clock, less ``SAM2UNET_SYNC_MARGIN`` seconds for writes that
were under way) are read with their annotations, plus the tasks whose annotation could not be
used last time. Deletions are found by reading the ids of the annotated tasks (ids only): a
sample whose task is gone, or holds no submitted annotation any more, is removed. A *full* read
(the project's export) is done, with its reason logged, on the first sync, when the labelling
config changed, when the manifest has no cursor or one it does not trust (later than Label
Studio's clock now), and every ``SAM2UNET_SYNC_FULL_EVERY`` seconds.

Layout under ``DATA_DIR``::

    images/<sha256>            image bytes, content-addressed
    projects/<id>/manifest.json
    projects/<id>/masks/<task>-<annotation>-<stamp>.npz
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contracts.errors import AnnotationFormatError, AssistError
from labelstudio.labelconfig import Target, parse_label_config
from sam2unet.transforms import decode_image, turned_on_screen
from trainer.annotated_tasks import iso_time, latest_submitted, parse_time, read_by_id
from trainer.prompt_masks import PromptMasks
from trainer.samples import Sample, SampleDerivation

log = logging.getLogger(__name__)

#: Images and masks are in the frame an image is displayed in (EXIF orientation applied).
#: Manifests without it were derived on the stored pixels.
DISPLAYED_FRAME = "displayed"


@dataclass
class Manifest:
    project: int
    labels: list[str]
    target: dict[str, Any]
    samples: dict[str, Sample]
    synced_at: float = 0.0
    frame: str = DISPLAYED_FRAME
    cursor: str = ""  # Label Studio's time when the last sync started reading (ISO 8601)
    full_at: float = 0.0  # when the last full sync was done (this machine's clock)
    retry: list[int] = field(default_factory=list)  # tasks whose annotation was not usable

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        samples = {k: Sample(**v) for k, v in d.get("samples", {}).items()}
        return cls(
            d["project"],
            list(d["labels"]),
            d["target"],
            samples,
            d.get("synced_at", 0.0),
            d.get("frame", "stored"),
            str(d.get("cursor") or ""),
            float(d.get("full_at") or 0.0),
            [int(t) for t in d.get("retry") or []],
        )


@dataclass
class SyncReport:
    project: int
    samples: int
    added: int
    updated: int
    removed: int
    failed: int
    seconds: float
    mode: str = "full"  # or "incremental"
    reason: str = ""  # why a full read
    read: int = 0  # tasks read with their annotations
    # annotations holding smart keypoints/rectangles but no mask of their label: "derived",
    # samples whose masks were derived from them ("derived_now": this sync); "skipped", those
    # not used (the setting off, no SAM2 head, or prompts that give no mask); "enabled", the
    # setting (SAM2UNET_DERIVE_PROMPT_MASKS)
    prompts: dict[str, Any] = field(default_factory=dict)


@dataclass
class _SyncCounts:
    """What a sync did to the tasks it read."""

    added: int = 0
    updated: int = 0
    failed: int = 0
    retry: list[int] = field(default_factory=list)  # tasks to read again next time


class DatasetCache(SampleDerivation):
    """The derived training data of every project, under ``root``. ``margin``: seconds an
    incremental sync reads before the last sync's start; ``full_every``: seconds between full
    reads (0: every sync is full)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        margin: float = 300.0,
        full_every: float = 24 * 3600.0,
        page_size: int = 1000,
        prompt_masks: PromptMasks | None = None,
        derive_prompt_masks: bool = True,
    ) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.margin = float(margin)
        self.full_every = float(full_every)
        self.page_size = int(page_size)
        #: answers annotations' prompts (see :mod:`trainer.prompt_masks`); None: none derived
        self.prompt_masks = prompt_masks
        self.derive_prompt_masks = bool(derive_prompt_masks)
        self._tally: dict[str, int] = {"derived_now": 0, "skipped": 0}

    # ---------------------------------------------------------------- storage
    def project_dir(self, project: int) -> Path:
        return self.root / "projects" / str(int(project))

    def projects(self) -> list[int]:
        d = self.root / "projects"
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []

    def load_manifest(self, project: int) -> Manifest | None:
        path = self.project_dir(project) / "manifest.json"
        if not path.is_file():
            return None
        try:
            m = Manifest.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("project %s: unreadable manifest, rebuilding it (%s)", project, e)
            return None
        if m.frame != DISPLAYED_FRAME:
            self._drop_stored_frame_samples(m)
        return m

    def _drop_stored_frame_samples(self, m: Manifest) -> None:
        """A manifest derived on stored pixels: the samples of images that EXIF turns on screen
        were paired with masks in the wrong frame. They are left out (the next sync derives them
        again, in the displayed frame); the others are the same in both frames."""
        turned = [
            key for key, s in m.samples.items() if turned_on_screen(self.images_dir / s.image)
        ]
        for key in turned:
            del m.samples[key]
        if turned:
            log.info(
                "project %s: %d sample(s) of EXIF-turned images were derived on the stored "
                "pixels; they are derived again, in the displayed frame",
                m.project,
                len(turned),
            )
        m.frame = DISPLAYED_FRAME

    def _save_manifest(self, m: Manifest) -> None:
        d = self.project_dir(m.project)
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(m.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / "manifest.json")

    def _store_image(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.images_dir / digest
        if not path.is_file():
            self.images_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def image(self, digest: str) -> np.ndarray:
        return decode_image((self.images_dir / digest).read_bytes())

    def masks(self, project: int, sample: Sample) -> np.ndarray:
        """K x H x W uint8 (0/255) masks of a sample, channels in the manifest's label order."""
        with np.load(self.project_dir(project) / "masks" / sample.mask) as z:
            return z["masks"]

    def samples(self, project: int) -> list[tuple[Sample, np.ndarray, np.ndarray]]:
        """Every sample as (info, H x W x 3 image, K x H x W mask), sorted by task id."""
        m = self.load_manifest(project)
        if m is None:
            return []
        out = []
        for key in sorted(m.samples, key=int):
            s = m.samples[key]
            out.append((s, self.image(s.image), self.masks(project, s)))
        return out

    # ---------------------------------------------------------------- sync
    def _full_reason(
        self, old: Manifest | None, target: dict[str, Any], now: dt.datetime | None, full: bool
    ) -> str:
        """Why this sync must read everything; "" when an incremental read is enough."""
        if full:
            return "asked for"
        if old is None:
            return "first sync (no manifest)"
        if old.target != target:
            return "labelling config changed"
        if self.full_every <= 0 or time.time() - old.full_at >= self.full_every:
            return f"periodic (every {self.full_every:.0f} s)"
        cursor = parse_time(old.cursor)
        if cursor is None:
            return "no cursor in the manifest"
        if now is None:
            return "Label Studio's clock unknown (no Date header)"
        if cursor > now + dt.timedelta(seconds=self.margin):
            return f"cursor {old.cursor} later than Label Studio's clock {iso_time(now)}"
        return ""

    def sync(
        self,
        client: Any,
        project: int,
        fetch: Callable[[str, str | None, int | None], bytes],
        target: Target | None = None,
        full: bool = False,
    ) -> SyncReport:
        """Bring the project's samples in line with Label Studio's annotations: incrementally
        when it can (see the module doc), or reading everything (``full``, or the reason
        logged)."""
        t0 = time.monotonic()
        self._tally = {"derived_now": 0, "skipped": 0}
        # Label Studio's clock before anything is read: the next incremental sync's cursor
        now = client.server_time() if hasattr(client, "server_time") else None
        info = client.get_project(project)
        target = target or parse_label_config(info["label_config"])
        old = self.load_manifest(project)
        reason = self._full_reason(old, json.loads(json.dumps(asdict(target))), now, full)
        if old is not None and old.labels != list(target.labels):
            log.info(
                "project %s: labels changed %s -> %s; re-deriving masks",
                project,
                old.labels,
                list(target.labels),
            )
            old = None
        prev = old.samples if old is not None else {}
        (self.project_dir(project) / "masks").mkdir(parents=True, exist_ok=True)
        tasks, new, annotated = self._read_tasks(client, project, old, reason, prev)
        counts = self._update_samples(project, tasks, prev, new, annotated, target, fetch)
        manifest = Manifest(
            project,
            list(target.labels),
            asdict(target),
            new,
            time.time(),
            cursor=iso_time(now) if now is not None else "",
            full_at=time.time() if reason or old is None else old.full_at,
            retry=sorted(set(counts.retry)),
        )
        self._save_manifest(manifest)
        self._drop_unused_masks(project, manifest)
        return self._sync_report(project, prev, new, counts, reason, len(tasks), t0)

    def _read_tasks(
        self,
        client: Any,
        project: int,
        old: Manifest | None,
        reason: str,
        prev: dict[str, Sample],
    ) -> tuple[list[dict[str, Any]], dict[str, Sample], set[int] | None]:
        """(the tasks to read with their annotations, the samples kept before reading them,
        the ids of every annotated task or None after a full read). A full read exports the
        project; an incremental one reads the tasks updated since the cursor (less the
        margin), the tasks to retry, and the ids of every annotated task."""
        if reason:
            log.info("project %s: full sync: %s", project, reason)
            return client.export_project(project), {}, None
        assert old is not None
        since = iso_time(parse_time(old.cursor) - dt.timedelta(seconds=self.margin))
        tasks = read_by_id(client, project, since, self.page_size, full=True)
        if old.retry:  # tasks whose annotation was not usable last time: tried again
            seen = {t.get("id") for t in tasks}
            retry = [t for t in old.retry if t not in seen]
            for start in range(0, len(retry), 100):
                chunk = retry[start : start + 100]
                query = {"selectedItems": {"all": False, "included": chunk}}
                got, _ = client.task_page(project, 1, len(chunk), full=True, query=query)
                tasks += got
        # every annotated task's id: samples of tasks gone or without annotations go
        annotated = {
            t["id"]
            for t in read_by_id(client, project, None, self.page_size, include=("id",))
            if isinstance(t.get("id"), int)
        }
        return tasks, {k: v for k, v in prev.items() if int(k) in annotated}, annotated

    def _update_samples(
        self,
        project: int,
        tasks: list[dict[str, Any]],
        prev: dict[str, Sample],
        new: dict[str, Sample],
        annotated: set[int] | None,
        target: Target,
        fetch: Callable[[str, str | None, int | None], bytes],
    ) -> _SyncCounts:
        """Each read task's sample into ``new``: kept when its annotation is unchanged, derived
        again when it changed, dropped when it has none; an unusable one is retried next."""
        counts = _SyncCounts()
        for task in tasks:
            tid = task.get("id")
            if not isinstance(tid, int):
                continue
            key = str(tid)
            ann = latest_submitted(task.get("annotations") or [])
            if ann is None or (annotated is not None and tid not in annotated):
                new.pop(key, None)
                continue
            have = prev.get(key)
            if (
                have is not None
                and have.annotation == ann.get("id")
                and have.updated_at == str(ann.get("updated_at") or "")
                and not self._prompts_changed(have, ann, target)
            ):
                new[key] = have
                continue
            try:
                new[key] = self._derive(project, task, ann, target, fetch)
            except (AssistError, AnnotationFormatError) as e:
                counts.failed += 1
                counts.retry.append(tid)
                new.pop(key, None)
                log.warning("project %s task %s: annotation not used: %s", project, tid, e)
                continue
            if have is None:
                counts.added += 1
            else:
                counts.updated += 1
        return counts

    def _sync_report(
        self,
        project: int,
        prev: dict[str, Sample],
        new: dict[str, Sample],
        counts: _SyncCounts,
        reason: str,
        read: int,
        t0: float,
    ) -> SyncReport:
        removed = len(set(prev) - set(new))
        report = SyncReport(
            project,
            len(new),
            counts.added,
            counts.updated,
            removed,
            counts.failed,
            time.monotonic() - t0,
            mode="full" if reason else "incremental",
            reason=reason,
            read=read,
            prompts=self._prompt_report(project, new),
        )
        log.info(
            "project %s synced (%s, %d task(s) read): %d samples (+%d, ~%d, -%d, %d unusable) "
            "in %.1fs",
            project,
            report.mode,
            report.read,
            report.samples,
            counts.added,
            counts.updated,
            removed,
            counts.failed,
            report.seconds,
        )
        return report

    def _drop_unused_masks(self, project: int, manifest: Manifest) -> None:
        used = {s.mask for s in manifest.samples.values()}
        for p in (self.project_dir(project) / "masks").glob("*.npz"):
            if p.name not in used:
                p.unlink(missing_ok=True)


def correction_rates(cache: DatasetCache) -> dict[str, dict[str, float]]:
    """Per model version: how many of its pre-annotations were corrected, and the mean rate."""
    acc: dict[str, list[float]] = {}
    for project in cache.projects():
        m = cache.load_manifest(project)
        for s in m.samples.values() if m else []:
            if s.correction:
                acc.setdefault(s.correction["version"], []).append(float(s.correction["rate"]))
    return {v: {"n": len(r), "mean": float(np.mean(r))} for v, r in sorted(acc.items())}
