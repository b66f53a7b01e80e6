"""Rounds over several machines: the trainer and its train agents.

With ``SAM2UNET_TRAIN_NODES=N`` (N > 1), a round runs on the trainer's machine and on N - 1
others, each running ``sam2unet-assist train-agent``. All of them see the same model directory
(and with it the dataset cache under it, or ``SAM2UNET_DATA_DIR``) and the same Redis, as
workers on several machines already do.

1. The trainer syncs the project and splits it as for any round, then publishes the round
   (:class:`ClusterRound`: the :class:`~trainer.round_training.RoundPlan`, the rendezvous endpoint and
   each task's image digest and mask file) under :data:`ROUND_KEY`, and starts its own
   processes, which host a c10d rendezvous at ``SAM2UNET_TRAIN_RDZV``.
2. Each agent sees the round, loads the parent version and the listed samples from the shared
   directories, checks them against the digests, and starts its processes into the same
   rendezvous. torch's elastic launcher joins them into one DDP process group; training is
   then exactly that of one machine with as many processes (same global batch, sampler and
   held-out evaluation).
3. The outcome reaches every machine; only the trainer writes the version and decides on
   promotion. Progress goes to the trainer's status from whichever machine runs rank 0.

A machine that does not come within ``SAM2UNET_TRAIN_JOIN_TIMEOUT`` seconds, or a process that
dies on any machine, fails the round: nothing is promoted, the lock is released, the trainer
goes on (and its interval trigger tries again); the agents wait for the next round.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from contracts import agents as presence
from contracts.metrics import TRAINER_STATUS_KEY as STATUS_KEY
from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from trainer.dataset import DatasetCache
from trainer.round_training import RoundPlan, machine_plan, round_datasets, train_and_evaluate

log = logging.getLogger(__name__)

ROUND_KEY = "sam2unet:trainer:cluster-round"  # the round the agents should join, as JSON
DEFAULT_PORT = 29400


class ClusterDataError(RuntimeError):
    """An agent's view of the round's data differs from the trainer's."""


@dataclass
class ClusterRound:
    """A round as the agents see it. ``samples``: task id -> [image sha256, mask file]."""

    run_id: str
    endpoint: str
    nodes: int
    join_timeout: float
    plan: RoundPlan
    samples: dict[str, list[str]]
    at: float

    def to_json(self) -> str:
        d = asdict(self)
        d["plan"] = self.plan.to_json()
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ClusterRound:
        d = json.loads(raw)
        return cls(
            str(d["run_id"]),
            str(d["endpoint"]),
            int(d["nodes"]),
            float(d["join_timeout"]),
            RoundPlan.from_json(d["plan"]),
            {str(k): [str(x) for x in v] for k, v in d["samples"].items()},
            float(d["at"]),
        )


def rendezvous_endpoint(settings: Settings) -> str:
    """``SAM2UNET_TRAIN_RDZV``, or this machine's host name on the default port."""
    from sam2unet.distributed.launcher import parse_endpoint  # imports torch

    host, port = parse_endpoint(settings.train_rdzv or socket.getfqdn(), DEFAULT_PORT)
    return f"{host}:{port}"


def report_progress(conn: redis.Redis, event: Any) -> None:
    """A training progress event into the trainer's status (read by /health and versions)."""
    if event.kind == "epoch" or event.step == event.steps:
        log.info(
            "training epoch %d/%d step %d/%d loss %.4f lr %.2e",
            event.epoch,
            event.epochs,
            event.step,
            event.steps,
            event.loss,
            event.lr,
        )
        conn.hset(
            STATUS_KEY,
            mapping={"epoch": event.epoch, "epochs": event.epochs, "loss": f"{event.loss:.5f}"},
        )


