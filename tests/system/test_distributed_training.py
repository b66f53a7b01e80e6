"""Data-parallel training on the CPU with 2 gloo processes started by torch's elastic launcher.

- Two processes train like one: same loss per epoch, same held-out metrics (sharded, gathered
  exactly), same weights, with the same global batch and seed.
- The frozen trunk is outside DDP: its reducer holds exactly the trainable tensors.
- A round over 2 processes writes its version from rank 0's weights; a rank killed mid-round
  fails the round cleanly: nothing promoted or written, the lock released, the trainer serving.

Tolerance for the weights: the gradients of one process (a sum over 4 samples) and of two (two
sums over 2, then DDP's average) differ in float summation order only (about 1e-7 relative).
AdamW divides each update by the root of its running squared gradient, so on its first step an
element whose gradient is near zero moves by about +-lr whatever its size, and such an element
can move the other way after a 1e-7 change. So: at most 1 % of the elements may differ by more
than 1e-6, none by more than 2 * lr per step. A real divergence (other batches, BatchNorm over
half a batch, updates applied twice) moves most elements by about lr and fails this check.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal

import psutil
import pytest
import torch

from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from sam2unet.config import ModelConfig
from sam2unet.data import ArraySource, SegmentationDataset
from sam2unet.distributed import collectives, launcher
from sam2unet.distributed.ddp import sync_batchnorm, wrap_ddp
from sam2unet.distributed.launcher import DevicePlan, parse_devices
from sam2unet.exceptions import ConfigError
from sam2unet.parallel_training import train_parallel
from sam2unet.random_weights import random_model
from sam2unet.synthetic import generate
from sam2unet.train_config import TrainConfig
from sam2unet.training import LAST_NAME, train
from tests.support.services import round_settings
from trainer.service import LOCK_KEY, TrainerService

TWO_CPUS = DevicePlan(("cpu", "cpu"))


def test_device_syntax():
    assert parse_devices("") is None and parse_devices("1") is None
    assert parse_devices("cpu:2") == TWO_CPUS and TWO_CPUS.backend == "gloo"
    plan = parse_devices("cuda:0, cuda:3")
    assert plan.devices == ("cuda:0", "cuda:3") and plan.backend == "nccl"
    if not torch.cuda.is_available():
        assert parse_devices("auto") is None  # no GPU: one process, as before
    for bad in ("cpu:0", "cpu:x", "gpu:1", "cuda:0,cuda:0", "cuda:a"):
        with pytest.raises(ConfigError):
            parse_devices(bad)
    # the trainer refuses a bad setting at start, not at its first round
    with pytest.raises(ValueError, match="SAM2UNET_TRAIN_DEVICES"):
        TrainerService(Settings(train_devices="gpu:1"), None, None, None)
    with pytest.raises(ValueError, match="does not divide"):
        TrainerService(Settings(train_devices="cpu:3", train_batch_size=4), None, None, None)


def _fails_on_rank_1(device, relay):
    if collectives.rank_and_world()[0] == 1:
        raise ConfigError("rank 1 cannot go on")
    collectives.all_agree(False)  # rank 0 waits in a collective until rank 1 is gone


def test_a_failing_rank_names_its_error():
    with pytest.raises(launcher.DistributedRunError) as failed:
        launcher.launch(_fails_on_rank_1, (), TWO_CPUS, threads=1)
    # the cause first; then what the other rank saw, and the exit codes
    assert str(failed.value).startswith(
        "a training process failed: rank 1: ConfigError: rank 1 cannot go on"
    ), failed.value


def datasets():
    train_data = SegmentationDataset(
        ArraySource(generate(12, 64, seed=3), labels=("object",)), 64, train=True, seed=1
    )
    val_data = SegmentationDataset(ArraySource(generate(7, 64, seed=4), labels=("object",)), 64)
    return train_data, val_data


def test_two_processes_train_like_one(tmp_path):
    loaded = random_model(ModelConfig(size="test", image_size=64), seed=0)
    train_data, val_data = datasets()
    cfg = TrainConfig(epochs=2, batch_size=4, device="cpu", progress_bar=False, seed=5)
    one = train(copy.deepcopy(loaded), train_data, val_data, cfg)
    two = train_parallel(TWO_CPUS, loaded, train_data, val_data, cfg, tmp_path, threads=1)

    assert two.epochs_done == one.epochs_done == 2 and two.best_epoch == one.best_epoch
    for a, b in zip(one.history, two.history, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
        assert b.val.keys() == a.val.keys()
        for k in a.val:  # the same maps scored in the same order
            assert b.val[k] == pytest.approx(a.val[k], abs=1e-9), k

    mine = one.model.trainable_state_dict()
    assert two.weights.keys() == mine.keys()
    assert_same_weights(two.weights, mine, cfg.lr, steps=2 * 3)
    off = sum(
        int(((w.double() - mine[k].double()).abs() > 1e-6).sum())
        for k, w in two.weights.items()
        if w.is_floating_point()
    )
    print(f"\nweights: {off} of {sum(w.numel() for w in mine.values())} differ by more than 1e-6")

    # rank 0 alone wrote the checkpoints, holding the returned weights
    assert two.last_path == tmp_path / LAST_NAME and two.best_path.is_file()
    saved = torch.load(two.last_path, weights_only=False)["weights"]
    assert all(torch.equal(saved[k], two.weights[k]) for k in two.weights)


def assert_same_weights(got, want, lr, steps):
    off = total = 0
    for k, w in got.items():
        if not w.is_floating_point():
            assert torch.equal(w, want[k]), k
            continue
        diff = (w.double() - want[k].double()).abs()
        assert diff.max() <= 2 * lr * steps, k
        total += diff.numel()
        off += int((diff > 1e-6).sum())
    assert off <= 0.01 * total


def test_a_stop_request_reaches_the_ranks_and_the_run_resumes(tmp_path):
    """should_stop (asked in the launching process) stops both ranks after the same epoch; the
    checkpoint rank 0 wrote resumes, here in one process, to the uninterrupted run's weights."""
    from sam2unet.checkpoints import load_delta

    loaded = random_model(ModelConfig(size="test", image_size=64), seed=0)
    train_data, _ = datasets()
    cfg = TrainConfig(epochs=2, batch_size=4, device="cpu", progress_bar=False, seed=5)
    events = []
    stopped = train_parallel(
        TWO_CPUS, loaded, train_data, None, cfg, tmp_path, None, events.append, lambda: True, 1
    )
    assert stopped.stopped and stopped.epochs_done == 1
    assert [e.kind for e in events] == ["step"] * 3 + ["epoch"]  # rank 0's, relayed
    ckpt = load_delta(stopped.last_path)
    resumed = train(ckpt, train_data, None, cfg, resume_state=ckpt.train_state)
    assert resumed.epochs_done == 2 and not resumed.stopped
    whole = train(copy.deepcopy(loaded), train_data, None, cfg)
    assert resumed.history[-1].loss == pytest.approx(whole.history[-1].loss, rel=1e-5)
    assert_same_weights(
        resumed.model.trainable_state_dict(), whole.model.trainable_state_dict(), cfg.lr, 6
    )


