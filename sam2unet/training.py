"""The training loop, used by the ``train`` command and by the trainer service.

As released: AdamW (lr 1e-3, weight decay 5e-4) over the trainable parameters (adapters and
decoder), a cosine schedule stepped once per epoch down to 1e-7, the structure loss summed over
the three deep-supervision outputs. Added here: validation with best-checkpoint keeping (by
validation mIoU by default), checkpoints in our delta format after every epoch, and resuming
from such a checkpoint exactly where it stopped (model, optimizer, schedule, epoch, best metric
and RNG states are in its ``train_state``; data order and flips are functions of seed and epoch).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from sam2unet.checkpoints import LoadedModel, build_from_sam2, load_any, save_delta
from sam2unet.config import ModelConfig
from sam2unet.data import SegmentationDataset
from sam2unet.distributed import collectives, ddp
from sam2unet.exceptions import ConfigError
from sam2unet.metrics import LOWER_IS_BETTER
from sam2unet.modeling.loss import deep_supervision_loss
from sam2unet.modeling.sam2unet import SAM2UNet
from sam2unet.predictor import pick_device
from sam2unet.random_weights import random_model
from sam2unet.train_config import EpochRecord, TrainConfig, TrainEvent
from sam2unet.validation import validate

log = logging.getLogger(__name__)

LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
HISTORY_NAME = "history.json"
# Validation keys besides METRIC_NAMES: IoU / Dice of the map thresholded at 0.5.


@dataclass
class TrainResult:
    """What a run produced. ``best_path`` is the best validation checkpoint, or the last
    checkpoint when there is no validation set; paths are ``None`` without ``out_dir``."""

    history: list[EpochRecord]
    model: SAM2UNet
    config: ModelConfig
    best_path: Path | None
    last_path: Path | None
    best_metric: float | None
    best_epoch: int | None
    epochs_done: int
    stopped: bool


# --------------------------------------------------------------------------- starting points


def initial_model(
    config: ModelConfig,
    sam2: str | Path | None = None,
    init: str | Path | None = None,
    search_dirs: Sequence[str | Path] = (),
    seed: int = 0,
) -> LoadedModel:
    """The model a run starts from.

    ``init`` (any checkpoint format, see :func:`sam2unet.checkpoints.load_any`) takes precedence;
    otherwise fresh adapters and decoder on the trunk of the official SAM2 checkpoint ``sam2``;
    otherwise a random trunk (useful for tests only). ``config`` gives the image size and
    labels (and the size when no checkpoint is given); a delta keeps its own labels.
    """
    dirs = [*search_dirs, *([Path(sam2).parent] if sam2 else [])]
    overrides = {
        "image_size": config.image_size,
        "labels": config.labels,
        "adapter_dim": config.adapter_dim,
        "rfb_channels": config.rfb_channels,
    }
    if init is not None:
        loaded = load_any(init, dirs, **overrides)
        if loaded.config.image_size != config.image_size:
            loaded.config = loaded.config.replace(image_size=config.image_size)
        loaded.train_state = None
        return loaded
    if sam2 is not None:
        return build_from_sam2(sam2, **overrides)
    log.warning("no SAM2 checkpoint given: training on a randomly initialised trunk")
    return random_model(config, seed)


# --------------------------------------------------------------------------- validation


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if metric in LOWER_IS_BETTER else value > best


# --------------------------------------------------------------------------- training


@dataclass
class _Run:
    """What the stages of one run share: where it runs, what it updates, how far it got."""

    loaded: LoadedModel
    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    use_bf16: bool
    out: Path | None
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineAnnealingLR
    history: list[EpochRecord] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    start_epoch: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def last_path(self) -> Path | None:
        return self.out / LAST_NAME if self.out is not None else None

    def autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else nullcontext()


def train(
    loaded: LoadedModel,
    train_data: SegmentationDataset,
    val_data: SegmentationDataset | None,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    resume_state: Mapping[str, Any] | None = None,
    progress: Callable[[TrainEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``loaded.model`` (in place) on ``train_data``; see the module docstring.

    ``out_dir`` receives ``last.pt`` after every epoch (with the training state),
    ``best.pt`` when the validation metric improves, and ``history.json``. Checkpoints name
    ``loaded.base`` as their base, or embed the trunk when it is ``None``.
    ``resume_state`` (a checkpoint's ``train_state``, with ``loaded`` holding that
    checkpoint's model) continues an interrupted run. ``should_stop`` is asked after each
    epoch; when it returns True the run ends there (and can be resumed).

    In a data-parallel run (a process group of N ranks is initialised, see
    :mod:`sam2unet.distributed`) every rank calls this with its own ``config.device``; each
    takes ``batch_size / N`` samples of every global batch, gradients are averaged by DDP and
    BatchNorm uses global-batch statistics, so the weights follow one process's run with the
    same ``batch_size``. Only rank 0 writes ``out_dir``, reports ``progress`` and logs; a stop
    asked on any rank stops all of them after the same epoch.
    """
    _check_data(loaded.config, train_data)
    run = _start_run(loaded, config, out_dir)
    _resume_or_seed(run, resume_state)
    # The same global order for any number of ranks: rank r takes every N-th sample of one
    # seeded permutation (padded with repeats to a multiple of N), batch_size / N at a time.
    sampler = DistributedSampler(
        train_data, num_replicas=run.world, rank=run.rank, shuffle=True, seed=config.seed
    )
    stopped = False
    for epoch in range(run.start_epoch, config.epochs):
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        loss, steps = _train_epoch(run, train_data, sampler, epoch, lr, progress)
        record = EpochRecord(epoch + 1, loss, lr, 0.0)
        if val_data is not None:
            record.val = validate(
                loaded.model,
                loaded.config,
                val_data,
                run.device,
                config.val_batch_size,
                run.use_bf16,
            )
        record.seconds = time.perf_counter() - t0
        run.history.append(record)
        improved = val_data is not None and _keep_if_best(run, record)
        _save_epoch(run, record, improved)
        _report_epoch(run, record, steps, progress)
        if _stop_asked(run, epoch, should_stop):
            stopped = True
            break
    loaded.model.eval()
    return _result(run, val_data is not None, stopped)