class RoundPublisher:
    """The trainer's side: publishes a round for the agents, and withdraws it afterwards."""

    def __init__(self, settings: Settings, conn: redis.Redis, cache: DatasetCache) -> None:
        self.settings = settings
        self.conn = conn
        self.cache = cache
        self.endpoint = rendezvous_endpoint(settings)
        self.published: str | None = None

    def __call__(self, plan: RoundPlan) -> Any:
        """Publish ``plan`` and return the :class:`~sam2unet.distributed.launcher.Cluster` to launch."""
        from sam2unet.distributed.launcher import Cluster  # imports torch

        manifest = self.cache.load_manifest(plan.project) if plan.project is not None else None
        if manifest is None:
            raise ClusterDataError(f"project {plan.project} has no synced dataset to share")
        samples = {}
        for task in [*plan.train_ids, *plan.val_ids]:
            s = manifest.samples.get(str(task))
            if s is None:
                raise ClusterDataError(f"task {task} is not in project {plan.project}'s dataset")
            samples[str(task)] = [s.image, s.mask]
        run_id = f"round-{uuid.uuid4().hex[:12]}"
        timeout = self.settings.train_join_timeout
        spec = ClusterRound(
            run_id, self.endpoint, self.settings.train_nodes, timeout, plan, samples, time.time()
        )
        # expires on its own if the trainer dies before withdrawing it
        self.conn.set(ROUND_KEY, spec.to_json(), ex=int(timeout) + 60)
        self.published = run_id
        idle = [a["name"] for a in presence.train_agents(self.conn) if a.get("state") == "idle"]
        log.info(
            "round %s published for %d machine(s), meeting at %s; idle train agents: %s",
            run_id,
            spec.nodes,
            self.endpoint,
            ", ".join(idle) or "none",
        )
        if len(idle) < spec.nodes - 1:
            log.warning(
                "round %s needs %d train agent(s), %d idle: it waits up to %.0f s for them",
                run_id,
                spec.nodes - 1,
                len(idle),
                timeout,
            )
        host = self.endpoint.rpartition(":")[0]
        return Cluster(
            spec.nodes,
            self.endpoint,
            run_id,
            host=True,
            join_timeout=timeout,
            local_addr=self.settings.train_addr or host,
        )

    def explain(self, error: Exception) -> str:
        """``error`` of the published run, with what the agents said of it."""
        said = agent_errors(self.conn, self.published) if self.published else []
        return "; ".join([str(error), *said])

    def withdraw(self) -> None:
        """Take the published round down (its run is over, whatever the outcome)."""
        if self.published is None:
            return
        raw = self.conn.get(ROUND_KEY)
        if raw is not None and json.loads(raw).get("run_id") == self.published:
            self.conn.delete(ROUND_KEY)
        self.published = None


def refuse(device: Any, relay: Any, message: str) -> None:
    """A rank of an agent that cannot take part: it joined the process group, and leaves it
    with this error, which ends the run on every machine."""
    raise ClusterDataError(message)


def agent_errors(conn: redis.Redis, run_id: str) -> list[str]:
    """Why agents refused run ``run_id`` (``"agent NAME: error"``)."""
    return [
        f"train agent {a['name']}: {a['error']}"
        for a in presence.train_agents(conn)
        if a.get("run_id") == run_id and a.get("error")
    ]


