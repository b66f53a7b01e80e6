"""Training samples derived from annotations: per-label masks at the image's resolution (with
masks derived from smart keypoints/rectangles by SAM2's head where the annotation holds none),
and how much the annotator corrected our pre-annotation."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.errors import AnnotationFormatError
from labelstudio.codecs import results_to_masks
from labelstudio.labelconfig import Target
from labelstudio.prompts import annotation_prompts, mask_labels, parse_context, prompt_labels
from sam2unet.transforms import decode_image
from trainer.prompt_masks import PromptMasks, PromptsWithoutMask

log = logging.getLogger("trainer.dataset")  # the dataset cache's log, as before the split

OUR_VERSION_PREFIX = "sam2unet-"


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


class SampleDerivation:
    """How :class:`~trainer.dataset.DatasetCache` turns an annotation into a :class:`Sample`
    (its masks file written under the project's ``masks/``, its image stored by the cache's
    ``_store_image``), counting annotations whose prompts give no mask in ``_tally``."""

    prompt_masks: PromptMasks | None
    derive_prompt_masks: bool
    _tally: dict[str, int]

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


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


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
