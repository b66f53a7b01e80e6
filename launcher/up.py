"""``sam2unet-assist up``: the whole system on one machine, with nothing else to install.

Started in this order, each service a child process in a process group of its own:

1. Redis: the embedded ``redis-server`` (:class:`launcher.redis_server.EmbeddedRedis`) with its
   append-only file under ``MODEL_DIR/redis`` (or ``--data``), so queues, the current-version
   pointer and the metrics survive a restart; or the Redis of ``REDIS_URL`` when that is set.
2. The backend (``sam2unet-assist backend``, gunicorn) on ``--port`` (9090).
3. ``--workers`` prediction workers (``sam2unet-assist worker``).
4. The trainer (``sam2unet-assist trainer``), only when ``LABEL_STUDIO_URL`` and
   ``LABEL_STUDIO_API_KEY`` are set: it reads the corrected annotations through the API.

Every child gets ``REDIS_URL`` and an absolute ``MODEL_DIR``; its output is relayed to this
process's stderr with the service's name in front. ``up`` waits until ``/health`` answers and the
workers registered, then prints the URL to enter in Label Studio.

Stopping: SIGINT (Ctrl-C), SIGTERM or SIGHUP sends SIGTERM to every service (gunicorn's master
stops its processes after their requests, a worker after its job, the trainer after its epoch),
SIGKILL to every process group still alive after the grace period (a second
Ctrl-C: at once), and stops Redis last. Then it checks that every process group is empty. Each
service also gets SIGTERM from the kernel if ``up`` itself is killed (Linux); only the embedded
redis-server, started by :class:`EmbeddedRedis`, would then outlive it.

A service that exits on its own is not restarted: ``up`` logs which one and its exit code, stops
the others and exits with status 1, so the cause is the last thing in the log rather than hidden
by a restart loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis

from contracts.settings import Settings
from launcher import messages, state_file
from launcher.messages import redacted
from launcher.processes import Child, death_signal_hook, group_alive
from launcher.redis_server import EmbeddedRedis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpOptions:
    """What ``up`` starts. ``redis_url``: an external Redis (then none is embedded);
    ``data_dir``: the embedded Redis's data (default ``MODEL_DIR/redis``)."""

    host: str = "0.0.0.0"
    port: int = 9090
    workers: int = 1
    backend_processes: int = 2
    redis_url: str | None = None
    data_dir: Path | None = None
    redis_port: int | None = None
    trainer: bool = True
    grace: float = 15.0
    startup_timeout: float = 300.0


