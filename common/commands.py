"""Subcommand registrations.

Each module named here defines ``register(subparsers)``, which adds its subcommands with
``set_defaults(func=handler)``; a handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib

COMMAND_MODULES: list[str] = [
    "backend.cli",
    "worker.cli",
    "trainer.cli",
    "common.ops_cli",
    "common.up_cli",
    "sam2unet.cli",
]


def register_all(sub: argparse._SubParsersAction) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
