"""Checkpoint formats: reading and writing.

Three checkpoint formats are understood:

* official SAM2 / SAM2.1 checkpoints (``{"model": {...}}`` with ``image_encoder.trunk.*`` keys),
  any size: only the trunk is used, the rest (memory modules, SAM heads, FPN neck) is ignored;
* the state dicts released with the SAM2-UNet paper (``encoder.blocks.N.block.*``,
  ``encoder.blocks.N.prompt_learn.*``, ``rfb1..4``, ``up1..4``, ``side1``, ``side2``, ``head``);
  their ``up4`` is built but never used in the forward pass and is dropped explicitly;
* our delta format: the model config, only the trainable weights (adapters + decoder), the base
  SAM2 checkpoint's file name and sha256, metrics and optional training state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sam2unet.build import build_sam2unet, key_summary, load_strict
from sam2unet.config import HIERA_SPECS, ModelConfig
from sam2unet.exceptions import CheckpointError, ConfigError
from sam2unet.modeling.sam2unet import SAM2UNet, is_frozen_key
from sam2unet.prompt_head import build_prompt_head

log = logging.getLogger(__name__)

DELTA_FORMAT = "sam2unet-assist.delta"
DELTA_FORMAT_VERSION = 1
_TRUNK_PREFIX = "image_encoder.trunk."
_RELEASED_UNUSED_PREFIX = "up4."


def _torch_load(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def load_mapped(path: str | os.PathLike[str]) -> Any:
    """A checkpoint memory-mapped (only the tensors used are read), or loaded whole when it is
    not a zip-format file (mmap needs one); CheckpointError when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types; the plain load says what is wrong
        return _torch_load(path)


def infer_size(trunk_state: Mapping[str, torch.Tensor]) -> str:
    """The size whose Hiera settings match a trunk state dict (embed dim and block count)."""
    if "pos_embed" not in trunk_state:
        raise CheckpointError("trunk state has no pos_embed: not a Hiera trunk")
    embed = int(trunk_state["pos_embed"].shape[1])
    blocks = {int(k.split(".")[1]) for k in trunk_state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    for name, spec in HIERA_SPECS.items():
        if spec.embed_dim == embed and spec.depth == depth:
            return name
    raise CheckpointError(
        f"no known size has a Hiera trunk with embed dim {embed} and {depth} blocks"
    )


def detect_format(obj: Any) -> str:
    """'sam2' (official SAM2/SAM2.1), 'released' (SAM2-UNet authors), 'delta' (ours)."""
    if isinstance(obj, dict) and obj.get("format") == DELTA_FORMAT:
        return "delta"
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("model"), dict)
        and any(k.startswith(_TRUNK_PREFIX) for k in obj["model"])
    ):
        return "sam2"
    if isinstance(obj, dict) and any(
        isinstance(k, str) and k.startswith("encoder.blocks.") for k in obj
    ):
        return "released"
    keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        "unrecognised checkpoint: expected an official SAM2/SAM2.1 checkpoint "
        "({'model': {'image_encoder.trunk.*': ...}}), a released SAM2-UNet state dict "
        f"('encoder.blocks.N.*'), or a sam2unet-assist delta; found {keys}"
    )


