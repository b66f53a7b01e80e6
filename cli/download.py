"""``sam2unet-assist download``: an official SAM2/SAM2.1 checkpoint, or a released SAM2-UNet task
model, into ``MODEL_DIR/base``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "download",
        help="download an official SAM2/SAM2.1 checkpoint (or, with --pretrained, a released "
        "SAM2-UNet task model) into MODEL_DIR/base",
    )
    d.add_argument("--size", default=None, choices=["tiny", "small", "base_plus", "large"])
    d.add_argument("--release", default="sam2.1", choices=["sam2.1", "sam2"])
    d.add_argument(
        "--pretrained",
        metavar="NAME",
        help="a released SAM2-UNet task model (camouflaged, salient, marine, mirror, "
        "mirror-pmd, polyp; large trunk): the first model version starts from it",
    )
    d.add_argument(
        "--url", help="with --pretrained: fetch the checkpoint from this URL (e.g. a mirror)"
    )
    d.add_argument("--timeout", type=float, default=30.0)
    d.set_defaults(func=_download)


def _download(args: argparse.Namespace) -> int:
    # imported when the command runs, so that --help and the other commands start fast
    import requests
    from tqdm.auto import tqdm

    from contracts.settings import Settings
    from sam2unet.config import OFFICIAL_CHECKPOINTS

    settings = Settings.from_env()
    if args.pretrained:
        return _download_pretrained(args, settings)
    if args.url:
        raise SystemExit("--url goes with --pretrained NAME")
    size = args.size or settings.model_size
    if size not in OFFICIAL_CHECKPOINTS[args.release]:
        raise SystemExit(f"no official {args.release} checkpoint for size {size!r}")
    url = OFFICIAL_CHECKPOINTS[args.release][size]
    dest_dir = Path(settings.model_dir) / "base"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / url.rsplit("/", 1)[1]
    if dest.is_file():
        print(f"already there: {dest}")
        return 0
    tmp = dest.with_suffix(".part")
    try:
        with requests.get(url, stream=True, timeout=args.timeout) as r:
            r.raise_for_status()
            total = int(r.headers.get("Content-Length") or 0) or None
            with (
                open(tmp, "wb") as f,
                tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar,
            ):
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except requests.RequestException as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(
            f"cannot download {url}: {type(e).__name__}. Without internet access, copy the file "
            f"to {dest_dir} yourself (it is the official {args.release} checkpoint for size {size})."
        ) from None
    print(f"saved {dest}")
    return 0


def _download_pretrained(args: argparse.Namespace, settings) -> int:
    # imported when the command runs, so that --help and the other commands start fast
    from modelstore.pretrained import PretrainedError, fetch_released

    if args.size:
        raise SystemExit("--pretrained and --size do not go together: released models are large")
    try:
        record = fetch_released(
            args.pretrained, Path(settings.model_dir) / "base", url=args.url, timeout=args.timeout
        )
    except PretrainedError as e:
        raise SystemExit(e.message) from None
    print(f"saved {Path(settings.model_dir) / 'base' / record.file} (sha256 {record.sha256})")
    versions = Path(settings.model_dir) / "versions"
    if versions.is_dir() and any(p.name.startswith("sam2unet-") for p in versions.iterdir()):
        print(
            f"note: {versions} already holds versions, and only the first version of an empty "
            "registry starts from a released model; use an empty MODEL_DIR to start from it"
        )
    else:
        print("the first model version (made when a worker or the trainer starts) starts from it")
    return 0