def _check_data(mconfig: ModelConfig, train_data: SegmentationDataset) -> None:
    """The training data must match the model's image size and labels, and not be empty."""
    if train_data.image_size != mconfig.image_size:
        raise ConfigError(
            f"the data is resized to {train_data.image_size} but the model config says "
            f"{mconfig.image_size}"
        )
    if tuple(train_data.labels) != tuple(mconfig.labels):
        raise ConfigError(
            f"the data has labels {list(train_data.labels)}, the model {list(mconfig.labels)}"
        )
    if len(train_data) == 0:
        raise ConfigError("the training set is empty")


def _start_run(loaded: LoadedModel, config: TrainConfig, out_dir: str | Path | None) -> _Run:
    """Place the model on its device (wrapped in DDP across ranks), with its optimizer and
    schedule; rank 0 creates ``out_dir``."""
    rank, world = collectives.rank_and_world() if collectives.is_active() else (0, 1)
    main = rank == 0
    if config.batch_size % world:
        raise ConfigError(
            f"batch size {config.batch_size} does not divide among {world} training processes"
        )
    device = pick_device(config.device)
    use_bf16 = config.bf16 and device.type == "cuda"
    if config.bf16 and not use_bf16 and main:
        log.info("bf16 autocast is only used on CUDA; training in fp32 on %s", device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)

    model = loaded.model
    model.to(device)
    net: torch.nn.Module = model
    if world > 1:
        ddp.sync_batchnorm(model, device)
        net = ddp.wrap_ddp(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.eta_min)
    return _Run(loaded, config, rank, world, device, use_bf16, out, net, optimizer, scheduler)


def _resume_or_seed(run: _Run, resume_state: Mapping[str, Any] | None) -> None:
    """Continue from ``resume_state`` (optimizer, schedule, epoch, best, history, RNG), or
    seed a fresh run."""
    if resume_state is None:
        torch.manual_seed(run.config.seed)
        return
    saved_cfg = TrainConfig.from_dict(resume_state["train_config"])
    clash = [k for k in TrainConfig.RESUME_FIXED if getattr(saved_cfg, k) != getattr(run.config, k)]
    if clash:
        raise ConfigError(f"cannot resume with changed settings: {clash}")
    run.optimizer.load_state_dict(resume_state["optimizer"])
    run.scheduler.load_state_dict(resume_state["scheduler"])
    run.start_epoch = int(resume_state["epoch"])
    run.best_metric = resume_state.get("best_metric")
    run.best_epoch = resume_state.get("best_epoch")
    run.history = [EpochRecord(**r) for r in resume_state.get("history", [])]
    _set_rng_state(resume_state["rng"])
    if run.main:
        log.info("resuming after epoch %d of %d", run.start_epoch, run.config.epochs)