def trunk_state_from_sam2(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The bare Hiera keys of an official SAM2/SAM2.1 checkpoint's ``model`` dict."""
    model = obj["model"]
    trunk = {k[len(_TRUNK_PREFIX) :]: v for k, v in model.items() if k.startswith(_TRUNK_PREFIX)}
    if not trunk:
        raise CheckpointError("the checkpoint's 'model' has no image_encoder.trunk.* keys")
    return trunk


def load_sam2_trunk(path: str | os.PathLike[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """(size, trunk state) from an official SAM2 or SAM2.1 checkpoint file."""
    obj = _torch_load(path)
    fmt = detect_format(obj)
    if fmt != "sam2":
        raise CheckpointError(f"{path} is a {fmt} checkpoint, not an official SAM2/SAM2.1 one")
    trunk = trunk_state_from_sam2(obj)
    return infer_size(trunk), trunk


PROMPT_DECODER_PREFIXES = ("sam_prompt_encoder.", "sam_mask_decoder.")


def has_prompt_decoder(
    path: str | os.PathLike[str],
    _cache: dict[tuple[str, int, int], bool] = {},  # noqa: B006
) -> bool:
    """Whether ``path`` is an official SAM2/SAM2.1 checkpoint whose ``model`` holds SAM2's
    prompt encoder and mask decoder (``sam_prompt_encoder.*`` and ``sam_mask_decoder.*``), in
    full: the promptable head a worker would build (neck, prompt encoder, mask decoder,
    ``no_mem_embed``) loads from it strictly for the size of its trunk
    (:func:`sam2unet.prompt_head.build_prompt_head`), so that what is reported is what workers
    serve. Any other file, or one that cannot be read, is False. Cached per (path, size,
    mtime); the file is memory-mapped, so only the head's tensors are read."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        try:
            obj = load_mapped(path)
        except CheckpointError:
            obj = None
        model = obj.get("model") if isinstance(obj, dict) else None
        keys = [k for k in model if isinstance(k, str)] if isinstance(model, dict) else []
        found = all(any(k.startswith(p) for k in keys) for p in PROMPT_DECODER_PREFIXES)
        _cache[key] = found and _head_loads(obj)
    return _cache[key]


def _head_loads(obj: dict[str, Any]) -> bool:
    try:
        size = infer_size(trunk_state_from_sam2(obj))
        build_prompt_head(size, obj["model"])
    except CheckpointError as e:
        log.info("SAM2 prompt decoder keys present but not loadable: %s", e)
        return False
    return True


def sha256_file(path: str | os.PathLike[str], _cache: dict[tuple[str, int, int], str] = {}) -> str:  # noqa: B006
    """sha256 of a file, cached per (path, size, mtime) for the life of the process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


@dataclass(frozen=True)
class BaseRef:
    """Identity of the base SAM2 checkpoint whose trunk a model uses."""

    name: str
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> BaseRef:
        return cls(Path(path).name, sha256_file(path))


@dataclass
class LoadedModel:
    """A model with what its checkpoint said about it."""

    model: SAM2UNet
    config: ModelConfig
    base: BaseRef | None
    source_format: str
    metrics: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def build_from_sam2(
    path: str | os.PathLike[str], config: ModelConfig | None = None, **overrides: Any
) -> LoadedModel:
    """A fresh SAM2-UNet (new adapters and decoder) on the trunk of an official checkpoint.

    The size is read from the checkpoint; a ``config`` of another size is an error.
    """
    size, trunk = load_sam2_trunk(path)
    if config is None:
        config = ModelConfig(size=size, **overrides)
    elif config.size != size:
        raise CheckpointError(f"{path} holds a {size} trunk but the config asks for {config.size}")
    model = build_sam2unet(config, trunk)
    return LoadedModel(model, config, BaseRef.of(path), "sam2")


def load_released(path: str | os.PathLike[str], **overrides: Any) -> LoadedModel:
    """A model from a state dict released with the SAM2-UNet paper (strict; ``up4`` dropped)."""
    state = _torch_load(path)
    if detect_format(state) != "released":
        raise CheckpointError(f"{path} is not a released SAM2-UNet state dict")
    unused = [k for k in state if k.startswith(_RELEASED_UNUSED_PREFIX)]
    if unused:
        log.debug("dropping %d keys of the released model's unused up4 stage", len(unused))
    state = {k: v for k, v in state.items() if not k.startswith(_RELEASED_UNUSED_PREFIX)}
    trunk = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    trunk = {
        k.replace(".block.", ".", 1) if k.startswith("blocks.") else k: v
        for k, v in trunk.items()
        if ".prompt_learn." not in k
    }
    config = ModelConfig(size=infer_size(trunk), **overrides)
    model = build_sam2unet(config)
    load_strict(model, state, what=f"released SAM2-UNet state dict {path}")
    return LoadedModel(model, config, None, "released")


def find_base(ref: BaseRef, search_dirs: Iterable[str | os.PathLike[str]]) -> Path:
    """Locate the base checkpoint file named by ``ref`` and verify its sha256."""
    dirs = [Path(d) for d in search_dirs if d]
    for d in dirs:
        for cand in (d / ref.name, d / "base" / ref.name):
            if cand.is_file():
                digest = sha256_file(cand)
                if digest != ref.sha256:
                    raise CheckpointError(
                        f"base checkpoint {cand} has sha256 {digest[:12]}..., "
                        f"but the model was trained on {ref.sha256[:12]}...: a different file"
                    )
                return cand
    raise CheckpointError(
        f"base checkpoint {ref.name} (sha256 {ref.sha256[:12]}...) not found in "
        f"{[str(d) for d in dirs]}; put it there or run `sam2unet-assist download`"
    )


def save_delta(
    path: str | os.PathLike[str],
    model: SAM2UNet,
    config: ModelConfig,
    base: BaseRef | None,
    metrics: Mapping[str, Any] | None = None,
    train_state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write our checkpoint format atomically (temp file in the same folder, then ``os.replace``).

    Only the trainable weights are stored when ``base`` names the trunk's checkpoint; with no
    base (a randomly initialised trunk) the trunk is embedded so that the file alone rebuilds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if base is None else model.trainable_state_dict()
    payload = {
        "format": DELTA_FORMAT,
        "format_version": DELTA_FORMAT_VERSION,
        "config": config.to_dict(),
        "base": None if base is None else {"name": base.name, "sha256": base.sha256},
        "embedded_trunk": base is None,
        "weights": {k: v.detach().cpu() for k, v in weights.items()},
        "metrics": dict(metrics or {}),
        "train_state": dict(train_state) if train_state is not None else None,
        "meta": {"saved_at": time.time(), **dict(meta or {})},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_delta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw payload of one of our checkpoints, checked for format and version."""
    obj = _torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{path} is not a sam2unet-assist checkpoint")
    if obj.get("format_version") != DELTA_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {obj.get('format_version')}, "
            f"this code reads version {DELTA_FORMAT_VERSION}"
        )
    return obj


def load_delta(
    path: str | os.PathLike[str],
    search_dirs: Iterable[str | os.PathLike[str]] = (),
    base_path: str | os.PathLike[str] | None = None,
    trunk_cache: dict[str, dict[str, torch.Tensor]] | None = None,
) -> LoadedModel:
    """Rebuild a model from our checkpoint: config, base trunk (found by name + sha256 in
    ``search_dirs`` and the checkpoint's own folder, or given as ``base_path``), then the
    trainable weights, strictly: the only keys allowed missing are the frozen trunk's.

    ``trunk_cache`` (sha256 -> trunk state) avoids re-reading a large base on every reload.
    """
    obj = read_delta(path)
    try:
        config = ModelConfig.from_dict(obj["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} has an invalid model config: {e}") from e
    weights: dict[str, torch.Tensor] = obj["weights"]
    base = BaseRef(**obj["base"]) if obj.get("base") else None
    if base is None:
        if not obj.get("embedded_trunk"):
            raise CheckpointError(f"{path} names no base checkpoint and embeds no trunk")
        model = build_sam2unet(config)
        load_strict(model, weights, what=f"checkpoint {path}")
    else:
        trunk = trunk_cache.get(base.sha256) if trunk_cache is not None else None
        if trunk is None:
            if base_path is not None:
                found = Path(base_path)
                if sha256_file(found) != base.sha256:
                    raise CheckpointError(
                        f"{found} is not the base {base.name} this model was trained on"
                    )
            else:
                found = find_base(base, [*search_dirs, Path(path).parent])
            size, trunk = load_sam2_trunk(found)
            if size != config.size:
                raise CheckpointError(
                    f"base {found} holds a {size} trunk, the model is {config.size}"
                )
            if trunk_cache is not None:
                trunk_cache[base.sha256] = trunk
        model = build_sam2unet(config, trunk)
        frozen = {k for k in model.state_dict() if is_frozen_key(k)}
        stray = [k for k in weights if is_frozen_key(k)]
        if stray:
            raise CheckpointError(
                f"checkpoint {path} carries frozen trunk keys: {key_summary(stray)}"
            )
        load_strict(model, weights, what=f"checkpoint {path}", allowed_missing=frozen)
    return LoadedModel(
        model,
        config,
        base,
        "delta",
        metrics=dict(obj.get("metrics") or {}),
        train_state=obj.get("train_state"),
        meta=dict(obj.get("meta") or {}),
    )


def load_any(
    path: str | os.PathLike[str],
    search_dirs: Iterable[str | os.PathLike[str]] = (),
    **overrides: Any,
) -> LoadedModel:
    """Load any of the three formats, detected from the file's content."""
    obj = _torch_load(path)
    fmt = detect_format(obj)
    del obj
    if fmt == "delta":
        return load_delta(path, search_dirs)
    if fmt == "released":
        return load_released(path, **overrides)
    return build_from_sam2(path, **overrides)


def write_sam2_checkpoint(
    path: str | os.PathLike[str],
    trunk_state: Mapping[str, torch.Tensor],
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a trunk in the official SAM2 checkpoint layout (``{"model": {...}}``)."""
    model = {f"{_TRUNK_PREFIX}{k}": v.detach().cpu() for k, v in trunk_state.items()}
    model.update(dict(extra or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model}, path)
    return path


def trunk_state_of(model: SAM2UNet) -> dict[str, torch.Tensor]:
    """The bare Hiera keys of a SAM2UNet's frozen trunk."""
    out = {}
    for k, v in model.state_dict().items():
        if is_frozen_key(k):
            bare = k[len("encoder.") :]
            if bare.startswith("blocks."):
                bare = bare.replace(".block.", ".", 1)
            out[bare] = v
    return out
