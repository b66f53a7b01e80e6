"""``sam2unet-assist preannotate``: pre-annotate a whole project, follow, list or cancel runs."""

from __future__ import annotations

import argparse
import json
import time


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


def _preannotate(args: argparse.Namespace) -> int:
    # imported when the command runs, so that --help and the other commands start fast
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
    # imported when the command runs, so that --help and the other commands start fast
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
