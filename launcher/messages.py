"""What ``up`` tells its user: which model the workers will serve, and how to connect Label
Studio once everything is ready."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import redis

from contracts.errors import NotFound
from contracts.settings import Settings
from labelstudio.urls import redact_url
from modelstore.bootstrap import UNTRAINED_SOURCE, find_sam2_checkpoints
from modelstore.registry import ModelRegistry

if TYPE_CHECKING:
    from launcher.up import UpOptions

#: (loud, lines): a loud message is framed so that it stands out in the log.
Message = tuple[bool, list[str]]


def host_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def redacted(url: str) -> str:
    return redact_url(url)


def model_state(settings: Settings, redis_url: str) -> list[Message]:
    """Which model the workers will serve; loud when it is an untrained encoder."""
    s = settings
    registry = ModelRegistry(s.model_dir, redis.Redis.from_url(redis_url))
    name = registry.current()
    if name is not None:
        try:
            info = registry.get(name)
        except NotFound:
            return [(True, [f"the current model version {name} is missing from {s.model_dir}"])]
        out = [(False, [f"Model: {name} (from {info.source or 'unknown'}, size {info.size})"])]
        if info.source == UNTRAINED_SOURCE:
            out.append(
                (
                    True,
                    [
                        f"MODEL {name} HAS AN UNTRAINED (RANDOM) ENCODER: no SAM2 checkpoint was",
                        "found when it was made, so its masks are poor until training improves it.",
                        f"Get weights: sam2unet-assist download --size {info.size}, then start",
                        "from a fresh MODEL_DIR (or roll back to a version built from them).",
                    ],
                )
            )
        return out
    if s.init_checkpoint:
        return [(False, [f"Model: the first version is made from {s.init_checkpoint}"])]
    found = find_sam2_checkpoints(registry)
    if found:
        return [
            (
                False,
                [
                    "Model: the first worker makes the first version from the SAM2 checkpoint of "
                    f"size {s.model_size} among: {', '.join(p.name for p in found)}"
                ],
            )
        ]
    return [
        (
            True,
            [
                f"NO SAM2 WEIGHTS in {registry.base_dir} or {s.model_dir} for size {s.model_size}:",
                "the first version gets a RANDOM, UNTRAINED encoder and its masks will be poor.",
                f"Stop (Ctrl-C), run `sam2unet-assist download --size {s.model_size}`, start again.",
            ],
        )
    ]


def banner(settings: Settings, options: UpOptions, redis_url: str, local_host: str) -> list[str]:
    """The connection instructions printed once everything is ready."""
    o, s = options, settings
    addr = host_address() if o.host in ("0.0.0.0", "::", "") else None
    public = addr or ("localhost" if local_host.startswith("127.") else o.host)
    url = f"http://{public}:{o.port}"
    local = f"http://localhost:{o.port}"
    auth = (
        f"Basic Auth: user {s.basic_auth_user!r} and the BASIC_AUTH_PASS password"
        if s.basic_auth_enabled
        else "No Authentication (set BASIC_AUTH_USER and BASIC_AUTH_PASS to require it)"
    )
    lines = [
        "",
        "=" * 78,
        f"sam2unet-assist is up: {url}",
        "",
        "In Label Studio: project Settings > Model > Connect Model",
        f"  Backend URL     {url}",
        f"                  ({local} from Label Studio running on this machine, outside Docker;"
        f" http://host.docker.internal:{o.port} from its container)",
        f"  Authentication  {auth}",
        "  Interactive preannotations: on, to get predictions as tasks open",
        "Label Studio refuses a backend at a private or loopback address unless it runs with",
        "  ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false (docs/deployment.md).",
    ]
    if not (s.label_studio_url and s.label_studio_api_key):
        lines += [
            "Task images uploaded to Label Studio (/data/upload/...) need LABEL_STUDIO_URL and",
            "  LABEL_STUDIO_API_KEY here (a legacy token or a personal access token).",
        ]
    lines += [
        "",
        f"Health and metrics: {local}/health  {local}/metrics",
        f"Queue dashboard:    rq-dashboard --redis-url {redacted(redis_url)}",
        f"Other commands (preannotate, versions): export REDIS_URL={redacted(redis_url)}",
        "Stop everything: Ctrl-C",
        "=" * 78,
    ]
    out = ["\n".join(lines)]
    if not s.basic_auth_enabled and o.host in ("0.0.0.0", "::"):
        out.append(
            f"note: the backend listens on every interface ({o.host}) without authentication"
        )
    return out
