"""Checks a Python environment the services run in; the image build runs it and fails on error.

It checks that torch has the expected version (and, with ``--cuda``, that it is a CUDA build),
that torchvision is absent (sam2 is installed without its declared dependencies, which would
pull it), that each named module imports, and that the command line builds.

Usage: python verify_image.py --torch 2.13.0 [--cuda] [--modules sam2 sam2unet ...]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence


def problems(torch_version: str, cuda: bool, modules: Sequence[str]) -> list[str]:
    """Everything wrong with the running environment, as messages (empty when all is well)."""
    found: list[str] = []
    try:
        # torch may be missing or broken: that is reported, not raised
        import torch
    except ImportError as e:
        return [f"torch does not import: {e}"]
    public = torch.__version__.split("+", 1)[0]
    if public != torch_version:
        found.append(f"torch is {torch.__version__}, expected {torch_version}")
    if cuda and not torch.version.cuda:
        found.append(f"torch {torch.__version__} is not a CUDA build")
    if importlib.util.find_spec("torchvision") is not None:
        found.append("torchvision is installed; nothing needs it")
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            found.append(f"{name} does not import: {e}")
    try:
        # the command line may not import: that is reported, not raised
        from cli import build_parser

        build_parser()
    except ImportError as e:
        found.append(f"the command line does not build: {e}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", required=True, help="expected torch version, e.g. 2.13.0")
    parser.add_argument("--cuda", action="store_true", help="require a CUDA build of torch")
    parser.add_argument("--modules", nargs="*", default=[], help="modules that must import")
    args = parser.parse_args(argv)
    found = problems(args.torch, args.cuda, args.modules)
    for message in found:
        print(f"verify_image: {message}", file=sys.stderr)
    if not found:
        # torch: imported once problems() found that it imports
        import torch

        print(f"verify_image: ok (torch {torch.__version__}, CUDA {torch.version.cuda})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