class Stack:
    """The services of one ``up``; :meth:`run` starts them, waits for a signal or a death,
    stops them and returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        options: UpOptions,
        env: Mapping[str, str],
        out: IO[str] | None = None,
    ) -> None:
        self.settings = settings.with_(model_dir=Path(settings.model_dir).resolve())
        self.options = options
        self.base_env = dict(env)
        self.out = out or sys.stdout
        self.children: list[Child] = []
        self.redis: Any = None  # EmbeddedRedis when embedded
        self.redis_url = ""
        self.signal: int | None = None
        self.force = False
        self.stopping = False
        self._write_lock = threading.Lock()
        self.state_path = self.settings.model_dir / state_file.STATE_FILE
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ output
    def say(self, text: str = "") -> None:
        with self._write_lock:
            self.out.write(text + "\n")
            self.out.flush()

    def loud(self, lines: list[str]) -> None:
        bar = "!" * 78
        self.say("\n".join([bar, *(f"!! {line}" for line in lines), bar]))

    def _relay(self, name: str, stream: IO[bytes]) -> None:
        prefix = f"{name:<9}| "
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._write_lock:
                sys.stderr.write(prefix + line + "\n")
                sys.stderr.flush()
        stream.close()

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal is not None or self.stopping:
            self.force = True
        self.signal = signum

    def _install_signals(self) -> dict[int, Any]:
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    # ------------------------------------------------------------------ start
    def start_redis(self) -> None:
        if self.options.redis_url:
            self.redis_url = self.options.redis_url
            try:
                redis.Redis.from_url(self.redis_url, socket_connect_timeout=3).ping()
            except redis.exceptions.RedisError as e:
                raise SystemExit(
                    f"REDIS_URL is set but Redis at {redacted(self.redis_url)} does not answer "
                    f"({type(e).__name__}); unset REDIS_URL to use an embedded Redis"
                ) from None
            self.say(f"Redis: {redacted(self.redis_url)} (REDIS_URL)")
            return
        data = self.options.data_dir or self.settings.model_dir / "redis"
        self.redis = EmbeddedRedis(port=self.options.redis_port or None, data_dir=data)
        # The embedded redis-server shares this process group: block SIGINT while it is
        # started (the mask is inherited through exec and redis-server keeps it), so Ctrl-C in
        # the terminal stops the services through this process, with Redis last.
        blocked = {signal.SIGINT, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self.redis.start()
        except RuntimeError as e:
            raise _StartupFailed(str(e)) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.redis_url = self.redis.url
        self.say(f"Redis: {self.redis_url} (embedded, data in {data})")

    def child_env(self) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(
            REDIS_URL=self.redis_url,
            MODEL_DIR=str(self.settings.model_dir),
            PYTHONUNBUFFERED="1",
        )
        return env

    def spawn(self, name: str, args: list[str]) -> Child:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env=self.child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=death_signal_hook(),
        )
        child = Child(name, proc)
        self.children.append(child)
        log.debug("started %s (pid %d)", name, proc.pid)
        return child

    def trainer_off_reason(self) -> str | None:
        if not self.options.trainer:
            return "--no-trainer was given"
        missing = [
            n
            for n, v in (
                ("LABEL_STUDIO_URL", self.settings.label_studio_url),
                ("LABEL_STUDIO_API_KEY", self.settings.label_studio_api_key),
            )
            if not v
        ]
        if missing:
            return (
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: the "
                "trainer reads corrected annotations through the Label Studio API"
            )
        return None

    def start_services(self) -> None:
        o = self.options
        self.spawn(
            "backend",
            [
                "backend",
                "--host", o.host,
                "--port", str(o.port),
                "--workers", str(o.backend_processes),
            ],
        )  # fmt: skip
        for i in range(o.workers):
            self.spawn(f"worker-{i + 1}" if o.workers > 1 else "worker", ["worker"])
        if self.trainer_off_reason() is None:
            self.spawn("trainer", ["trainer"])
        # relay output only once every child is forked (preexec_fn wants no other threads)
        for c in self.children:
            assert c.proc.stdout is not None
            c.relay = threading.Thread(
                target=self._relay, args=(c.name, c.proc.stdout), name=f"relay-{c.name}"
            )
            c.relay.daemon = True
            c.relay.start()
        self.write_state()

    def write_state(self) -> None:
        state_file.write(
            self.state_path,
            {
                "pid": os.getpid(),
                "started_at": time.time(),
                "redis_url": redacted(self.redis_url),
                "redis_pid": self.redis.proc.pid if self.redis is not None else None,
                "backend": f"http://{self.local_host}:{self.options.port}",
                "children": {c.name: c.pid for c in self.children},
            },
        )

    @property
    def local_host(self) -> str:
        h = self.options.host
        return "127.0.0.1" if h in ("0.0.0.0", "::", "") else h

    # ------------------------------------------------------------------ messages
    def model_state(self) -> None:
        """Say which model the workers will serve, loudly when it is an untrained encoder."""
        for loud, lines in messages.model_state(self.settings, self.redis_url):
            if loud:
                self.loud(lines)
            else:
                self.say("\n".join(lines))

    def banner(self) -> None:
        for text in messages.banner(self.settings, self.options, self.redis_url, self.local_host):
            self.say(text)

    # ------------------------------------------------------------------ waiting
    def health(self) -> dict[str, Any] | None:
        url = f"http://{self.local_host}:{self.options.port}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def dead_child(self) -> Child | None:
        for c in self.children:
            if c.proc.poll() is not None:
                return c
        return None

    def _interrupted(self) -> bool:
        if self.signal is not None:
            return True
        c = self.dead_child()
        if c is not None:
            raise _ChildDied(c)
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll():
            raise _ChildDied(None)
        return False

    def wait_ready(self, t0: float) -> bool:
        """Wait for /health, then for the workers; False if a signal came first."""
        deadline = t0 + self.options.startup_timeout
        body = None
        while body is None:
            if self._interrupted():
                return False
            if time.monotonic() > deadline:
                raise _StartupFailed(
                    f"the backend did not answer /health within {self.options.startup_timeout:.0f}s"
                )
            body = self.health()
            if body is None:
                time.sleep(0.2)
        self.timings["backend"] = time.monotonic() - t0
        self.say(f"Backend answers /health after {self.timings['backend']:.1f}s")
        while (body or {}).get("workers", 0) < self.options.workers:
            if self._interrupted():
                return False
            if time.monotonic() > deadline:
                self.loud(
                    [
                        f"only {(body or {}).get('workers', 0)} of {self.options.workers} worker(s)"
                        f" registered within {self.options.startup_timeout:.0f}s; still waiting"
                    ]
                )
                return True
            time.sleep(0.5)
            body = self.health() or body
        self.timings["ready"] = time.monotonic() - t0
        self.say(f"{self.options.workers} worker(s) ready after {self.timings['ready']:.1f}s")
        for w in body.get("warnings", []):
            self.say(f"WARNING (from /health): {w}")
        return True

    # ------------------------------------------------------------------ stop
    def stop(self) -> list[str]:
        """Stop every service (SIGTERM, then SIGKILL after the grace period), then Redis.
        Returns the names of the process groups that survived (empty when all is clean)."""
        self.stopping = True
        for c in reversed(self.children):
            # the group leader (gunicorn's master, a worker, the trainer) stops its own children
            with contextlib.suppress(ProcessLookupError):
                if c.proc.poll() is None:
                    os.kill(c.pid, signal.SIGTERM)
                elif group_alive(c.pid):
                    os.killpg(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.options.grace
        while time.monotonic() < deadline and not self.force:
            for c in self.children:
                c.proc.poll()
            if not any(group_alive(c.pid) for c in self.children):
                break
            time.sleep(0.1)
        for c in self.children:
            c.proc.poll()
            if group_alive(c.pid):
                log.warning("%s (pid %d) did not stop in time: killing it", c.name, c.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.pid, signal.SIGKILL)
        for c in self.children:
            try:
                c.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) does not exit even after SIGKILL", c.name, c.pid)
        kill_deadline = time.monotonic() + 5
        while any(group_alive(c.pid) for c in self.children) and time.monotonic() < kill_deadline:
            time.sleep(0.05)
        for c in self.children:
            if c.relay is not None:
                c.relay.join(timeout=2)
        if self.redis is not None:
            self.redis.stop()
        survivors = [c.name for c in self.children if group_alive(c.pid)]
        if self.redis is not None and self.redis.proc is not None:
            survivors.append("redis")
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        return survivors

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        previous = self._install_signals()
        t0 = time.monotonic()
        status = 0
        try:
            state_file.check_not_running(self.state_path, self.settings.model_dir)
            self.start_redis()
            self.write_state()
            self.model_state()
            off = self.trainer_off_reason()
            if off is not None:
                self.loud(["TRAINING IS OFF: " + off + ".", "Predictions work; no model learns."])
            self.start_services()
            if self.wait_ready(t0):
                self.banner()
                while not self._interrupted():
                    time.sleep(0.2)
            self.say(
                f"stopping (signal {signal.Signals(self.signal).name}); "
                "Ctrl-C again kills at once..."
            )
        except _ChildDied as e:
            if e.child is None:
                log.error("the embedded Redis exited unexpectedly; stopping everything")
            else:
                log.error(
                    "%s (pid %d) exited unexpectedly with code %s; stopping everything",
                    e.child.name,
                    e.child.pid,
                    e.child.proc.returncode,
                )
            status = 1
        except _StartupFailed as e:
            log.error("%s; stopping everything", e)
            status = 1
        finally:
            survivors = self.stop() if (self.children or self.redis is not None) else []
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if survivors:
            log.error("processes left running after the stop: %s", ", ".join(survivors))
            return 1
        self.say("all services stopped; no process left behind")
        return status


class _ChildDied(Exception):
    def __init__(self, child: Child | None) -> None:
        super().__init__(child.name if child else "redis")
        self.child = child


class _StartupFailed(Exception):
    pass


def run_up(settings: Settings, options: UpOptions, env: Mapping[str, str] | None = None) -> int:
    """Start everything, serve until SIGINT/SIGTERM/SIGHUP or a service's death, stop cleanly.
    Returns the exit status (0 after a requested stop)."""
    return Stack(settings, options, os.environ if env is None else env).run()
