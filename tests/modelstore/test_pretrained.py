"""``sam2unet-assist download --pretrained NAME``: the authors' released task models fetched with
gdown (here from a loopback HTTP server: no internet), verified by a strict load, recorded with
their sha256, and used by the first version of an empty registry. Unknown names, failed
downloads and corrupt or foreign files are clear errors, with no file left behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.settings import Settings
from modelstore.bootstrap import ensure_current_version
from modelstore.pretrained import PretrainedError, find_downloaded, pick_file
from modelstore.registry import ModelRegistry
from modelstore.version_heads import CROP_HEAD, decoder_trained, heads_json
from sam2unet.checkpoints import load_released
from sam2unet.predictor import Predictor
from sam2unet.random_weights import write_official_checkpoint
from sam2unet.synthetic import generate
from tests.support.model_helpers import (
    cpu_config,
    perturb_trainable,
    released_state,
    seeded_model,
)
from tests.support.services import ROOT, file_server


def download(model_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM2UNET_", "LABEL_STUDIO"))}
    env.update(MODEL_DIR=str(model_dir), LOG_LEVEL="INFO")
    return subprocess.run(
        [sys.executable, "-m", "cli", "download", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A loopback server holding a released-format checkpoint (test size, perturbed decoder),
    a corrupt file and an official SAM2 checkpoint."""
    root = tmp_path_factory.mktemp("released")
    model = seeded_model(cpu_config(), seed=3)
    perturb_trainable(model, seed=4)
    torch.save(released_state(model), root / "SAM2UNet-SOD.pth")
    (root / "corrupt.pth").write_bytes((root / "SAM2UNet-SOD.pth").read_bytes()[:5000])
    write_official_checkpoint(root / "sam2_hiera_test.pt", model)
    with file_server(root) as url:
        yield root, url


def test_download_verifies_records_and_seeds_the_first_version(served, tmp_path):
    root, url = served
    model_dir = tmp_path / "models"
    done = download(model_dir, "--pretrained", "salient", "--url", f"{url}/SAM2UNet-SOD.pth")
    assert done.returncode == 0, done.stderr
    saved = model_dir / "base" / "SAM2UNet-SOD.pth"
    want = hashlib.sha256((root / "SAM2UNet-SOD.pth").read_bytes()).hexdigest()
    assert want in done.stdout and "the first model version" in done.stdout
    manifest = json.loads((model_dir / "base" / "pretrained.json").read_text())
    assert manifest["latest"] == "salient"
    assert manifest["models"]["salient"]["sha256"] == want
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == want
    assert find_downloaded(model_dir / "base") == ("salient", saved)

    # an official checkpoint is there too: the released task model still comes first
    write_official_checkpoint(
        model_dir / "base" / "sam2.1_hiera_test.pt", seeded_model(cpu_config()), "sam2.1"
    )
    settings = Settings(model_dir=model_dir, model_size="test", image_size=64, device="cpu")
    registry = ModelRegistry(model_dir, None)
    info = ensure_current_version(registry, settings)
    assert info.source == "released:salient" and decoder_trained(info)
    # its trunk was taken from the released weights: no SAM2 prompt decoder to serve prompts
    assert heads_json(info, registry) == {"prompt_head": CROP_HEAD, "automatic_head_trained": True}
    images = [img for img, _ in generate(3, 64, seed=2)]
    reference = load_released(root / "SAM2UNet-SOD.pth", image_size=64)
    loaded = registry.load(info.name)
    ours = Predictor(loaded.model, loaded.config, device="cpu").predict(images)
    theirs = Predictor(reference.model, reference.config, device="cpu").predict(images)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # a later download says that the registry, no longer empty, will not start from it
    again = download(model_dir, "--pretrained", "mirror", "--url", f"{url}/SAM2UNet-SOD.pth")
    assert again.returncode == 0 and "already holds versions" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pretrained", "zebras"], "no released SAM2-UNet model called 'zebras'"),
        (["--pretrained", "polyp", "--url", "{url}/missing.pth"], "cannot download"),
        (["--pretrained", "polyp", "--url", "http://127.0.0.1:9/x.pth"], "cannot download"),
        (["--pretrained", "polyp", "--url", "{url}/corrupt.pth"], "not a released SAM2-UNet"),
        (["--pretrained", "polyp", "--url", "{url}/sam2_hiera_test.pt"], "not a released"),
        (["--pretrained", "polyp", "--size", "tiny"], "do not go together"),
        (["--url", "{url}/SAM2UNet-SOD.pth"], "--url goes with --pretrained"),
    ],
)
def test_bad_downloads_are_clear_errors_leaving_nothing(served, tmp_path, args, message):
    _, url = served
    model_dir = tmp_path / "models"
    done = download(model_dir, *[a.format(url=url) for a in args])
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    base = model_dir / "base"
    left = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
    assert left == []


def test_a_changed_file_is_not_used(served, tmp_path):
    _, url = served
    model_dir = tmp_path / "models"
    assert (
        download(model_dir, "--pretrained", "mirror", "--url", f"{url}/SAM2UNet-SOD.pth").returncode
        == 0
    )
    saved = model_dir / "base" / "SAM2UNet-MSD.pth"
    assert find_downloaded(model_dir / "base") == ("mirror", saved)
    with open(saved, "ab") as f:
        f.write(b"\0")
    assert find_downloaded(model_dir / "base") is None
    settings = Settings(model_dir=model_dir, model_size="test", image_size=64, device="cpu")
    info = ensure_current_version(ModelRegistry(model_dir, None), settings)
    assert info.source == "random-init" and not decoder_trained(info)


def test_pick_file_from_a_folder_listing():
    listing = [
        ("id-maps", "SAM2-UNet/maps/COD.zip"),
        ("id-cod", "SAM2-UNet/SAM2UNet-COD.pth"),
        ("id-msd", "SAM2-UNet/SAM2UNet-MSD.pth"),
        ("id-pmd", "SAM2-UNet/SAM2UNet-PMD.pth"),
    ]
    assert pick_file("camouflaged", listing) == ("id-cod", "SAM2UNet-COD.pth")
    assert pick_file("mirror", listing) == ("id-msd", "SAM2UNet-MSD.pth")
    assert pick_file("mirror-pmd", listing) == ("id-pmd", "SAM2UNet-PMD.pth")
    with pytest.raises(PretrainedError, match="no checkpoint for 'polyp'"):
        pick_file("polyp", listing)
    with pytest.raises(PretrainedError, match="no released SAM2-UNet model called"):
        pick_file("nope", listing)
