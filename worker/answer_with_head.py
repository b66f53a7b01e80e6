"""Interactive prompts answered by SAM2's own prompt encoder and mask decoder
(:mod:`sam2unet.prompt_head`), when the current version's base checkpoint carries them.

The prompts of one call (parsed by :func:`labelstudio.prompts.parse_context`) become objects:

* each rectangle is one object, with the keypoints that lie inside it (and carry its label or
  none) as extra clicks; a rotated rectangle is given to SAM2 as its axis-aligned bounds;
* the keypoints left over are one object per label (all unlabelled ones together): SAM2's
  usual multi-click refinement, negative points included; an object of negative points only
  was dropped when the prompts were parsed (no mask for it);
* a single click alone is ambiguous: SAM2's three-mask output is used and the mask with the
  best predicted IoU kept.

Each object becomes one result item (a brush RLE at the image's size, or polygons), labelled
with its prompt's label when the project has that label (SAM2 needs no trained channel for
it); an unlabelled prompt's mask goes to every label the model predicts. An item's score, and
the mean of them the prediction's score, is SAM2's predicted IoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from labelstudio.codecs import brush_result, polygon_results
from labelstudio.labelconfig import Target
from labelstudio.prompts import Prompts, labels_for, prompt_objects, sam2_masks
from sam2unet.prompt_head import ImageFeatures, PromptableSAM2

__all__ = ["answer_prompts", "prompt_objects"]


def answer_prompts(
    promptable: PromptableSAM2,
    features: ImageFeatures,
    prompts: Prompts,
    target: Target,
    channels: Sequence[tuple[int, str]],
) -> tuple[list[dict[str, Any]], float, str]:
    """(Label Studio result items, prediction score, a short description for logging)."""
    answers = sam2_masks(promptable, features, prompts)
    results: list[dict[str, Any]] = []
    for label, answer in answers:
        if not answer.mask.any():
            continue
        for name in labels_for(label, target, channels):
            if target.kind == "brush":
                results.append(brush_result(answer.mask, target, name, answer.score))
            else:
                results.extend(polygon_results(answer.mask, target, name, answer.score))
    scores = [a.score for _, a in answers]
    n_pos = sum(p.positive for p in prompts.points)
    info = (
        f"SAM2 head: {len(answers)} object(s) from {len(prompts.boxes)} box(es), points "
        f"+{n_pos}/-{len(prompts.points) - n_pos}, predicted IoU "
        + ", ".join(f"{s:.3f}" for s in scores)
        + f", {sum(int(a.mask.sum()) for _, a in answers)} foreground px"
    )
    return results, float(np.mean(scores)) if scores else 0.0, info
