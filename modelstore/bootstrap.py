"""The first model version: created once, when the registry has never promoted anything.

Sources, in order: the configured ``SAM2UNET_INIT_CHECKPOINT`` (any checkpoint format); a
released SAM2-UNet task model fetched by ``sam2unet-assist download --pretrained NAME`` (the
latest one recorded in ``MODEL_DIR/base/pretrained.json``, checked against its sha256): trained,
automatic masks from the start; an official SAM2/SAM2.1 checkpoint found in ``MODEL_DIR/base`` or
``MODEL_DIR`` (fresh adapters and decoder: prompts only until the first round); else a randomly
initialised trunk, with a loud warning: predictions then come from an untrained encoder.

Only a version made from an official checkpoint or a random trunk is recorded as having an
untrained decoder (see :mod:`modelstore.version_heads`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from contracts.settings import Settings
from modelstore.pretrained import find_downloaded
from modelstore.registry import ModelRegistry, VersionInfo
from sam2unet.config import ModelConfig
from sam2unet.exceptions import CheckpointError

log = logging.getLogger(__name__)

UNTRAINED_SOURCE = "random-init"
SAM2_SOURCE_PREFIX = "sam2:"
RELEASED_SOURCE_PREFIX = "released:"


def find_sam2_checkpoints(registry: ModelRegistry) -> list[Path]:
    """Official-format checkpoints (``*.pt``) in ``MODEL_DIR/base`` and ``MODEL_DIR``."""
    out: list[Path] = []
    for d in (registry.base_dir, registry.model_dir):
        if d.is_dir():
            out.extend(sorted(p for p in d.glob("*.pt") if p.is_file()))
    return out


def ensure_current_version(registry: ModelRegistry, settings: Settings) -> VersionInfo:
    """The current version, creating and promoting the first one if there is none."""
    name = registry.current()
    if name:
        return registry.get(name)
    with registry.lock(timeout=600):
        name = registry.current()
        if name:
            return registry.get(name)
        info = _create_initial(registry, settings)
        registry.promote(info.name, reason="initial")
        return info


def _create_initial(registry: ModelRegistry, settings: Settings) -> VersionInfo:
    # torch: loaded only when a first version is made; the backend imports this module
    import torch

    from sam2unet.checkpoints import (
        BaseRef,
        build_from_sam2,
        load_any,
        load_released,
        load_sam2_trunk,
        trunk_state_of,
        write_sam2_checkpoint,
    )
    from sam2unet.random_weights import random_model

    registry.base_dir.mkdir(parents=True, exist_ok=True)
    released = None if settings.init_checkpoint else find_downloaded(registry.base_dir)
    trained = True
    if settings.init_checkpoint:
        path = Path(settings.init_checkpoint)
        loaded = load_any(path, search_dirs=[registry.base_dir, registry.model_dir])
        source = f"init-checkpoint:{path.name}"
        # a delta records whether its decoder was trained; an official checkpoint's is fresh
        trained = loaded.source_format != "sam2" and bool(loaded.meta.get("decoder_trained", True))
    elif released is not None:
        name, path = released
        loaded = load_released(path, image_size=settings.image_size)
        source = f"{RELEASED_SOURCE_PREFIX}{name}"
        log.info("first version from the released SAM2-UNet task model %r (%s)", name, path)
    else:
        trained = False
        loaded = None
        for cand in find_sam2_checkpoints(registry):
            try:
                size, _ = load_sam2_trunk(cand)
            except CheckpointError as e:
                log.info("not a SAM2 checkpoint, skipped: %s (%s)", cand, e)
                continue
            if size == settings.model_size:
                config = ModelConfig(size=size, image_size=settings.image_size)
                loaded = build_from_sam2(cand, config)
                source = f"{SAM2_SOURCE_PREFIX}{cand.name}"
                break
        if loaded is None:
            config = ModelConfig(size=settings.model_size, image_size=settings.image_size)
            loaded = random_model(config, seed=0)
            source = UNTRAINED_SOURCE
            log.warning(
                "NO SAM2 WEIGHTS FOUND in %s for size %s: predictions come from an UNTRAINED "
                "encoder. Put an official checkpoint there (`sam2unet-assist download --size %s`).",
                registry.model_dir,
                settings.model_size,
                settings.model_size,
            )
    base = loaded.base
    if base is None:
        # keep versions small: the trunk is written once as a base checkpoint and referenced
        trunk = trunk_state_of(loaded.model)
        tmp = registry.base_dir / ".trunk.tmp"
        write_sam2_checkpoint(tmp, trunk)
        ref = BaseRef.of(tmp)
        final = registry.base_dir / f"trunk-{loaded.config.size}-{ref.sha256[:12]}.pt"
        tmp.replace(final)
        base = BaseRef(final.name, ref.sha256)
        del trunk
    with torch.no_grad():
        return registry.create_version(
            loaded.model,
            loaded.config,
            base,
            source=source,
            metrics=loaded.metrics,
            decoder_trained=trained,
        )
