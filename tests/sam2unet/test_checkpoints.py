"""Strict loading of the three checkpoint formats, built here with the "test" size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sam2unet.checkpoints import (
    BaseRef,
    build_from_sam2,
    detect_format,
    load_any,
    load_delta,
    load_released,
    read_delta,
    save_delta,
    trunk_state_of,
)
from sam2unet.exceptions import CheckpointError
from sam2unet.modeling.sam2unet import SAM2UNet, is_frozen_key
from sam2unet.random_weights import SAM21_EXTRA_SHAPES, write_official_checkpoint
from tests.support.model_helpers import (
    cpu_config,
    perturb_trainable,
    released_state,
    seeded_model,
)

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def outputs(model: SAM2UNet) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.eval()(X)


def assert_same_outputs(a: SAM2UNet, b: SAM2UNet) -> None:
    for oa, ob in zip(outputs(a), outputs(b), strict=True):
        assert torch.equal(oa, ob)


def assert_same_trunk(a: SAM2UNet, b: SAM2UNet) -> None:
    ta, tb = trunk_state_of(a), trunk_state_of(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture
def source() -> SAM2UNet:
    model = seeded_model(cpu_config(), seed=3)
    perturb_trainable(model)
    return model


@pytest.mark.parametrize("version", ["sam2", "sam2.1"])
def test_official_checkpoint_loads_trunk_and_ignores_the_rest(
    tmp_path: Path, source: SAM2UNet, version: str
) -> None:
    path = write_official_checkpoint(tmp_path / f"{version}_hiera_test.pt", source, version)
    raw = torch.load(path, weights_only=True)
    assert detect_format(raw) == "sam2"
    if version == "sam2.1":
        assert set(SAM21_EXTRA_SHAPES) <= set(raw["model"])
    loaded = build_from_sam2(path, image_size=64)
    assert loaded.config.size == "test"
    assert loaded.base == BaseRef(path.name, BaseRef.of(path).sha256)
    assert loaded.source_format == "sam2"
    assert_same_trunk(loaded.model, source)
    # load_any detects the format from the content
    assert load_any(path, image_size=64).source_format == "sam2"


def test_official_checkpoint_with_wrong_trunk_key_names_it(
    tmp_path: Path, source: SAM2UNet
) -> None:
    path = write_official_checkpoint(tmp_path / "sam2.pt", source)
    obj = torch.load(path, weights_only=True)
    obj["model"]["image_encoder.trunk.blocks.0.attn.bogus"] = torch.zeros(3)
    del obj["model"]["image_encoder.trunk.blocks.1.mlp.layers.0.weight"]
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as e:
        build_from_sam2(path)
    assert "blocks.0.attn.bogus" in str(e.value)
    assert "blocks.1.mlp.layers.0.weight" in str(e.value)


def test_official_checkpoint_with_wrong_shape_names_key(tmp_path: Path, source: SAM2UNet) -> None:
    path = write_official_checkpoint(tmp_path / "sam2.pt", source)
    obj = torch.load(path, weights_only=True)
    obj["model"]["image_encoder.trunk.blocks.2.norm1.weight"] = torch.zeros(5)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"blocks\.2\.norm1\.weight"):
        build_from_sam2(path)


def test_released_state_dict_loads_strictly_and_drops_up4(tmp_path: Path, source: SAM2UNet) -> None:
    state = released_state(source)
    assert any(k.startswith("up4.") for k in state)
    path = tmp_path / "SAM2-UNet-20.pth"
    torch.save(state, path)
    loaded = load_released(path, image_size=64)
    assert loaded.source_format == "released" and loaded.base is None
    assert loaded.config.size == "test"
    assert not any(k.startswith("up4.") for k in loaded.model.state_dict())
    assert_same_outputs(loaded.model, source)
    assert load_any(path, image_size=64).source_format == "released"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda s: s.update({"rfb5.conv.weight": torch.zeros(1)}), "rfb5.conv.weight"),
        (lambda s: s.pop("head.weight"), "head.weight"),
        (lambda s: s.pop("encoder.blocks.3.prompt_learn.2.bias"), "blocks.3.prompt_learn.2.bias"),
        (lambda s: s.update({"side1.weight": torch.zeros(2, 64, 1, 1)}), "side1.weight"),
    ],
    ids=["extra", "missing", "missing-adapter", "shape"],
)
def test_released_wrong_keys_name_the_key(tmp_path: Path, source: SAM2UNet, edit, key) -> None:
    state = released_state(source)
    edit(state)
    path = tmp_path / "released.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_released(path)


def test_delta_round_trip_with_base(tmp_path: Path, source: SAM2UNet) -> None:
    base_path = write_official_checkpoint(tmp_path / "sam2.1_hiera_test.pt", source, "sam2.1")
    config = cpu_config()
    base = BaseRef.of(base_path)
    delta = save_delta(tmp_path / "models" / "v1.pt", source, config, base, {"miou": 0.5})
    payload = read_delta(delta)
    keys = set(payload["weights"])
    assert keys == set(source.trainable_state_dict())
    assert not any(is_frozen_key(k) for k in keys)
    assert payload["base"] == {"name": base_path.name, "sha256": base.sha256}
    n_trunk = sum(v.numel() for k, v in source.state_dict().items() if is_frozen_key(k))
    assert sum(v.numel() for v in payload["weights"].values()) < n_trunk * 10  # sanity
    loaded = load_delta(delta, search_dirs=[tmp_path])
    assert loaded.config == config
    assert loaded.base == base
    assert loaded.metrics == {"miou": 0.5}
    assert_same_outputs(loaded.model, source)
    assert load_any(delta, [tmp_path]).source_format == "delta"


def test_delta_without_base_embeds_the_trunk(tmp_path: Path, source: SAM2UNet) -> None:
    path = save_delta(tmp_path / "v.pt", source, cpu_config(), None)
    payload = read_delta(path)
    assert payload["embedded_trunk"] and payload["base"] is None
    assert set(payload["weights"]) == set(source.state_dict())
    assert_same_outputs(load_delta(path).model, source)


def test_delta_base_hash_mismatch_is_an_error(tmp_path: Path, source: SAM2UNet) -> None:
    base_path = write_official_checkpoint(tmp_path / "base" / "sam2_hiera_test.pt", source)
    delta = save_delta(tmp_path / "v.pt", source, cpu_config(), BaseRef.of(base_path))
    other = seeded_model(cpu_config(), seed=99)
    write_official_checkpoint(base_path, other)  # same name, different content
    with pytest.raises(CheckpointError, match="sha256"):
        load_delta(delta, search_dirs=[tmp_path])
    with pytest.raises(CheckpointError, match="not the base"):
        load_delta(delta, base_path=base_path)


def test_delta_missing_base_is_an_error(tmp_path: Path, source: SAM2UNet) -> None:
    base_path = write_official_checkpoint(tmp_path / "a" / "sam2_hiera_test.pt", source)
    delta = save_delta(tmp_path / "b" / "v.pt", source, cpu_config(), BaseRef.of(base_path))
    with pytest.raises(CheckpointError, match=r"sam2_hiera_test\.pt.*not found"):
        load_delta(delta)
    assert_same_outputs(load_delta(delta, [tmp_path / "a"]).model, source)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda w: w.update({"rfb1.bogus": torch.zeros(1)}), "rfb1.bogus"),
        (
            lambda w: w.pop("up2.conv.double_conv.1.running_mean"),
            "up2.conv.double_conv.1.running_mean",
        ),
        (lambda w: w.update({"encoder.pos_embed": torch.zeros(1)}), "encoder.pos_embed"),
    ],
    ids=["extra", "missing", "frozen-key"],
)
def test_delta_wrong_keys_name_the_key(tmp_path: Path, source: SAM2UNet, edit, key) -> None:
    base_path = write_official_checkpoint(tmp_path / "sam2.pt", source)
    delta = save_delta(tmp_path / "v.pt", source, cpu_config(), BaseRef.of(base_path))
    payload = torch.load(delta, weights_only=True)
    edit(payload["weights"])
    torch.save(payload, delta)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_delta(delta, [tmp_path])


def test_unrecognised_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint"):
        load_any(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_any(tmp_path / "junk.pt")