def _buckets(device, relay):
    """One rank: what DDP synchronises for a test-size model."""
    model = random_model(ModelConfig(size="test", image_size=64), seed=0).model
    sync_batchnorm(model, device)
    ddp = wrap_ddp(model, device)
    data = ddp._get_ddp_logging_data()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "tensors": data["num_parameter_tensors"],
        "bytes": data["total_parameter_size_bytes"],
        "trainable_tensors": len(trainable),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "frozen_tensors": sum(1 for p in model.parameters() if not p.requires_grad),
    }


def test_ddp_buckets_only_the_trainable_part():
    info = launcher.launch(_buckets, (), TWO_CPUS, threads=1)
    assert info["frozen_tensors"] > 0
    assert info["tensors"] == info["trainable_tensors"]
    assert info["bytes"] == info["trainable_bytes"]


SAMPLES = [(i + 1, img, m) for i, (img, m) in enumerate(generate(8, 64, seed=3))]


class LocalTrainer(TrainerService):
    """The real service; the sync from Label Studio replaced by a fixed annotated set."""

    def training_set(self, project):
        return ["object"], list(SAMPLES), "fixed"


def kill_a_rank(event) -> None:
    """A progress callback that SIGKILLs one training process (the last spawned) at the first
    step. Elastic sets a rank's LOCAL_RANK after the spawn, so the process is found by its
    command line (multiprocessing's spawn entry point, not its resource tracker)."""
    if event.kind != "step" or getattr(kill_a_rank, "done", False):
        return
    ranks = [
        p
        for p in psutil.Process(os.getpid()).children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ]
    victim = max(ranks, key=lambda p: (p.create_time(), p.pid))
    victim.send_signal(signal.SIGKILL)
    kill_a_rank.done = True
    print(f"killed training process {victim.pid} of {len(ranks)}")


def test_round_on_two_processes_and_a_killed_rank(model_dir, redis_conn, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    settings = round_settings(models, train_devices="cpu:2", torch_threads=1, train_epochs=2)
    service = LocalTrainer(settings, redis_conn, None, None, consumer="t1")
    registry = ModelRegistry(models, redis_conn)
    before = registry.current()
    listed = [v.name for v in registry.versions()]

    report = service.round(1, "test")
    assert report.status in ("promoted", "rejected"), report
    assert len(report.history) == 2 and report.candidate_metrics and report.current_metrics
    assert [v.name for v in registry.versions()] == [*listed, report.candidate]
    info = registry.get(report.candidate)
    assert info.metrics["val"] == report.candidate_metrics
    registry.load(report.candidate)  # complete and loadable
    # the current version's held-out metrics, sharded over 2 processes, equal one process's
    from sam2unet.validation import validate

    cur = registry.load(before)
    val_ids = [t for t, _, _ in SAMPLES if report.sides[t] == "val"]  # the round's own split
    by_id = {t: (img, m) for t, img, m in SAMPLES}
    val = SegmentationDataset(ArraySource([by_id[t] for t in val_ids], labels=("object",)), 64)
    single = validate(cur.model, cur.config, val, device="cpu")
    assert report.current_metrics == pytest.approx(single, abs=1e-9)

    # a rank killed at the first step: the round fails, nothing is written or promoted
    now_current = registry.current()
    listed = [v.name for v in registry.versions()]
    service._progress = kill_a_rank
    failed = service.round(1, "test")
    assert failed.status == "failed" and "rank" in failed.reason, failed
    assert registry.current() == now_current
    assert [v.name for v in registry.versions()] == listed
    assert not redis_conn.exists(LOCK_KEY)
    assert service.step(block_ms=10) == []  # the service goes on
