"""``sam2unet-assist preannotate`` and ``sam2unet-assist download``."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preannotate",
        help="pre-annotate a whole project through the workers (beyond Label Studio's 100 s)",
    )
    p.add_argument("--project", type=int, help="Label Studio project id to pre-annotate")
    p.add_argument("--status", metavar="RUN", help="show a run's progress")
    p.add_argument("--cancel", metavar="RUN", help="cancel a run")
    p.add_argument("--list", action="store_true", help="list recent runs")
    p.add_argument("--no-follow", action="store_true", help="start the run and return at once")
    p.add_argument("--page-size", type=int, default=1000)
    p.add_argument(
        "--acquisition",
        choices=["random", "confidence", "tta", "diverse"],
        help="acquisition strategy of this run's prediction scores (default: SAM2UNET_ACQUISITION)",
    )
    p.add_argument(
        "--include-labeled",
        action="store_true",
        help="also predict tasks that already have a label",
    )
    p.set_defaults(func=_preannotate)

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


def _preannotate(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    from contracts import preannotate as runs
    from contracts.connections import redis_client
    from contracts.errors import NotFound
    from contracts.settings import Settings

    settings = Settings.from_env()
    conn = redis_client(settings.redis_url)
    try:
        if args.list:
            for st in runs.list_runs(conn):
                print(json.dumps(st))
            return 0
        if args.cancel:
            print(json.dumps(runs.cancel(conn, args.cancel)))
            return 0
        if args.status:
            run_id = args.status
        elif args.project is not None:
            run_id, started = runs.start_run(
                conn,
                args.project,
                page_size=args.page_size,
                unlabeled_only=not args.include_labeled,
                acquisition=args.acquisition,
            )
            print(f"{'started' if started else 'following the run in progress'}: {run_id}")
        else:
            raise SystemExit("give --project ID (or --status / --cancel RUN, or --list)")
        if args.no_follow:
            print(json.dumps(runs.status(conn, run_id)))
            return 0
        return _follow(conn, run_id, tqdm)
    except NotFound as e:
        raise SystemExit(e.message) from None


def _follow(conn, run_id: str, tqdm) -> int:
    import json

    from contracts import preannotate as runs

    bar = tqdm(desc=f"pre-annotating ({run_id})", unit="task", total=None)
    try:
        while True:
            st = runs.status(conn, run_id)
            if st["total"] is not None and bar.total != st["total"]:
                bar.total = st["total"]
            bar.n = st["done"] + st["failed"] + st["skipped"]
            bar.set_postfix(
                done=st["done"], failed=st["failed"], skipped=st["skipped"], eta=st["eta_seconds"]
            )
            bar.refresh()
            if st["status"] != runs.RUNNING and st["ordering"] not in ("pending", "running"):
                break  # a diverse run: finished once its scores follow the whole run's order
            if st["ordering"] is not None:
                bar.set_description(f"diverse order ({run_id})")
                bar.total, bar.n = st["done"], st["ordered"]
                bar.refresh()
            time.sleep(1.0)
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\nstill running in the background; follow again with --status {run_id}, stop it with --cancel {run_id}"
        )
        return 130
    bar.close()
    print(json.dumps(st))
    return 0 if st["status"] == runs.COMPLETED and st["ordering"] != "failed" else 1


def _download(args: argparse.Namespace) -> int:
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
