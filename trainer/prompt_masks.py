"""Masks for annotations that hold smart keypoints / rectangles but no mask of their label.

An annotator who submits while the smart tool's suggestion is pending (before ✓) stores only
the prompts: Label Studio drops the suggested mask without a warning. When
``SAM2UNET_DERIVE_PROMPT_MASKS`` is on (the default), the trainer answers those prompts again
with SAM2's promptable head of the version that served them and trains on that mask, marked
as derived in the dataset (:attr:`trainer.samples.Sample.derived`). The answer is the worker's
(:func:`labelstudio.prompts.sam2_masks` on :func:`labelstudio.prompts.parse_context`), so the
same weights and prompts give the same mask.

The version that served them: the model version of the prediction the annotation started from
(the annotation's ``prediction``, or its ``parent_prediction`` among the task's predictions)
when it is one of ours and still in the registry, else the current version. Its prompts are
answered by SAM2's head as the worker chooses it: its base checkpoint's, else that of an
official checkpoint whose trunk is the model's (:func:`modelstore.version_heads.matching_official`); a
version answering by crop-and-segment gives no derived mask (the annotation is not used, and
counted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from contracts.errors import AnnotationFormatError, NotFound
from contracts.settings import Settings
from labelstudio.labelconfig import Target
from labelstudio.prompts import label_channels, labels_for, parse_context, sam2_masks
from modelstore.registry import ModelRegistry
from modelstore.version_heads import head_checkpoint
from sam2unet.exceptions import CheckpointError

log = logging.getLogger(__name__)

OUR_VERSION_PREFIX = "sam2unet-"


class PromptsWithoutMask(AnnotationFormatError):
    """An annotation holds prompts but no mask of their label, and none is derived from them
    (the setting is off, no SAM2 head serves them, or they give no mask): it is not used."""

    code = "prompts_without_mask"
    default_message = "the annotation holds smart keypoints/rectangles but no mask"


def _our_version(model_version: Any) -> str | None:
    """The registry name in one of our predictions' ``model_version`` (``<v>/untrained``,
    ``<v>/failed`` -> ``<v>``)."""
    if not isinstance(model_version, str) or not model_version.startswith(OUR_VERSION_PREFIX):
        return None
    return model_version.split("/", 1)[0]


def served_version(task: Mapping[str, Any], ann: Mapping[str, Any]) -> str | None:
    """The model version of the prediction ``ann`` started from, when it is one of ours."""
    pred = ann.get("prediction")
    if isinstance(pred, Mapping):
        found = _our_version(pred.get("model_version"))
        if found:
            return found
    parent = ann.get("parent_prediction")
    if parent is not None:
        for p in task.get("predictions") or []:
            if isinstance(p, Mapping) and p.get("id") == parent:
                return _our_version(p.get("model_version"))
    return None


class PromptMasks:
    """SAM2's masks for an annotation's prompts, per model version (see the module doc).

    Holds the promptable head of one version at a time (the trunk of the version loaded from the
    registry, SAM2's prompt encoder and mask decoder from the base checkpoint)."""

    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self._held: tuple[str, Any] | None = None  # (version, PromptableSAM2)

    def version_for(self, task: Mapping[str, Any], ann: Mapping[str, Any]) -> str:
        """The version whose head answers ``ann``'s prompts (see the module doc)."""
        name = served_version(task, ann)
        if name is not None:
            try:
                self.registry.get(name)
                return name
            except (NotFound, OSError, ValueError, TypeError) as e:  # deleted, unreadable
                log.info("version %s of task %s's prediction is not usable (%s); using the "
                         "current version", name, task.get("id"), e)  # fmt: skip
        current = self.registry.current()
        if current is None:
            raise PromptsWithoutMask("no model version to answer its prompts")
        return current

    def channels(self, version: str, target: Target) -> list[tuple[int, str]]:
        """Which labels ``version`` predicts for the project (unlabelled prompts go to them)."""
        return label_channels(tuple(self.registry.get(version).labels), target)

    def release(self) -> None:
        """Let go of the held head and trunk (after a sync, before a round trains)."""
        self._held = None

    def _promptable(self, version: str) -> Any:
        """SAM2's promptable head for ``version``, chosen as the worker chooses it: its base
        checkpoint's head, else that of an official checkpoint in ``MODEL_DIR/base`` whose
        trunk is the model's (:func:`modelstore.version_heads.matching_official`)."""
        from sam2unet.checkpoints import sha256_file  # imports torch
        from sam2unet.predictor import pick_device  # imports torch
        from sam2unet.prompt_head import PromptableSAM2, load_prompt_head  # imports torch

        if self._held is not None and self._held[0] == version:
            return self._held[1]
        self._held = None  # one version's head and trunk in memory at a time
        t0 = time.perf_counter()
        try:
            loaded = self.registry.load(version)
        except CheckpointError as e:
            raise PromptsWithoutMask(f"version {version} cannot be loaded: {e}") from e
        path, why = head_checkpoint(loaded, [self.registry.base_dir, self.registry.model_dir])
        if path is None:
            raise PromptsWithoutMask(
                f"version {version} answers prompts by crop-and-segment ({why}): no mask is "
                "derived from them"
            )
        try:
            head = load_prompt_head(path, loaded.config.size)
        except CheckpointError as e:
            raise PromptsWithoutMask(f"SAM2's head of {version} cannot be loaded: {e}") from e
        trunk = loaded.model.encoder.to(pick_device(self.settings.device)).eval()
        promptable = PromptableSAM2(trunk, head, bf16=self.settings.bf16)
        self._held = (version, promptable)
        log.info(
            "SAM2's head of %s (%s, sha256 %s...) loaded in %.2fs to derive masks from "
            "annotations' prompts",
            version,
            path.name,
            sha256_file(path)[:12],
            time.perf_counter() - t0,
        )
        return promptable

    def masks(
        self,
        image: np.ndarray,
        items: Sequence[Mapping[str, Any]],
        target: Target,
        version: str,
        labels: set[str],
    ) -> dict[str, np.ndarray]:
        """``{label: H x W bool}`` for the labels in ``labels`` that SAM2's head of ``version``
        gives a non-empty mask from ``items`` (an annotation's prompt items) on ``image``."""
        h, w = image.shape[:2]
        prompts = parse_context({"result": list(items)}, h, w, target.to_name)
        if not prompts.boxes and not prompts.points:
            return {}
        promptable = self._promptable(version)
        channels = self.channels(version, target)
        out: dict[str, np.ndarray] = {}
        for label, answer in sam2_masks(promptable, promptable.embed(image), prompts):
            if not answer.mask.any():
                continue
            for name in labels_for(label, target, channels):
                if name in labels:
                    out[name] = out[name] | answer.mask if name in out else answer.mask.copy()
        return out
