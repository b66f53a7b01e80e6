"""A real Label Studio 1.23.2 for tests: installed in its own venv, started on loopback.

``running_label_studio(tmp_dir)`` installs Label Studio into ``<repo>/.lsvenv`` when it is not
there yet (about 1 GB, one to two minutes), starts it on 127.0.0.1 on a free port with its data in
``tmp_dir``, a headless admin user, a legacy token and a personal access token, and kills its
whole process group on exit.

The first start on an empty data directory runs the migrations (40-80 s, more on a loaded
machine). That happens once: the result is kept as a template in the venv and each fresh Label
Studio starts from a copy of it (about 5-15 s).

The template holds no personal access token: each fresh Label Studio makes its own, with the
legacy token, and then turns legacy tokens off. A PAT is a JWT whose ``iat`` Label Studio checks
against its own clock with no leeway, so a token made by another process is refused whenever
that process's clock was ahead (a clock that stepped back, or a sandbox with its own clock).

The organization is left as Label Studio 1.23 creates it by default: legacy tokens **off**,
personal access tokens on. ``enable_legacy_tokens()`` turns legacy tokens on.

The helpers talk to the API with their own small token handling, independent of
``labelstudio.client``, so that the client can be tested against them.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests

from launcher.redis_server import free_port
from tests.support.tier import require_system_test

logger = logging.getLogger(__name__)

LS_VERSION = "1.23.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
LS_VENV = REPO_ROOT / ".lsvenv"
_INSTALLED_MARKER = LS_VENV / f".installed-label-studio-{LS_VERSION}"
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "sam2unet-assist-lsvenv.lock"
TEMPLATE_DIR = LS_VENV / f"template-data-{LS_VERSION}"
_STATE = "harness-tokens.json"  # the admin's tokens, kept in the data directory
_DB = "label_studio.sqlite3"

ADMIN_EMAIL = "admin@example.com"
START_TIMEOUT = 300.0  # seconds; the first start on an empty data dir migrates (40-150 s)

# Environment variables Label Studio reads that must not leak in from the caller's environment:
# ``label-studio start`` takes bare HOST/PORT/USERNAME/PASSWORD as its defaults, and each setting
# X is read from LABEL_STUDIO_X, HEARTEX_X or a bare X.
_SCRUBBED = (
    "HOST",
    "PORT",
    "USERNAME",
    "PASSWORD",
    "DEBUG",
    "SECRET_KEY",
    "DJANGO_DB",
    "DJANGO_SETTINGS_MODULE",
)
_SCRUBBED_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "POSTGRE_", "LS_")


class LabelStudioStartError(RuntimeError):
    """Label Studio could not be installed or did not come up."""


def ensure_installed(venv: Path = LS_VENV) -> Path:
    """Install label-studio==1.23.2 into ``venv`` unless already there; returns its executable.

    A file lock serialises concurrent installs (several test runs at once).
    """
    exe = venv / "bin" / "label-studio"
    marker = venv / _INSTALLED_MARKER.name
    if marker.exists() and exe.exists():
        return exe
    with open(_INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and exe.exists():
            return exe
        t0 = time.monotonic()
        logger.info("installing label-studio==%s into %s", LS_VERSION, venv)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "-q", f"label-studio=={LS_VERSION}"],
        ]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr)[-3000:]
                raise LabelStudioStartError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
        marker.write_text(f"{LS_VERSION}\n")
        logger.info("label-studio installed in %.0f s", time.monotonic() - t0)
    return exe


def _json_or_empty(r: requests.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _jwt_exp(token: str) -> float:
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return float(json.loads(base64.urlsafe_b64decode(payload))["exp"])


class LabelStudio:
    """A running Label Studio and helpers over its API.

    Attributes:
        url: base URL, ``http://127.0.0.1:<port>``.
        legacy_token: the admin's legacy API token (accepted only while legacy tokens are on).
        pat: the admin's personal access token (a JWT refresh token).
        data_dir: Label Studio's data directory; ``local_files_root`` is its document root for
            ``/data/local-files/?d=...`` URLs.
        pid: the Label Studio process id (leader of its own process group).
    """

    def __init__(
        self, url: str, legacy_token: str, data_dir: Path, proc: subprocess.Popen, log_path: Path
    ) -> None:
        self.url = url
        self.legacy_token = legacy_token
        self.pat = ""
        self.data_dir = data_dir
        self.local_files_root = data_dir / "files"
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.session = requests.Session()
        self.session.trust_env = False
        self.start_seconds = 0.0
        self._access = ""
        self._access_exp = 0.0

    # --- process ---------------------------------------------------------------------------
    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of Label Studio's log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until Label Studio answers ``/health`` on the port it was asked to use.

        Raises LabelStudioStartError (with the tail of its log) when the process exits, when it
        serves on another port, or when ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        port = self.url.rsplit(":", 1)[1]
        while True:
            if self.proc.poll() is not None:
                raise LabelStudioStartError(
                    f"Label Studio exited with code {self.proc.returncode} during startup; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                r = self.session.get(self.url + "/health", timeout=2)
                if r.status_code == 200 and r.json().get("status") == "UP":
                    break
            except (requests.RequestException, ValueError):
                pass
            # a busy port makes Label Studio print "Port N is in use" and move to N+1
            log = self.log_tail(200)
            if f"Port {port} is in use" in log or (
                "Starting development server at" in log and f"127.0.0.1:{port}/" not in log
            ):
                raise LabelStudioStartError(
                    f"port {port} was busy and Label Studio moved to another one; log tail:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise LabelStudioStartError(
                    f"Label Studio did not answer {self.url}/health within {timeout:.0f} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.5)
        # The health check may answer from another server on that port: prove it is ours.
        try:
            auth = self._headers() if self.pat else {"Authorization": f"Token {self.legacy_token}"}
            r = self.session.get(self.url + "/api/current-user/whoami", headers=auth, timeout=10)
        except requests.HTTPError as e:  # the PAT refresh failed
            r = e.response
        if r.status_code != 200 or _json_or_empty(r).get("email") != ADMIN_EMAIL:
            how = "personal access token" if self.pat else "legacy token"
            raise LabelStudioStartError(
                f"{self.url} is not the Label Studio just started, or refused its {how} "
                f"(whoami: HTTP {r.status_code}: {r.text[:300]}); log tail:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the whole process group; SIGKILL after ``timeout`` seconds."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        # children that outlived the leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.session.close()

    # --- auth ------------------------------------------------------------------------------
    def access_token(self) -> str:
        """A valid short-lived access token, exchanged from the PAT."""
        if not self._access or time.time() > self._access_exp - 30:
            r = self.session.post(
                self.url + "/api/token/refresh/", json={"refresh": self.pat}, timeout=10
            )
            r.raise_for_status()
            self._access = r.json()["access"]
            self._access_exp = _jwt_exp(self._access)
        return self._access

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token()}"}

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """An authenticated (Bearer) API call; raises for HTTP errors with the body's start.

        A 401 is retried once with a fresh access token: its expiry is read against this
        process's clock, which need not be Label Studio's."""
        r = self.session.request(
            method, self.url + path, headers=self._headers(), timeout=60, **kwargs
        )
        if r.status_code == 401:
            self._access = ""
            r = self.session.request(
                method, self.url + path, headers=self._headers(), timeout=60, **kwargs
            )
        if r.status_code >= 400:
            raise requests.HTTPError(
                f"{method} {path}: HTTP {r.status_code}: {r.text[:500]}", response=r
            )
        return r

    def _create_pat(self) -> str:
        r = self.session.post(
            self.url + "/api/token/",
            headers={"Authorization": f"Token {self.legacy_token}"},
            timeout=30,
        )
        if r.status_code != 201:
            raise LabelStudioStartError(f"POST /api/token/: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()["token"]

    def token_settings(self) -> dict[str, bool]:
        """The organization's ``{api_tokens_enabled, legacy_api_tokens_enabled}``."""
        return self.api("GET", "/api/jwt/settings").json()

    def set_legacy_tokens(self, enabled: bool) -> None:
        """Turn legacy ``Token`` auth on or off for the organization (personal tokens stay on)."""
        self.api(
            "POST",
            "/api/jwt/settings",
            json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": enabled},
        )

    def enable_legacy_tokens(self) -> None:
        self.set_legacy_tokens(True)

    def disable_legacy_tokens(self) -> None:
        self.set_legacy_tokens(False)

    # --- projects, tasks, annotations ------------------------------------------------------
    def create_project(self, label_config: str, title: str = "test project") -> int:
        r = self.api("POST", "/api/projects", json={"title": title, "label_config": label_config})
        return int(r.json()["id"])

    def import_images(self, project: int, images: Sequence[tuple[str, bytes]]) -> list[int]:
        """Upload image files (multipart, one form field per file); returns the new task ids."""
        files = {f"file{i}": (name, data, "image/png") for i, (name, data) in enumerate(images)}
        r = self.api(
            "POST",
            f"/api/projects/{project}/import",
            params={"commit_to_project": "true", "return_task_ids": "true"},
            files=files,
        )
        body = r.json()
        ids = body.get("task_ids")
        if ids is None:
            raise LabelStudioStartError(f"import answered without task_ids: {body}")
        if len(ids) != len(images):
            raise LabelStudioStartError(f"imported {len(ids)} tasks for {len(images)} files")
        return [int(i) for i in ids]

    def import_tasks(self, project: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Import task dicts (``{"data": {...}}``) as JSON; returns the new task ids."""
        r = self.api(
            "POST",
            f"/api/projects/{project}/import",
            params={"return_task_ids": "true"},
            json=list(tasks),
        )
        return [int(i) for i in r.json()["task_ids"]]

    def add_local_storage(self, project: int, path: Path, title: str = "local") -> dict[str, Any]:
        """Connect a local-files storage to a project: Label Studio serves
        ``/data/local-files/?d=<path below local_files_root>`` only for files inside one."""
        body = {"project": project, "path": str(path), "use_blob_urls": True, "title": title}
        return self.api("POST", "/api/storages/localfiles", json=body).json()

    def tasks(self, project: int) -> list[dict[str, Any]]:
        """All tasks of a project, every page."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            r = self.api(
                "GET",
                "/api/tasks",
                params={"project": project, "page": page, "page_size": 100, "fields": "all"},
            )
            body = r.json()
            out.extend(body["tasks"])
            if not body["tasks"] or len(out) >= body["total"]:
                return out
            page += 1

    def add_ml_backend(
        self,
        project: int,
        url: str,
        basic_auth: tuple[str, str] | None = None,
        title: str = "ml backend",
        interactive: bool = False,
    ) -> dict[str, Any]:
        """Register an ML backend with a project (``interactive``: the smart tools call it);
        returns Label Studio's ML backend object."""
        body: dict[str, Any] = {"url": url, "project": project, "title": title}
        if interactive:
            body["is_interactive"] = True
        if basic_auth:
            body.update(
                auth_method="BASIC_AUTH",
                basic_auth_user=basic_auth[0],
                basic_auth_pass=basic_auth[1],
            )
        return self.api("POST", "/api/ml", json=body).json()

    def annotate(self, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        """Create an annotation on a task; returns it."""
        r = self.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})
        return r.json()

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.api("GET", "/api/predictions", params={"task": task_id}).json()

    def retrieve_predictions(self, project: int) -> None:
        """The data manager's "Retrieve predictions" on every task of a project."""
        r = self.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": True, "excluded": []}},
        )
        assert r.status_code == 200, r.text


