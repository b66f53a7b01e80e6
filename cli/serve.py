"""``sam2unet-assist backend``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backend", help="serve the Label Studio ML backend (gunicorn)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--workers", type=int, default=2, help="gunicorn processes")
    p.add_argument("--threads", type=int, default=16, help="threads per process")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # imported when the command runs, so that --help and the other commands start fast
    from backend.server import serve
    from contracts.settings import Settings

    serve(Settings.from_env(), args.host, args.port, args.workers, args.threads)
    return 0
