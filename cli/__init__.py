"""The ``sam2unet-assist`` command line: parses arguments and calls into the packages."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# Each module defines ``register(subparsers)``, which adds its subcommands with
# ``set_defaults(func=handler)``; a handler takes the parsed arguments and returns an exit code.
COMMAND_MODULES: list[str] = [
    "cli.serve",
    "cli.worker",
    "cli.trainer",
    "cli.preannotate",
    "cli.download",
    "cli.up",
    "cli.model",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam2unet-assist",
        description="SAM2-UNet annotation assist for Label Studio.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(level: str | None) -> None:
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
