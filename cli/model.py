"""``sam2unet-assist train | evaluate | synth``: argument parsing only; the work is done in
:mod:`sam2unet.training`, :mod:`sam2unet.evaluate` and :mod:`sam2unet.synthetic`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    _register_train(sub)
    _register_evaluate(sub)
    _register_synth(sub)


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train SAM2-UNet's adapters and decoder on an image/mask folder pair",
        description="Train as the released SAM2-UNet code (AdamW, cosine schedule, deep "
        "supervision), keeping the best checkpoint by validation metric.",
    )
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--masks", required=True, help="folder of 0/255 masks, same file stems")
    p.add_argument("--val-images", help="folder of validation images")
    p.add_argument("--val-masks", help="folder of validation masks")
    p.add_argument(
        "--val-split",
        type=float,
        help="fraction of the training folder held out for validation when no validation "
        "folders are given (default 0.2; 0 trains on everything without validation)",
    )
    p.add_argument("--size", default="tiny", help="model size for a new model (default tiny)")
    p.add_argument("--sam2", help="official SAM2 / SAM2.1 checkpoint whose trunk to use")
    p.add_argument("--init", help="start from this checkpoint (any format)")
    p.add_argument("--resume", help="continue the run that wrote this last.pt")
    p.add_argument("--image-size", type=int, help="network input side (default 352)")
    p.add_argument("--epochs", type=int, help="default 20")
    p.add_argument("--batch-size", type=int, help="default 12")
    p.add_argument("--lr", type=float, help="default 1e-3")
    p.add_argument("--weight-decay", type=float, help="default 5e-4")
    p.add_argument(
        "--bce",
        choices=["as_released", "weighted"],
        help="BCE term of the structure loss (default as_released: plain mean BCE)",
    )
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--select-metric", help="validation metric that picks best.pt (default miou)")
    p.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    p.add_argument("--device", default="auto", help="cuda, cpu, mps or auto (default)")
    p.add_argument(
        "--devices",
        default=os.environ.get("SAM2UNET_TRAIN_DEVICES", ""),
        help="data-parallel processes on this machine: auto (one per GPU), cuda:0,cuda:1,... "
        "or cpu:N (default: SAM2UNET_TRAIN_DEVICES, else one process on --device); under "
        "torchrun the processes it started are used",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default 2)")
    p.set_defaults(func=_train)


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predictions (or a checkpoint) against ground-truth masks",
        description="Either --pred and --gt (saved grey maps vs masks), or --checkpoint with "
        "--images and --masks (runs the model). Files are paired by stem.",
    )
    p.add_argument("--pred", help="folder of predicted grey maps (uint8 PNGs)")
    p.add_argument("--gt", help="folder of ground-truth masks for --pred")
    p.add_argument("--checkpoint", help="model checkpoint (any format)")
    p.add_argument("--images", help="folder of images for --checkpoint")
    p.add_argument("--masks", help="folder of masks for --checkpoint")
    p.add_argument(
        "--search-dir",
        action="append",
        default=[],
        help="folder holding the base SAM2 checkpoint of a delta (repeatable)",
    )
    p.add_argument("--label", help="output label to score (models with several labels)")
    p.add_argument("--save-pred", help="also write the predicted maps here as PNGs")
    p.add_argument(
        "--postprocess",
        choices=["default", "released"],
        default="default",
        help="how outputs become maps: 'default' as served (sigmoid, resize, round); "
        "'released' exactly as the authors' test.py (logits resized to the mask, sigmoid, "
        "per-image min-max, truncated to uint8), to reproduce the paper's tables",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_evaluate)


def _register_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic salient-object dataset")
    p.add_argument("--out", required=True, help="output folder (images/ and masks/)")
    p.add_argument("--n", type=int, default=100, help="number of samples (default 100)")
    p.add_argument("--size", type=int, default=352, help="image side (default 352)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--classes",
        help="comma-separated shape classes (circle,square,triangle): one mask folder each",
    )
    p.set_defaults(func=_synth)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    # torch, sam2: imported only when a command trains
    from sam2unet.checkpoints import load_delta
    from sam2unet.config import ModelConfig
    from sam2unet.data import FolderSource, train_val_datasets
    from sam2unet.distributed import collectives, launcher
    from sam2unet.exceptions import Sam2UnetError
    from sam2unet.parallel_training import train_parallel
    from sam2unet.train_config import TrainConfig, resume_config
    from sam2unet.training import initial_model, train

    if bool(args.val_images) != bool(args.val_masks):
        return _fail("--val-images and --val-masks go together")
    if args.val_images and args.val_split:
        return _fail("give --val-images/--val-masks or --val-split, not both")
    if args.resume and args.init:
        return _fail("give --resume or --init, not both")
    settings = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "bce_mode": args.bce,
        "seed": args.seed,
        "select_metric": args.select_metric,
        "num_workers": args.workers,
        "device": args.device,
        "bf16": args.bf16,
        "progress_bar": sys.stderr.isatty(),
    }
    try:
        plan = None
        if launcher.torchrun_env():
            settings["device"] = str(launcher.joined_from_torchrun())
        else:
            plan = launcher.parse_devices(args.devices)
        if args.resume:
            loaded = load_delta(args.resume, [Path(args.sam2).parent] if args.sam2 else [])
            if loaded.train_state is None:
                return _fail(f"{args.resume} holds no training state (resume from a last.pt)")
            if args.image_size and args.image_size != loaded.config.image_size:
                return _fail(f"{args.resume} was trained at {loaded.config.image_size}")
            config = resume_config(loaded.train_state, **settings)
            resume_state = loaded.train_state
        else:
            model_config = ModelConfig(size=args.size, image_size=args.image_size or 352)
            config = TrainConfig(**{k: v for k, v in settings.items() if v is not None})
            loaded = initial_model(model_config, sam2=args.sam2, init=args.init, seed=config.seed)
            resume_state = None
        source = FolderSource(args.images, args.masks, labels=loaded.config.labels)
        val_source = (
            FolderSource(args.val_images, args.val_masks, labels=loaded.config.labels)
            if args.val_images
            else None
        )
        split = args.val_split if args.val_split is not None else (0.0 if val_source else 0.2)
        train_data, val_data = train_val_datasets(
            source, loaded.config.image_size, split, val_source, config.seed
        )
        if plan is not None:
            result = train_parallel(
                plan, loaded, train_data, val_data, config, args.out, resume_state
            )
        else:
            result = train(loaded, train_data, val_data, config, args.out, resume_state)
    except Sam2UnetError as e:
        return _fail(str(e))
    main = collectives.is_main()
    launcher.leave()
    if not main:
        return 0
    last = result.history[-1] if result.history else None
    print(f"epochs done: {result.epochs_done}/{config.epochs}")
    if last is not None:
        print(f"last loss: {last.loss:.4f}")
    if result.best_metric is not None:
        print(f"best {config.select_metric}: {result.best_metric:.4f} (epoch {result.best_epoch})")
    print(f"best checkpoint: {result.best_path}")
    print(f"last checkpoint: {result.last_path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    # torch, scipy, OpenCV: imported only when a command evaluates
    from sam2unet.checkpoints import load_any
    from sam2unet.evaluate import evaluate_dirs, evaluate_model
    from sam2unet.exceptions import Sam2UnetError
    from sam2unet.metrics import format_table

    by_dirs = bool(args.pred or args.gt)
    by_model = bool(args.checkpoint or args.images or args.masks)
    if by_dirs == by_model:
        return _fail("give either --pred and --gt, or --checkpoint, --images and --masks")
    try:
        if by_dirs:
            if not (args.pred and args.gt):
                return _fail("--pred and --gt go together")
            if args.postprocess != "default":
                return _fail("--postprocess applies to --checkpoint runs, not to saved maps")
            results = evaluate_dirs(args.pred, args.gt)
            title = f"{args.pred} vs {args.gt}"
        else:
            if not (args.checkpoint and args.images and args.masks):
                return _fail("--checkpoint needs --images and --masks")
            loaded = load_any(args.checkpoint, args.search_dir)
            results = evaluate_model(
                loaded,
                args.images,
                args.masks,
                device=args.device,
                batch_size=args.batch_size,
                bf16=args.bf16,
                label=args.label,
                save_dir=args.save_pred,
                postprocess=args.postprocess,
            )
            title = f"{args.checkpoint} on {args.images}"
    except Sam2UnetError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_table(results, title=title))
    return 0


def _synth(args: argparse.Namespace) -> int:
    # numpy, Pillow: imported only when the command runs
    from sam2unet.exceptions import Sam2UnetError
    from sam2unet.synthetic import write_synthetic_dataset

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        paths = write_synthetic_dataset(args.out, args.n, args.size, args.seed, classes)
    except Sam2UnetError as e:
        return _fail(str(e))
    print(f"images: {paths.images}")
    for label, d in zip(paths.labels, paths.mask_dirs, strict=True):
        print(f"masks ({label}): {d}")
    return 0
