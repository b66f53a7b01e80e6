"""Which head serves what, per model version: the checkpoint whose SAM2 prompt head answers a
version's prompts, and whether its automatic head was ever trained.

* **Prompts** (Label Studio keypoints and rectangles) are answered by SAM2's own prompt encoder
  and mask decoder (``"sam2"``) when the version's base is an official SAM2/SAM2.1 checkpoint
  that holds them (``sam_prompt_encoder.*`` and ``sam_mask_decoder.*`` in its ``model``);
  otherwise (a random trunk, a trunk taken from the authors' released SAM2-UNet weights) by
  crop-and-segment around the U-Net (``"crop"``).
* **Automatic predictions** (no prompts) come from the U-Net decoder, and only when it was ever
  trained: a version made from an official SAM2 checkpoint or a random trunk has a freshly
  initialised decoder, whose maps are noise. Such a version makes no automatic prediction: the
  worker marks each task's empty result ``<version>/untrained``
  (:func:`contracts.untrained.untrained_version`), the backend answers Label Studio with no
  prediction for it, and prompts are still served.
  A version made by a training round or from released SAM2-UNet weights is trained.

Torch-free unless a version predates these records and its base file must be inspected.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelstore.bootstrap import SAM2_SOURCE_PREFIX, UNTRAINED_SOURCE
from sam2unet.exceptions import CheckpointError

if TYPE_CHECKING:
    from modelstore.registry import ModelRegistry, VersionInfo

log = logging.getLogger(__name__)

SAM2_HEAD = "sam2"
CROP_HEAD = "crop"


def decoder_trained(info: VersionInfo) -> bool:
    """Whether ``info``'s automatic head (the U-Net decoder) was ever trained. Versions written
    before this was recorded: untrained when made from an official SAM2 checkpoint or a random
    trunk (the registry's first version), trained otherwise."""
    if info.decoder_trained is not None:
        return bool(info.decoder_trained)
    return not (info.source == UNTRAINED_SOURCE or info.source.startswith(SAM2_SOURCE_PREFIX))


def prompt_head_for(info: VersionInfo, registry: ModelRegistry | None = None) -> str:
    """``"sam2"`` when ``info``'s base is an official SAM2/SAM2.1 checkpoint holding SAM2's
    prompt encoder and mask decoder, else ``"crop"``. Read from the version's record; for a
    version without one, from its base file in ``registry`` (when given)."""
    flag = info.base_prompt_decoder
    if flag is None and registry is not None and info.base:
        path = registry.base_path(info.base.get("name", ""))
        if path is not None:
            # torch, for a version without the record (through sam2unet.checkpoints): the backend imports this module and never loads it
            from sam2unet.checkpoints import has_prompt_decoder

            flag = has_prompt_decoder(path)
    return SAM2_HEAD if flag else CROP_HEAD


def heads_json(info: VersionInfo, registry: ModelRegistry | None = None) -> dict[str, Any]:
    """``{"prompt_head": "sam2" | "crop", "automatic_head_trained": bool}`` for ``info``."""
    return {
        "prompt_head": prompt_head_for(info, registry),
        "automatic_head_trained": decoder_trained(info),
    }


def untrained_warning(info: VersionInfo) -> str:
    """The operator-facing line for a version whose automatic head was never trained."""
    return (
        f"{info.name}: the automatic head (U-Net decoder) was never trained, so no automatic "
        "predictions are made (Label Studio shows none); prompts are served. Label tasks "
        "(click, accept) and let a training round run, or start from a released task model "
        "(`sam2unet-assist download --pretrained NAME`)"
    )


# --------------------------------------------------------------------------- trunk identity


def trunk_digest(state: Mapping[str, Any]) -> str:
    """sha256 of a Hiera trunk's tensors (bare keys): each key, dtype, shape and bytes, in key
    order. Equal for the same weights however they were stored (an official checkpoint, the
    authors' released SAM2-UNet weights, a version's embedded trunk)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(dtype=_byte_dtype()).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _byte_dtype() -> Any:
    # torch: the backend imports this module and never loads it
    import torch

    return torch.uint8


def official_trunk_digest(
    path: str | os.PathLike[str],
    _cache: dict[tuple[str, int, int], str | None] = {},  # noqa: B006
) -> str | None:
    """:func:`trunk_digest` of an official SAM2/SAM2.1 checkpoint's trunk, or None for any
    other file (or one that cannot be read). Cached per (path, size, mtime) for the life of the
    process; the file is memory-mapped, so only the trunk's tensors are read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        # torch (through sam2unet.checkpoints): the backend imports this module and never loads it
        from sam2unet.checkpoints import detect_format, load_mapped, trunk_state_from_sam2

        digest = None
        try:
            obj = load_mapped(path)
            if detect_format(obj) == "sam2":
                digest = trunk_digest(trunk_state_from_sam2(obj))
        except Exception as e:  # torch raises many types for a file that is no checkpoint
            log.debug("%s is not an official SAM2 checkpoint: %s", path, e)
        _cache[key] = digest
    return _cache[key]


CHECKPOINT_SUFFIXES = (".pt", ".pth")


def matching_official(
    trunk_state: Mapping[str, Any], search_dirs: Iterable[str | os.PathLike[str]]
) -> Path | None:
    """The official SAM2/SAM2.1 checkpoint in ``search_dirs`` whose trunk equals
    ``trunk_state`` (by :func:`trunk_digest`) and that holds SAM2's prompt encoder and mask
    decoder, or None. Files are tried in name order; each file's digest is computed once."""
    # torch (through sam2unet.checkpoints): the backend imports this module and never loads it
    from sam2unet.checkpoints import has_prompt_decoder

    wanted: str | None = None
    for d in search_dirs:
        folder = Path(d)
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix not in CHECKPOINT_SUFFIXES or not path.is_file():
                continue
            digest = official_trunk_digest(path)
            if digest is None:
                continue
            if wanted is None:
                wanted = trunk_digest(trunk_state)
            if digest == wanted and has_prompt_decoder(path):
                return path
    return None


def head_checkpoint(
    loaded: Any, search_dirs: list[str | os.PathLike[str]]
) -> tuple[Path | None, str]:
    """The checkpoint whose SAM2 prompt head answers the prompts of ``loaded`` (a
    :class:`sam2unet.checkpoints.LoadedModel`), as workers and the trainer both choose it: the
    version's base checkpoint when that holds a head, else an official checkpoint in
    ``search_dirs`` whose trunk is the model's own (a version made from the authors' released
    weights). ``(None, why)`` when prompts go to crop-and-segment."""
    # torch (through sam2unet.checkpoints): the backend imports this module and never loads it
    from sam2unet.checkpoints import find_base, has_prompt_decoder, trunk_state_of

    why = "the model has no base checkpoint"
    if loaded.base is not None:
        try:
            path = find_base(loaded.base, search_dirs)
        except CheckpointError as e:
            why = f"base {loaded.base.name}: {e}"
        else:
            if has_prompt_decoder(path):
                return path, ""
            why = f"base {loaded.base.name} holds no SAM2 prompt head"
    match = matching_official(trunk_state_of(loaded.model), search_dirs)
    if match is None:
        return None, f"{why}, and no official SAM2 checkpoint there has the model's trunk"
    return match, ""
