"""``sam2unet-assist synth | train | evaluate`` through the real command-line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main
from sam2unet.checkpoints import read_delta
from sam2unet.data import FolderSource, train_val_datasets
from sam2unet.random_weights import write_official_checkpoint
from sam2unet.train_config import TrainConfig
from sam2unet.training import initial_model, train
from tests.support.model_helpers import cpu_config, seeded_model, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def data(workdir: Path) -> Path:
    assert main(["synth", "--out", str(workdir / "data"), "--n", "10", "--size", "96"]) == 0
    return workdir / "data"


@pytest.fixture(scope="module")
def sam2(workdir: Path) -> Path:
    return write_official_checkpoint(
        workdir / "base" / "sam2.1_hiera_test.pt", seeded_model(cpu_config()), "sam2.1"
    )


@pytest.fixture(scope="module")
def trained(workdir: Path, data: Path, sam2: Path) -> Path:
    argv = [
        "train",
        "--images", str(data / "images"),
        "--masks", str(data / "masks"),
        "--size", "test",
        "--sam2", str(sam2),
        "--image-size", "64",
        "--epochs", "2",
        "--batch-size", "4",
        "--val-split", "0.2",
        "--workers", "0",
        "--device", "cpu",
        "--out", str(workdir / "run"),
    ]  # fmt: skip
    assert main(argv) == 0
    return workdir / "run"


def test_synth_writes_pairs(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(list((data / "images").glob("*.png"))) == 10
    assert len(list((data / "masks").glob("*.png"))) == 10
    out = data.parent / "classes"
    assert (
        main(["synth", "--out", str(out), "--n", "2", "--size", "32", "--classes", "circle,square"])
        == 0
    )
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["circle", "square"]
    assert "masks (square)" in capsys.readouterr().out


def test_synth_rejects_unknown_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path), "--n", "1", "--classes", "star"]) == 2
    assert "star" in capsys.readouterr().err


def test_train_writes_checkpoints(trained: Path, sam2: Path) -> None:
    best = read_delta(trained / "best.pt")
    last = read_delta(trained / "last.pt")
    assert best["base"]["name"] == sam2.name
    assert best["config"]["size"] == "test" and best["config"]["image_size"] == 64
    assert last["train_state"]["epoch"] == 2
    assert last["train_state"]["train_config"]["epochs"] == 2
    assert "miou" in best["metrics"]
    assert len(json.loads((trained / "history.json").read_text())) == 2


def test_train_resume_continues(
    data: Path, sam2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a run of 2 epochs stopped after the first, as an interrupted `train` leaves it
    loaded = initial_model(cpu_config(), sam2=sam2)
    source = FolderSource(data / "images", data / "masks")
    train_data, val_data = train_val_datasets(source, 64, 0.2, seed=0)
    config = TrainConfig(epochs=2, batch_size=4, device="cpu", progress_bar=False)
    part = train(loaded, train_data, val_data, config, tmp_path, should_stop=lambda: True)
    assert part.epochs_done == 1
    argv = [
        "train",
        "--images", str(data / "images"),
        "--masks", str(data / "masks"),
        "--sam2", str(sam2),
        "--workers", "0",
        "--device", "cpu",
        "--out", str(tmp_path),
        "--resume", str(tmp_path / "last.pt"),
    ]  # fmt: skip
    assert main([*argv, "--epochs", "3"]) == 2  # changing the schedule is refused
    assert "epochs (checkpoint 2, asked 3)" in capsys.readouterr().err
    assert main(argv) == 0
    assert "epochs done: 2/2" in capsys.readouterr().out
    state = read_delta(tmp_path / "last.pt")["train_state"]
    assert state["epoch"] == 2 and [r["epoch"] for r in state["history"]] == [1, 2]


def test_evaluate_checkpoint_and_saved_predictions_agree(
    trained: Path, data: Path, sam2: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    argv = [
        "evaluate",
        "--checkpoint", str(trained / "best.pt"),
        "--images", str(data / "images"),
        "--masks", str(data / "masks"),
        "--search-dir", str(sam2.parent),
        "--save-pred", str(workdir / "pred"),
        "--device", "cpu",
        "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    by_model = json.loads(capsys.readouterr().out)
    assert by_model["count"] == 10 and 0 <= by_model["miou"] <= 1
    pred_argv = ["evaluate", "--pred", str(workdir / "pred"), "--gt", str(data / "masks"), "--json"]
    assert main(pred_argv) == 0
    assert json.loads(capsys.readouterr().out) == by_model
    assert main(pred_argv[:-1]) == 0
    table = capsys.readouterr().out
    assert "S-measure" in table and "mIoU" in table


def test_evaluate_errors(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--pred", str(data / "images")]) == 2
    assert "--pred and --gt" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(data / "images"), "--checkpoint", "x.pt"]) == 2
    (tmp_path / "pred").mkdir()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(data / "masks")]) == 2
    assert "no prediction files" in capsys.readouterr().err
