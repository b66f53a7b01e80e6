"""``sam2unet-assist up``: Redis, backend, workers and trainer on this machine, in one command."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="run everything on this machine: Redis, backend, worker(s) and trainer; Ctrl-C stops",
    )
    p.add_argument("--host", default="0.0.0.0", help="backend address to listen on")
    p.add_argument("--port", type=int, default=9090, help="backend port")
    p.add_argument("--workers", type=int, default=1, help="prediction workers")
    p.add_argument("--backend-processes", type=int, default=2, help="gunicorn processes")
    p.add_argument(
        "--data",
        type=Path,
        help="embedded Redis data directory (default MODEL_DIR/redis); ignored with REDIS_URL",
    )
    p.add_argument(
        "--redis-port", type=int, default=0, help="embedded Redis port (default: a free one)"
    )
    p.add_argument(
        "--no-trainer", action="store_true", help="do not start the trainer even if configured"
    )
    p.add_argument(
        "--grace", type=float, default=15.0, help="seconds a service may take to stop (then killed)"
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the backend and the workers",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # imported when the command runs, so that --help and the other commands start fast
    from contracts.settings import Settings
    from launcher.up import UpOptions, run_up

    if args.workers < 1 or args.backend_processes < 1:
        raise SystemExit("--workers and --backend-processes must be at least 1")
    options = UpOptions(
        host=args.host,
        port=args.port,
        workers=args.workers,
        backend_processes=args.backend_processes,
        redis_url=os.environ.get("REDIS_URL") or None,
        data_dir=args.data,
        redis_port=args.redis_port or None,
        trainer=not args.no_trainer,
        grace=args.grace,
        startup_timeout=args.startup_timeout,
    )
    return run_up(Settings.from_env(), options)
