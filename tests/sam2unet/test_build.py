"""Model construction for every size: shapes, trainable parameter counts, frozen trunk,
input-size checks."""

from __future__ import annotations

import pytest
import torch

from sam2unet.build import SIZES, build_trunk, count_parameters
from sam2unet.config import HIERA_SPECS, ModelConfig
from sam2unet.exceptions import ConfigError, ImageError
from sam2unet.modeling.sam2unet import is_frozen_key
from tests.support.model_helpers import cpu_config, seeded_model


def block_input_dims(stages: tuple[int, ...], dims: tuple[int, ...]) -> list[int]:
    """Input width of every Hiera block: a stage's first block still sees the previous
    stage's width (it doubles the width and pools); the others see the stage's width."""
    out = []
    for s, n in enumerate(stages):
        out.append(dims[s - 1] if s > 0 else dims[0])
        out.extend([dims[s]] * (n - 1))
    return out


def expected_trainable(config: ModelConfig) -> int:
    """Trainable parameters from first principles.

    Adapter on a block of width d, hidden h: Linear(d, h) + Linear(h, d) = 2 d h + h + d.
    BasicConv2d(cin, cout, kh x kw) = cin cout kh kw (no bias) + 2 cout (BN weight, bias).
    RFB(cin, c): 1x1 branch; three branches 1x1, 1xk, kx1, dilated 3x3 (k = 3, 5, 7);
    conv_cat 4c -> c 3x3; conv_res 1x1.
    Up(2c, c): DoubleConv 2c -> c -> c, 3x3 convs without bias, each + BN.
    side1, side2, head: Conv2d(c, K, 1) with bias.
    """
    spec = config.hiera
    h, c, k = config.adapter_dim, config.rfb_channels, config.num_classes
    adapters = sum(2 * d * h + h + d for d in block_input_dims(spec.stages, spec.stage_channels))

    def conv_bn(cin: int, cout: int, kh: int, kw: int) -> int:
        return cin * cout * kh * kw + 2 * cout

    def rfb(cin: int) -> int:
        n = conv_bn(cin, c, 1, 1)  # branch0
        for ks in (3, 5, 7):
            n += conv_bn(cin, c, 1, 1) + conv_bn(c, c, 1, ks) + conv_bn(c, c, ks, 1)
            n += conv_bn(c, c, 3, 3)
        return n + conv_bn(4 * c, c, 3, 3) + conv_bn(cin, c, 1, 1)

    rfbs = sum(rfb(cin) for cin in spec.stage_channels)
    ups = 3 * (conv_bn(2 * c, c, 3, 3) + conv_bn(c, c, 3, 3))
    heads = 3 * (c * k + k)
    return adapters + rfbs + ups + heads


@pytest.mark.parametrize(
    ("size", "side"), [("test", 64), ("test", 96), ("tiny", 64), ("small", 64)]
)
def test_forward_shapes_on_cpu(size: str, side: int) -> None:
    model = SIZES[size](image_size=side).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == 3
    for o in outs:  # final, side1, side2: all at the input size
        assert o.shape == (2, 1, side, side)
        assert torch.isfinite(o).all()


@pytest.mark.parametrize("size", ["base_plus", "large"])
def test_large_sizes_build_on_meta(size: str) -> None:
    model = SIZES[size](device="meta")
    assert all(p.is_meta for p in model.parameters())
    trainable, total = count_parameters(model)
    config = ModelConfig(size=size)
    assert trainable == expected_trainable(config)
    trunk_total = sum(p.numel() for p in build_trunk(HIERA_SPECS[size]).parameters())
    assert total == trainable + trunk_total


@pytest.mark.parametrize("size", list(HIERA_SPECS))
@pytest.mark.parametrize("labels", [("object",), ("a", "b", "c")])
def test_trainable_parameter_count(size: str, labels: tuple[str, ...]) -> None:
    model = SIZES[size](device="meta", labels=labels)
    trainable, total = count_parameters(model)
    assert trainable == expected_trainable(ModelConfig(size=size, labels=labels))
    assert trainable < total


def test_block_input_dims_match_the_trunk() -> None:
    spec = HIERA_SPECS["tiny"]
    trunk = build_trunk(spec)
    real = [b.attn.qkv.in_features for b in trunk.blocks]
    assert real == block_input_dims(spec.stages, spec.stage_channels)


def test_trunk_frozen_adapters_and_decoder_train() -> None:
    model = seeded_model(cpu_config())
    for name, p in model.named_parameters():
        assert p.requires_grad == (not is_frozen_key(name)), name
    assert any(".prompt_learn." in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(
        not p.requires_grad
        for n, p in model.named_parameters()
        if n.startswith("encoder.") and ".prompt_learn." not in n
    )


def test_gradients_reach_adapters_only_through_frozen_trunk() -> None:
    model = seeded_model(cpu_config())
    model(torch.randn(1, 3, 64, 64))[0].mean().backward()
    adapter = model.encoder.blocks[0].prompt_learn[0].weight
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("side", [0, 100, 48, 353, -32])
def test_config_rejects_sides_not_multiple_of_32(side: int) -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        ModelConfig(size="test", image_size=side)


@pytest.mark.parametrize("shape", [(1, 3, 100, 100), (1, 3, 64, 48), (1, 3, 33, 64), (3, 64, 64)])
def test_forward_rejects_bad_input_shapes(shape: tuple[int, ...]) -> None:
    model = seeded_model(cpu_config()).eval()
    with pytest.raises(ImageError, match="multiples of 32"):
        model(torch.randn(*shape))


def test_non_square_multiple_of_32_is_accepted() -> None:
    model = seeded_model(cpu_config()).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert all(o.shape == (1, 1, 64, 96) for o in outs)


def test_unknown_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown model size 'huge'"):
        ModelConfig(size="huge")
