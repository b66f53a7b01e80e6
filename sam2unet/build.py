"""Building SAM2-UNet models: the ``sam2`` Hiera trunk per size, adapters, and strict loading of
state dicts (every missing or unexpected key is an error). Checkpoint formats are read and
written in :mod:`sam2unet.checkpoints`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sam2unet.config import HieraSpec, ModelConfig
from sam2unet.exceptions import CheckpointError
from sam2unet.modeling.encoder import add_adapters
from sam2unet.modeling.sam2unet import SAM2UNet


class _FactoryOnCPU(torch.overrides.TorchFunctionMode):
    """Inside a ``torch.device('meta')`` block, create ``linspace`` on the CPU: Hiera's
    constructor calls ``.item()`` on its stochastic-depth schedule, which a meta tensor can't do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextmanager
def _device_context(device: str | torch.device | None):
    if device is None:
        yield
    elif torch.device(device).type == "meta":
        with torch.device("meta"), _FactoryOnCPU():
            yield
    else:
        with torch.device(device):
            yield


def build_trunk(spec: HieraSpec) -> nn.Module:
    """A bare ``sam2`` Hiera trunk for a size's settings (random weights)."""
    try:
        # sam2 initialises hydra globally: imported only when a trunk is built
        from sam2.modeling.backbones.hieradet import Hiera
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the sam2 package is missing; install it with "
            "`SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2==1.1.0` "
            "(or run `make setup`)"
        ) from e
    return Hiera(
        embed_dim=spec.embed_dim,
        num_heads=spec.num_heads,
        stages=spec.stages,
        global_att_blocks=spec.global_att_blocks,
        window_pos_embed_bkg_spatial_size=spec.window_pos_embed_bkg_spatial_size,
        window_spec=spec.window_spec,
    )


def build_sam2unet(
    config: ModelConfig,
    trunk_state: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> SAM2UNet:
    """Build a SAM2-UNet for ``config``; load ``trunk_state`` (bare Hiera keys) strictly if given.

    ``device="meta"`` builds without allocating weights (for inspecting the larger sizes).
    """
    assert config.hiera is not None
    with _device_context(device):
        trunk = build_trunk(config.hiera)
        if trunk_state is not None:
            load_strict(trunk, trunk_state, what=f"Hiera trunk ({config.size})")
        encoder = add_adapters(trunk, config.adapter_dim)
        model = SAM2UNet(
            encoder,
            config.hiera.stage_channels,
            rfb_channels=config.rfb_channels,
            num_classes=config.num_classes,
        )
    return model


def _builder(size: str) -> Callable[..., SAM2UNet]:
    def build(
        trunk_state: Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device | None = None,
        **config: Any,
    ) -> SAM2UNet:
        return build_sam2unet(ModelConfig(size=size, **config), trunk_state, device)

    build.__name__ = f"build_sam2unet_{size}"
    build.__doc__ = f"Build the {size} SAM2-UNet (see :func:`build_sam2unet`)."
    return build


build_sam2unet_test = _builder("test")
build_sam2unet_tiny = _builder("tiny")
build_sam2unet_small = _builder("small")
build_sam2unet_base_plus = _builder("base_plus")
build_sam2unet_large = _builder("large")

SIZES: dict[str, Callable[..., SAM2UNet]] = {
    "test": build_sam2unet_test,
    "tiny": build_sam2unet_tiny,
    "small": build_sam2unet_small,
    "base_plus": build_sam2unet_base_plus,
    "large": build_sam2unet_large,
}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def key_summary(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    what: str,
    allowed_missing: set[str] | None = None,
) -> None:
    """Load ``state`` into ``module``; any unexpected key, missing key (beyond
    ``allowed_missing``) or shape mismatch raises :class:`CheckpointError` naming the keys."""
    own = module.state_dict()
    allowed_missing = allowed_missing or set()
    unexpected = set(state) - set(own)
    missing = set(own) - set(state) - allowed_missing
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {key_summary(unexpected)}")
    if missing:
        problems.append(f"missing keys: {key_summary(missing)}")
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in sorted(set(state) & set(own))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if shapes:
        problems.append(f"shape mismatches: {key_summary(shapes)}")
    if problems:
        raise CheckpointError(f"cannot load {what}: " + "; ".join(problems))
    if any(p.is_meta for p in own.values()):
        module.load_state_dict(dict(state), strict=False, assign=True)
    else:
        module.load_state_dict(dict(state), strict=False)