class TrainAgent:
    """``sam2unet-assist train-agent``: joins the rounds the trainer publishes with this
    machine's devices (``SAM2UNET_TRAIN_DEVICES``, else one process on ``SAM2UNET_DEVICE``)."""

    def __init__(self, settings: Settings, conn: redis.Redis, name: str | None = None) -> None:
        self.settings = settings
        self.conn = conn
        self.name = name or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.registry = ModelRegistry(settings.model_dir, conn)
        self.cache = DatasetCache(settings.dataset_dir)
        self.stop_event = threading.Event()
        self.joined: list[str] = []  # run ids, in order
        self.failed: list[str] = []
        self.plan = machine_plan(settings)
        self.state, self.run_id, self.error = "idle", "", ""

    def _state(self, state: str, run_id: str = "") -> None:
        self.state, self.run_id = state, run_id
        self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh this agent's presence (``/health``, ``versions``, the trainer's log)."""
        try:
            presence.announce(
                self.conn, self.name, self.state, list(self.plan.devices), self.run_id, self.error
            )
        except redis.exceptions.RedisError as e:
            log.warning("could not record this agent in Redis: %s", e)

    def _beat(self) -> None:
        while not self.stop_event.wait(presence.HEARTBEAT):
            self.heartbeat()

    def pending(self) -> ClusterRound | None:
        """The published round, when there is one this agent has not joined yet."""
        raw = self.conn.get(ROUND_KEY)
        if raw is None:
            return None
        try:
            spec = ClusterRound.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            log.error("unreadable published round, ignored: %s", e)
            return None
        # no clock comparison: the machines' clocks may differ; the key expires on its own
        if spec.run_id in self.joined:
            return None
        return spec

    def load(self, spec: ClusterRound) -> tuple[Any, Any, Any, Any]:
        """The parent version and the round's datasets, built exactly as the trainer builds
        them; raises :class:`ClusterDataError` when the shared data differs from the trainer's."""
        from sam2unet.relabel import relabel  # imports torch
        from sam2unet.train_config import TrainConfig  # imports torch

        plan = spec.plan
        manifest = self.cache.load_manifest(plan.project) if plan.project is not None else None
        if manifest is None:
            raise ClusterDataError(
                f"project {plan.project} has no dataset under {self.cache.root}: is "
                "SAM2UNET_DATA_DIR (or MODEL_DIR) the trainer's shared directory?"
            )
        by_id = {}
        for task in [*plan.train_ids, *plan.val_ids]:
            s = manifest.samples.get(str(task))
            if s is None or [s.image, s.mask] != spec.samples.get(str(task)):
                raise ClusterDataError(
                    f"task {task} of project {plan.project} differs from the trainer's dataset"
                )
            by_id[task] = (self.cache.image(s.image), self.cache.masks(plan.project, s))
        current = relabel(self.registry.load(plan.parent), tuple(plan.labels))
        seed = len(plan.train_ids) + len(plan.val_ids)
        train_data, val_data = round_datasets(
            by_id, plan.train_ids, plan.val_ids, plan.labels, current.config.image_size, seed
        )
        return current, train_data, val_data, TrainConfig.from_dict(plan.config)

    def join(self, spec: ClusterRound) -> bool:
        """Take part in one round; True when it completed on every machine."""
        from sam2unet.distributed import launcher  # imports torch

        self.joined.append(spec.run_id)
        self.joined = self.joined[-100:]
        log.info(
            "joining round %s of project %s at %s", spec.run_id, spec.plan.project, spec.endpoint
        )
        self.error = ""  # the last round's, kept for the trainer to read until this one
        self._state("training", spec.run_id)
        cluster = launcher.Cluster(
            spec.nodes,
            spec.endpoint,
            spec.run_id,
            host=False,
            join_timeout=spec.join_timeout,
            local_addr=self.settings.train_addr or None,
        )
        try:
            try:
                current, train_data, val_data, cfg = self.load(spec)
            except Exception as e:
                # join anyway, and fail at once: the round stops on every machine instead of
                # waiting out its join timeout, and the trainer reads why (the error below)
                self.error = f"{type(e).__name__}: {e}"
                log.error("round %s refused: %s", spec.run_id, self.error)
                self._state("refused", spec.run_id)
                launcher.launch(refuse, (str(e),), self.plan, threads=1, cluster=cluster)
                raise
            outcome = launcher.launch(
                train_and_evaluate,
                (current, train_data, val_data, cfg),
                self.plan,
                threads=self.settings.torch_threads,
                progress=lambda event: report_progress(self.conn, event),
                should_stop=self.stop_event.is_set,
                cluster=cluster,
            )
        except Exception as e:  # a failed round must not stop the agent
            log.error("round %s failed here: %s", spec.run_id, e)
            self.failed.append(spec.run_id)
            self._state("idle", spec.run_id)
            return False
        metric = cfg.select_metric
        log.info(
            "round %s done: candidate %s %.4f, current %.4f (the trainer decides on promotion)",
            spec.run_id,
            metric,
            outcome.candidate_metrics.get(metric, float("nan")),
            outcome.current_metrics.get(metric, float("nan")),
        )
        self._state("idle", spec.run_id)
        return True

    def run_forever(self, poll: float = 1.0) -> None:
        log.info(
            "train agent %s waiting for rounds (devices %s)", self.name, ",".join(self.plan.devices)
        )
        self._state("idle")
        beat = threading.Thread(target=self._beat, name="agent-heartbeat", daemon=True)
        beat.start()
        while not self.stop_event.is_set():
            try:
                spec = self.pending()
            except redis.exceptions.RedisError as e:
                log.error("Redis unreachable, retrying: %s", e)
                self.stop_event.wait(5.0)
                continue
            if spec is not None:
                self.join(spec)
            else:
                self.stop_event.wait(poll)
        with contextlib.suppress(redis.exceptions.RedisError):
            presence.withdraw(self.conn, self.name)
        log.info("train agent %s stopped", self.name)
