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
from labelstudio.codecs import results_to_masks
from labelstudio.labelconfig import Target, parse_label_config
from labelstudio.prompts import annotation_prompts, mask_labels, parse_context, prompt_labels
from sam2unet.transforms import decode_image, turned_on_screen
from trainer.prompt_masks import PromptMasks, PromptsWithoutMask

log = logging.getLogger(__name__)

OUR_VERSION_PREFIX = "sam2unet-"
#: Images and masks are in the frame an image is displayed in (EXIF orientation applied).
#: Manifests without it were derived on the stored pixels.
DISPLAYED_FRAME = "displayed"


@dataclass
class Sample:
    """One annotated task of the training set."""

    task: int
    annotation: int
    updated_at: str
    image: str  # sha256 of the image bytes
    mask: str  # file name under the project's masks/
    height: int
    width: int
    labels_present: list[str] = field(default_factory=list)
    # 1 - Dice between the pre-annotation the annotator started from and the final label
    correction: dict[str, Any] | None = None
    # masks derived from the annotation's smart keypoints/rectangles (it held none of those
    # labels): {"version": the version whose SAM2 head answered them, "labels": [...]}
    derived: dict[str, Any] | None = None


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


def latest_submitted(annotations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The task's most recently updated annotation that was not cancelled (skipped)."""
    kept = [a for a in annotations or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (str(a.get("updated_at") or ""), int(a.get("id") or 0)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _annotated(after: int, since: str | None = None) -> dict[str, Any]:
    """The data manager query of annotated tasks after task id ``after`` (updated after
    ``since``), in order of id."""
    items = [
        {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after},
        {
            "filter": "filter:tasks:total_annotations",
            "operator": "greater",
            "type": "Number",
            "value": 0,
        },
    ]
    if since is not None:
        items.append(
            {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
             "value": since}
        )  # fmt: skip
    return {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}


def read_by_id(
    client: Any, project: int, since: str | None, page_size: int, **kw: Any
) -> list[dict[str, Any]]:
    """The project's annotated tasks (updated after ``since``), read in pages by task id."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        tasks, _ = client.task_page(project, 1, page_size, query=_annotated(after, since), **kw)
        out += tasks
        ids = [t["id"] for t in tasks if isinstance(t.get("id"), int)]
        if len(tasks) < page_size or not ids:
            return out
        after = max(ids)


def _parse_time(value: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo is not None else None


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class DatasetCache:
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

    def load_sides(self, project: int) -> dict[int, str]:
        """Each task's held-out side from earlier rounds (``{task: "train" | "val"}``)."""
        path = self.project_dir(project) / "sides.json"
        try:
            return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError) as e:
            log.error("project %s: unreadable %s (%s); sides start afresh", project, path, e)
            return {}

    def save_sides(self, project: int, sides: dict[int, str]) -> None:
        d = self.project_dir(project)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "sides.json.tmp"
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(sides.items())}))
        os.replace(tmp, d / "sides.json")

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
        cursor = _parse_time(old.cursor)
        if cursor is None:
            return "no cursor in the manifest"
        if now is None:
            return "Label Studio's clock unknown (no Date header)"
        if cursor > now + dt.timedelta(seconds=self.margin):
            return f"cursor {old.cursor} later than Label Studio's clock {_iso(now)}"
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
        labels = list(target.labels)
        target_json = json.loads(json.dumps(asdict(target)))  # as the manifest holds it
        reason = self._full_reason(old, target_json, now, full)
        if old is not None and old.labels != labels:
            log.info(
                "project %s: labels changed %s -> %s; re-deriving masks",
                project,
                old.labels,
                labels,
            )
            old = None
        prev = old.samples if old is not None else {}
        mask_dir = self.project_dir(project) / "masks"
        mask_dir.mkdir(parents=True, exist_ok=True)
        if reason:
            log.info("project %s: full sync: %s", project, reason)
            tasks = client.export_project(project)
            new: dict[str, Sample] = {}
            annotated = None
        else:
            assert old is not None
            since = _iso(_parse_time(old.cursor) - dt.timedelta(seconds=self.margin))
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
            new = {k: v for k, v in prev.items() if int(k) in annotated}
        added = updated = failed = 0
        retry_next: list[int] = []
        for task in tasks:
            tid = task.get("id")
            if not isinstance(tid, int):
                continue
            key = str(tid)
            ann = latest_submitted(task.get("annotations") or [])
            if ann is None or (annotated is not None and tid not in annotated):
                new.pop(key, None)
                continue
            stamp = str(ann.get("updated_at") or "")
            have = prev.get(key)
            if (
                have is not None
                and have.annotation == ann.get("id")
                and have.updated_at == stamp
                and not self._prompts_changed(have, ann, target)
            ):
                new[key] = have
                continue
            try:
                sample = self._derive(project, task, ann, target, fetch)
            except (AssistError, AnnotationFormatError) as e:
                failed += 1
                retry_next.append(tid)
                new.pop(key, None)
                log.warning("project %s task %s: annotation not used: %s", project, tid, e)
                continue
            new[key] = sample
            if have is None:
                added += 1
            else:
                updated += 1
        removed = len(set(prev) - set(new))
        cursor = _iso(now) if now is not None else ""
        manifest = Manifest(
            project,
            labels,
            asdict(target),
            new,
            time.time(),
            cursor=cursor,
            full_at=time.time() if reason or old is None else old.full_at,
            retry=sorted(set(retry_next)),
        )
        self._save_manifest(manifest)
        self._drop_unused_masks(project, manifest)
        report = SyncReport(
            project,
            len(new),
            added,
            updated,
            removed,
            failed,
            time.monotonic() - t0,
            mode="full" if reason else "incremental",
            reason=reason,
            read=len(tasks),
            prompts=self._prompt_report(project, new),
        )
        log.info(
            "project %s synced (%s, %d task(s) read): %d samples (+%d, ~%d, -%d, %d unusable) "
            "in %.1fs",
            project,
            report.mode,
            report.read,
            report.samples,
            added,
            updated,
            removed,
            failed,
            report.seconds,
        )
        return report

    def _prompt_report(self, project: int, samples: dict[str, Sample]) -> dict[str, Any]:
        """The sync's count of annotations holding prompts but no mask (see SyncReport), with a
        log line when some were not used."""
        out = {
            "derived": sum(1 for s in samples.values() if s.derived),
            "derived_now": self._tally["derived_now"],
            "skipped": self._tally["skipped"],
            "enabled": self.derive_prompt_masks,
        }
        if self.prompt_masks is not None:
            self.prompt_masks.release()
        if out["skipped"]:
            log.warning(
                "project %s: %d annotation(s) hold smart keypoints/rectangles but no mask of "
                "their label and are not used for training (%s); submit after accepting the "
                "suggestion (✓)",
                project,
                out["skipped"],
                "SAM2UNET_DERIVE_PROMPT_MASKS=false"
                if not self.derive_prompt_masks
                else "no mask could be derived from their prompts",
            )
        return out

    def _prompts_changed(self, have: Sample, ann: dict[str, Any], target: Target) -> bool:
        """Whether an unchanged annotation's sample must be derived again for its prompts: its
        masks were derived and the setting is now off, or it was made with no mask at all from
        an annotation that holds prompts (before masks were derived from them)."""
        if have.derived:
            return not self.derive_prompt_masks
        return not have.labels_present and bool(annotation_prompts(ann.get("result") or [], target))

    def _prompts_to_derive(
        self, task: dict[str, Any], ann: dict[str, Any], target: Target
    ) -> tuple[list[Any], set[str], str | None]:
        """(the annotation's prompt items, the labels they prompt that it holds no mask of,
        the version whose SAM2 head answers them). Raises :class:`PromptsWithoutMask` (counted)
        for an annotation that such labels make unusable without deriving them: the setting is
        off, or its prompts are negative clicks only. Reads no image."""
        results = ann.get("result") or []
        items = annotation_prompts(results, target)
        if not items:
            return [], set(), None
        derive = self.derive_prompt_masks and self.prompt_masks is not None
        version, why = None, "SAM2UNET_DERIVE_PROMPT_MASKS=false, or nothing to derive masks with"
        channels = list(enumerate(target.labels))
        if derive:
            assert self.prompt_masks is not None
            try:
                version = self.prompt_masks.version_for(task, ann)
                channels = self.prompt_masks.channels(version, target)
            except PromptsWithoutMask as e:
                version, why = None, e.message
        wanted = prompt_labels(items, target, channels) - mask_labels(results, target)
        if not wanted:
            return items, set(), version
        if version is None:
            self._tally["skipped"] += 1
            raise PromptsWithoutMask(
                f"it holds smart keypoints/rectangles but no mask of {sorted(wanted)} ({why})"
            )
        # percentages: the objects left do not depend on the image's size
        parsed = parse_context({"result": items}, 1000, 1000, target.to_name)
        if not parsed.boxes and not parsed.points:
            self._tally["skipped"] += 1
            raise PromptsWithoutMask(
                f"it holds no mask of {sorted(wanted)} and its prompts are negative clicks "
                "only: no mask to derive"
            )
        return items, wanted, version

    def _derive(
        self,
        project: int,
        task: dict[str, Any],
        ann: dict[str, Any],
        target: Target,
        fetch: Callable[[str, str | None, int | None], bytes],
    ) -> Sample:
        url = (task.get("data") or {}).get(target.value_key)
        if not isinstance(url, str) or not url:
            raise AnnotationFormatError(f"task data has no image under {target.value_key!r}")
        items, wanted, version = self._prompts_to_derive(task, ann, target)
        data = fetch(url, None, task.get("id"))
        digest = self._store_image(data)
        rgb = decode_image(data)
        h, w = rgb.shape[:2]
        by_label = results_to_masks(ann.get("result") or [], target, h, w)
        derived = None
        if wanted:
            assert self.prompt_masks is not None and version is not None
            try:
                found = self.prompt_masks.masks(rgb, items, target, version, wanted)
            except PromptsWithoutMask:
                self._tally["skipped"] += 1
                raise
            if not found and not by_label:
                self._tally["skipped"] += 1
                raise PromptsWithoutMask(
                    f"it holds no mask of {sorted(wanted)} and SAM2's head of {version} gives "
                    "none from its prompts"
                )
            if found:
                by_label.update(found)
                derived = {"version": version, "labels": sorted(found)}
                self._tally["derived_now"] += 1
            log.info(
                "project %s task %s: annotation %s holds smart keypoints/rectangles but no mask "
                "of %s: masks of %s derived from them with SAM2's head of %s%s",
                project,
                task.get("id"),
                ann.get("id"),
                sorted(wanted),
                sorted(found) or "no label",
                version,
                f" ({sorted(wanted - set(found))}: empty answer)" if wanted - set(found) else "",
            )
        masks = np.zeros((len(target.labels), h, w), dtype=np.uint8)
        for k, label in enumerate(target.labels):
            if label in by_label:
                masks[k] = by_label[label].astype(np.uint8) * 255
        stamp = hashlib.sha1(str(ann.get("updated_at")).encode()).hexdigest()[:10]
        name = f"{task['id']}-{ann.get('id')}-{stamp}.npz"
        np.savez_compressed(self.project_dir(project) / "masks" / name, masks=masks)
        sample = Sample(
            task=int(task["id"]),
            annotation=int(ann.get("id") or 0),
            updated_at=str(ann.get("updated_at") or ""),
            image=digest,
            mask=name,
            height=h,
            width=w,
            labels_present=[lab for lab in target.labels if lab in by_label],
            derived=derived,
        )
        sample.correction = correction_of(task, ann, target, masks > 0)
        return sample

    def _drop_unused_masks(self, project: int, manifest: Manifest) -> None:
        used = {s.mask for s in manifest.samples.values()}
        for p in (self.project_dir(project) / "masks").glob("*.npz"):
            if p.name not in used:
                p.unlink(missing_ok=True)


