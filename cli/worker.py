"""``sam2unet-assist worker``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a prediction worker (one per GPU)")
    p.add_argument("--device", help="cuda, cuda:1, mps, cpu or auto (env SAM2UNET_DEVICE)")
    p.add_argument(
        "--batch-size", type=int, help="images per forward pass (env SAM2UNET_BATCH_SIZE)"
    )
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--name", help="worker name (default: host name + random suffix)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # imported when the command runs, so that --help and the other commands start fast
    from contracts.connections import redis_client
    from contracts.settings import Settings
    from worker.process import run_worker

    overrides = {}
    if args.device:
        overrides["device"] = args.device
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    settings = Settings.from_env(**overrides)
    run_worker(settings, redis_client(settings.redis_url), burst=args.burst, name=args.name)
    return 0
