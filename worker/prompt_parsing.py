"""Interactive prompts from Label Studio, parsed into points and boxes in the pixels of the
image actually fetched: :mod:`labelstudio.prompts`, which the trainer shares for annotations
that hold prompts but no mask. The crop-and-segment answer to them is in
:mod:`worker.answer_without_head`, SAM2's in :mod:`worker.answer_with_head`.
"""

from __future__ import annotations

from labelstudio.prompts import (
    KEYPOINT_TYPES,
    RECTANGLE_TYPES,
    Box,
    Point,
    PromptGroup,
    Prompts,
    drop_lone_negatives,
    parse_context,
    prompt_groups,
)

__all__ = [
    "KEYPOINT_TYPES",
    "RECTANGLE_TYPES",
    "Box",
    "Point",
    "PromptGroup",
    "Prompts",
    "drop_lone_negatives",
    "parse_context",
    "prompt_groups",
]