def correction_of(
    task: dict[str, Any], ann: dict[str, Any], target: Target, final: np.ndarray
) -> dict[str, Any] | None:
    """How much the annotator changed our pre-annotation: 1 - Dice(prediction, final label),
    over the union of labels, for the newest of our predictions created before the annotation."""
    ours = [
        p
        for p in task.get("predictions") or []
        if isinstance(p, dict)
        and str(p.get("model_version") or "").startswith(OUR_VERSION_PREFIX)
        and not str(p.get("model_version")).endswith("/failed")
        and str(p.get("created_at") or "") <= str(ann.get("created_at") or "~")
    ]
    if not ours:
        return None
    pred = max(ours, key=lambda p: str(p.get("created_at") or ""))
    _, h, w = final.shape
    try:
        by_label = results_to_masks(pred.get("result") or [], target, h, w)
    except AnnotationFormatError:
        return None
    predicted = np.zeros((h, w), dtype=bool)
    for m in by_label.values():
        predicted |= m
    rate = 1.0 - dice(predicted, final.any(axis=0))
    return {"version": pred["model_version"], "rate": round(rate, 6)}


def correction_rates(cache: DatasetCache) -> dict[str, dict[str, float]]:
    """Per model version: how many of its pre-annotations were corrected, and the mean rate."""
    acc: dict[str, list[float]] = {}
    for project in cache.projects():
        m = cache.load_manifest(project)
        for s in m.samples.values() if m else []:
            if s.correction:
                acc.setdefault(s.correction["version"], []).append(float(s.correction["rate"]))
    return {v: {"n": len(r), "mean": float(np.mean(r))} for v, r in sorted(acc.items())}
