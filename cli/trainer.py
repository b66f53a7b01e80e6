"""``sam2unet-assist trainer`` and ``sam2unet-assist versions``."""

from __future__ import annotations

import argparse
import json
import signal


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trainer", help="run the trainer service (webhook events -> rounds)")
    p.add_argument(
        "--once", type=int, metavar="PROJECT", help="run one round for a project and exit"
    )
    p.set_defaults(func=_trainer)

    a = sub.add_parser(
        "train-agent",
        help="take part in the trainer's rounds with this machine's GPUs (SAM2UNET_TRAIN_NODES)",
    )
    a.add_argument("--name", help="agent name (default: host name and a random suffix)")
    a.set_defaults(func=_train_agent)

    v = sub.add_parser("versions", help="list model versions, show one, or roll back")
    v.add_argument("action", nargs="?", default="list", choices=["list", "show", "rollback"])
    v.add_argument("version", nargs="?", help="version name (show, rollback)")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=_versions)


def _services(settings):
    # imported when the command runs, so that --help and the other commands start fast
    from contracts.connections import redis_client
    from labelstudio.client import LabelStudioClient
    from labelstudio.fetch import FetchPolicy, ImageFetcher

    if not (settings.label_studio_url and settings.label_studio_api_key):
        raise SystemExit("the trainer needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
    fetcher = ImageFetcher(client, FetchPolicy.from_settings(settings))
    return redis_client(settings.redis_url), client, fetcher


def _trainer(args: argparse.Namespace) -> int:
    # imported when the command runs, so that --help and the other commands start fast
    from contracts.settings import Settings
    from modelstore.bootstrap import ensure_current_version
    from modelstore.threads import apply_torch_threads
    from trainer.service import TrainerService

    settings = Settings.from_env()
    apply_torch_threads(settings)
    conn, client, fetcher = _services(settings)
    try:
        service = TrainerService(settings, conn, client, fetcher.fetch)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    ensure_current_version(service.registry, settings)
    if args.once is not None:
        report = service.round(args.once, "requested from the command line")
        print(json.dumps({k: report.to_json()[k] for k in ("status", "reason", "candidate")}))
        return 0 if report.status not in ("skipped", "failed") else 1

    return _serve_until_signalled(service)


def _versions(args: argparse.Namespace) -> int:
    # imported when the command runs, so that --help and the other commands start fast
    import redis

    from contracts.agents import train_agents
    from contracts.errors import NotFound
    from contracts.schedule import scheduled_rounds
    from contracts.settings import Settings
    from contracts.trainer_state import trainer_summary
    from modelstore.registry import ModelRegistry
    from modelstore.versions import version_table, versions_json

    settings = Settings.from_env()
    try:
        conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
        conn.ping()
    except redis.exceptions.ConnectionError:
        conn = None
    registry = ModelRegistry(settings.model_dir, conn)
    try:
        if args.action == "rollback":
            if not args.version:
                raise SystemExit("usage: sam2unet-assist versions rollback VERSION")
            registry.rollback(args.version)
            print(f"current version: {registry.current()}")
            if conn is None:
                print("warning: Redis unreachable; the pointer will be restored from the log")
            return 0
        data = versions_json(registry, settings)
        if args.action == "show":
            if not args.version:
                raise SystemExit("usage: sam2unet-assist versions show VERSION")
            data = [d for d in data if d["version"] == args.version]
            if not data:
                raise NotFound(f"no model version {args.version!r}")
        print(
            json.dumps(data, indent=2)
            if args.json or args.action == "show"
            else version_table(data)
        )
        if args.action == "list" and not args.json and conn is not None:
            for r in scheduled_rounds(conn):
                print(f"next scheduled round: project {r['project']} at {r['next']} ({r['cron']})")
            for a in train_agents(conn):
                doing = f" ({a['run_id']})" if a.get("state") == "training" else ""
                print(f"train agent {a['name']}: {a['state']}{doing} on {','.join(a['devices'])}")
            trainer = trainer_summary(conn)
            last = trainer["last_round"]
            if last:
                print(f"last round: project {last['project']} {last['status']}: {last['reason']}")
                counts = last.get("prompt_masks") or {}
                if counts.get("derived") or counts.get("skipped"):
                    print(f"  annotations with smart prompts but no mask: {counts.get('derived', 0)} "
                          f"trained on derived masks, {counts.get('skipped', 0)} not used")  # fmt: skip
            for f in trainer["failing"]:
                print(f"failing rounds: project {f['project']}, {f['failures']} in a row: "
                      f"{f['reason']}")  # fmt: skip
    except NotFound as e:
        raise SystemExit(e.message) from None
    return 0


def _train_agent(args: argparse.Namespace) -> int:
    # imported when the command runs, so that --help and the other commands start fast
    from contracts.connections import redis_client
    from contracts.settings import Settings
    from modelstore.threads import apply_torch_threads
    from trainer.cluster import TrainAgent

    settings = Settings.from_env()
    apply_torch_threads(settings)
    return _serve_until_signalled(TrainAgent(settings, redis_client(settings.redis_url), args.name))


def _serve_until_signalled(service) -> int:
    """``service.run_forever()`` until SIGTERM or SIGINT sets its ``stop_event``."""

    def stop(*_: object) -> None:
        service.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run_forever()
    return 0
