"""The training set of a project, derived from Label Studio (the source of truth).

``sync_project`` re-reads every annotated task through the API and turns each task's latest
submitted annotation into per-label masks at the image's resolution. The local cache is derived
data, keyed by (image content hash, annotation id, updated_at): an unchanged annotation is not
fetched again, a changed one replaces its sample, and a deleted or cancelled one removes it.
Deleting the cache only costs a re-download.

Layout under ``DATA_DIR``::

    images/<sha256>            image bytes, content-addressed
    projects/<id>/manifest.json
    projects/<id>/masks/<task>-<annotation>-<stamp>.npz
"""

from __future__ import annotations

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
from sam2unet.transforms import decode_image, turned_on_screen

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


@dataclass
class Manifest:
    project: int
    labels: list[str]
    target: dict[str, Any]
    samples: dict[str, Sample]
    synced_at: float = 0.0
    frame: str = DISPLAYED_FRAME

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


class DatasetCache:
    """The derived training data of every project, under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"

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
    def sync(
        self,
        client: Any,
        project: int,
        fetch: Callable[[str, str | None, int | None], bytes],
        target: Target | None = None,
    ) -> SyncReport:
        """Bring the project's samples in line with Label Studio's annotations."""
        t0 = time.monotonic()
        info = client.get_project(project)
        target = target or parse_label_config(info["label_config"])
        old = self.load_manifest(project)
        labels = list(target.labels)
        if old is not None and old.labels != labels:
            log.info(
                "project %s: labels changed %s -> %s; re-deriving masks",
                project,
                old.labels,
                labels,
            )
            old = None
        prev = old.samples if old is not None else {}
        new: dict[str, Sample] = {}
        added = updated = failed = 0
        mask_dir = self.project_dir(project) / "masks"
        mask_dir.mkdir(parents=True, exist_ok=True)
        for task in client.export_project(project):
            tid = task.get("id")
            ann = latest_submitted(task.get("annotations") or [])
            if not isinstance(tid, int) or ann is None:
                continue
            key = str(tid)
            stamp = str(ann.get("updated_at") or "")
            have = prev.get(key)
            if have is not None and have.annotation == ann.get("id") and have.updated_at == stamp:
                new[key] = have
                continue
            try:
                sample = self._derive(project, task, ann, target, fetch)
            except (AssistError, AnnotationFormatError) as e:
                failed += 1
                log.warning("project %s task %s: annotation not used: %s", project, tid, e)
                continue
            new[key] = sample
            if have is None:
                added += 1
            else:
                updated += 1
        removed = len(set(prev) - set(new))
        manifest = Manifest(project, labels, asdict(target), new, time.time())
        self._save_manifest(manifest)
        self._drop_unused_masks(project, manifest)
        report = SyncReport(
            project, len(new), added, updated, removed, failed, time.monotonic() - t0
        )
        log.info(
            "project %s synced: %d samples (+%d, ~%d, -%d, %d unusable) in %.1fs",
            project,
            report.samples,
            added,
            updated,
            removed,
            failed,
            report.seconds,
        )
        return report

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
        data = fetch(url, None, task.get("id"))
        digest = self._store_image(data)
        rgb = decode_image(data)
        h, w = rgb.shape[:2]
        by_label = results_to_masks(ann.get("result") or [], target, h, w)
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