def _train_epoch(
    run: _Run,
    train_data: SegmentationDataset,
    sampler: DistributedSampler,
    epoch: int,
    lr: float,
    progress: Callable[[TrainEvent], None] | None,
) -> tuple[float, int]:
    """One pass over this rank's share of the data, then one schedule step. Returns the
    mean loss over all ranks and the number of steps."""
    config, device = run.config, run.device
    train_data.set_epoch(epoch)
    sampler.set_epoch(epoch)
    loader = DataLoader(
        train_data,
        batch_size=config.batch_size // run.world,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    run.loaded.model.train()
    total, seen = 0.0, 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not (config.progress_bar and run.main),
        leave=False,
    )
    for step, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        with run.autocast():
            outputs = run.net(x)
        loss = deep_supervision_loss([o.float() for o in outputs], y, config.bce_mode)
        loss.backward()
        run.optimizer.step()
        value = float(loss.detach())
        total += value * x.shape[0]
        seen += x.shape[0]
        bar.set_postfix(loss=f"{value:.4f}")
        if progress is not None and run.main:
            progress(TrainEvent("step", epoch + 1, config.epochs, step + 1, len(loader), value, lr))
    run.scheduler.step()
    total, seen = collectives.sum_across([total, seen])
    return total / seen, len(loader)


def _keep_if_best(run: _Run, record: EpochRecord) -> bool:
    """Whether ``record`` improves the selection metric (and remember it when it does)."""
    metric = run.config.select_metric
    if not _is_better(metric, record.val[metric], run.best_metric):
        return False
    run.best_metric, run.best_epoch = record.val[metric], record.epoch
    return True


def _save_epoch(run: _Run, record: EpochRecord, improved: bool) -> None:
    """Rank 0 writes ``best.pt`` (when improved), ``last.pt`` with the training state, and
    ``history.json``."""
    if run.out is None or not run.main:
        return
    config, loaded = run.config, run.loaded
    model, mconfig = loaded.model, loaded.config
    metrics = {"epoch": record.epoch, "train_loss": record.loss, **record.val}
    meta = {"train_config": config.to_dict(), "select_metric": config.select_metric}
    if improved:
        save_delta(run.out / BEST_NAME, model, mconfig, loaded.base, metrics, None, meta)
    state = {
        "epoch": record.epoch,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "best_metric": run.best_metric,
        "best_epoch": run.best_epoch,
        "history": [asdict(r) for r in run.history],
        "train_config": config.to_dict(),
        "rng": _rng_state(),
    }
    save_delta(run.last_path, model, mconfig, loaded.base, metrics, state, meta)
    (run.out / HISTORY_NAME).write_text(
        json.dumps([asdict(r) for r in run.history], indent=1) + "\n"
    )


def _report_epoch(
    run: _Run,
    record: EpochRecord,
    steps: int,
    progress: Callable[[TrainEvent], None] | None,
) -> None:
    """Log the epoch (rank 0 at info level) and send its ``"epoch"`` event."""
    config = run.config
    val_text = (
        f", val {config.select_metric} {record.val[config.select_metric]:.4f}" if record.val else ""
    )
    (log.info if run.main else log.debug)(
        "epoch %d/%d: loss %.4f, lr %.2e%s (%.1fs)",
        record.epoch,
        config.epochs,
        record.loss,
        record.lr,
        val_text,
        record.seconds,
    )
    if progress is not None and run.main:
        progress(
            TrainEvent(
                "epoch", record.epoch, config.epochs, steps, steps, record.loss, record.lr, record
            )
        )


def _stop_asked(run: _Run, epoch: int, should_stop: Callable[[], bool] | None) -> bool:
    """Whether any rank asks to stop after ``epoch`` (never after the last one)."""
    if epoch + 1 < run.config.epochs and collectives.all_agree(
        should_stop is not None and bool(should_stop())
    ):
        if run.main:
            log.info("stopping after epoch %d as asked", epoch + 1)
        return True
    return False


def _result(run: _Run, validated: bool, stopped: bool) -> TrainResult:
    """The run's :class:`TrainResult`: the best checkpoint is the last one without validation."""
    if run.out is None:
        best_path = None
    elif not validated:
        best_path = run.last_path
    else:
        best_path = run.out / BEST_NAME if run.best_epoch is not None else None
    return TrainResult(
        history=run.history,
        model=run.loaded.model,
        config=run.loaded.config,
        best_path=best_path,
        last_path=run.last_path,
        best_metric=run.best_metric,
        best_epoch=run.best_epoch,
        epochs_done=run.history[-1].epoch if run.history else run.start_epoch,
        stopped=stopped,
    )