@contextlib.contextmanager
def running_label_studio(
    tmp_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    template: bool = True,
) -> Iterator[LabelStudio]:
    """Install (if needed) and start a Label Studio 1.23.2 on 127.0.0.1; stop it on exit.

    Args:
        tmp_dir: a directory for Label Studio's data (database, uploads, log): empty for a
            fresh Label Studio, or one used before by this function to restart that one.
        port: the port to use (default: a free one); Label Studio would silently move to
            another port if it were busy, which ``wait_ready`` detects.
        extra_env: more environment variables for Label Studio (at run time: the
            organization comes from the template when ``template`` is true).
        timeout: seconds to wait for it to answer.
        template: start an empty ``tmp_dir`` from a copy of a freshly migrated data directory
            made once (``ensure_template``): about 5-15 s instead of 40-150 s.
    """
    require_system_test("Label Studio")
    exe = ensure_installed()
    data_dir = Path(tmp_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if template and not (data_dir / _STATE).exists() and not (data_dir / _DB).exists():
        shutil.copytree(ensure_template(timeout), data_dir, dirs_exist_ok=True)
    with _start(exe, data_dir, port, extra_env, timeout) as ls:
        yield ls


def _template_ready(path: Path) -> bool:
    try:
        state = json.loads((path / _STATE).read_text())
    except (OSError, ValueError):
        return False
    return bool(state.get("legacy_token")) and not state.get("pat") and (path / _DB).exists()


def ensure_template(timeout: float = START_TIMEOUT) -> Path:
    """A data directory of a Label Studio that started once (migrated, admin and legacy token
    made, legacy tokens still on, no personal access token), kept in the Label Studio venv and
    copied for each fresh start."""
    exe = ensure_installed()
    if _template_ready(TEMPLATE_DIR):
        return TEMPLATE_DIR
    with open(_INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _template_ready(TEMPLATE_DIR):
            return TEMPLATE_DIR
        work = Path(tempfile.mkdtemp(prefix=".template-", dir=LS_VENV))
        try:
            t0 = time.monotonic()
            with _start(exe, work, None, None, timeout, make_pat=False):
                pass
            (work / "label-studio.log").unlink(missing_ok=True)
            shutil.rmtree(TEMPLATE_DIR, ignore_errors=True)
            os.rename(work, TEMPLATE_DIR)
            logger.info("Label Studio data template made in %.0f s", time.monotonic() - t0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return TEMPLATE_DIR


@contextlib.contextmanager
def _start(
    exe: Path,
    data_dir: Path,
    port: int | None,
    extra_env: dict[str, str] | None,
    timeout: float,
    make_pat: bool = True,
) -> Iterator[LabelStudio]:
    (data_dir / "files").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    # a data dir used before keeps its admin and tokens: reuse them
    state_path = data_dir / _STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    legacy_token = state.get("legacy_token") or secrets.token_hex(20)
    state_path.write_text(json.dumps({"legacy_token": legacy_token, "pat": state.get("pat", "")}))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)
    }
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
            "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(16),
            "LABEL_STUDIO_USER_TOKEN": legacy_token,
            # on at organization creation so the bootstrap can create a PAT; turned off below
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_HOST": url,
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(data_dir / "files"),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            # no calls out: the pypi.org version check at startup, analytics, Sentry
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    log_path = data_dir / "label-studio.log"
    cmd = [
        str(exe),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ls = LabelStudio(url, legacy_token, data_dir, proc, log_path)
    ls.pat = state.get("pat", "")
    try:
        ls.wait_ready(timeout)
        if not ls.pat and make_pat:
            ls.pat = ls._create_pat()
            ls.disable_legacy_tokens()
            state_path.write_text(json.dumps({"legacy_token": legacy_token, "pat": ls.pat}))
        ls.start_seconds = time.monotonic() - t0
        logger.info("Label Studio up at %s in %.1f s (pid %d)", url, ls.start_seconds, ls.pid)
        yield ls
    finally:
        ls.stop()
