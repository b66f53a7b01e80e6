"""A trainer round over two machines: the trainer and one ``sam2unet-assist train-agent`` (its
own process and process group, standing for the second machine), one CPU training process
each, meeting at a c10d rendezvous on loopback; one Redis, one shared model directory (with the
dataset cache in it), a real Label Studio as the source of the labels.

- No agent: the round fails when the join timeout passes; nothing is promoted or written, the
  lock is released.
- With the agent: the round completes, and its candidate's weights equal those of a round on
  one machine with two processes (``cpu:2``) over the same data and split: the same global
  batch of 4, two ranks of 2 samples, so the same computation (tolerance as in
  tests/system/test_distributed_training.py: float summation order only).
- The agent killed during training: the round fails cleanly and the trainer goes on.
"""

from __future__ import annotations

import dataclasses
import shutil
import time

import pytest
import redis
import torch

from backend.app import create_app
from contracts.agents import train_agents
from contracts.settings import Settings
from labelstudio.client import LabelStudioClient
from labelstudio.fetch import FetchPolicy, ImageFetcher
from launcher.redis_server import free_port
from modelstore.registry import ModelRegistry
from sam2unet.distributed.launcher import parse_endpoint
from sam2unet.exceptions import ConfigError
from sam2unet.synthetic import generate
from tests.support.lstudio import running_label_studio
from tests.support.services import (
    ServiceProcess,
    annotate_brush,
    label_studio_env,
    png_bytes,
)
from tests.system.test_distributed_training import assert_same_weights
from trainer.cluster import ROUND_KEY
from trainer.dataset import DatasetCache
from trainer.round import run_round
from trainer.service import LOCK_KEY, TrainerService

CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels></View>"""
LR = 1e-3


def trainer(env: dict[str, str], conn: redis.Redis, ls, **changes) -> TrainerService:
    settings = Settings.from_env(env).with_(**changes)
    client = LabelStudioClient(ls.url, ls.pat)
    fetch = ImageFetcher(client, FetchPolicy.from_settings(settings)).fetch
    return TrainerService(settings, conn, client, fetch, consumer=f"t-{time.time_ns()}")


def wait_idle(conn: redis.Redis, name: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for agent in train_agents(conn):
            if agent["name"] == name and agent["state"] == "idle":
                return agent
        time.sleep(0.2)
    raise TimeoutError(f"agent {name} did not start")


def trainable(registry: ModelRegistry, version: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in registry.load(version).model.trainable_state_dict().items()}


@pytest.mark.e2e
def test_a_round_over_two_machines(tmp_path, redis_url, model_dir):
    conn = redis.Redis.from_url(redis_url)
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    samples = generate(8, 64, seed=11)
    port = free_port()
    with running_label_studio(tmp_path / "ls") as ls:
        project = ls.create_project(CONFIG)
        ids = ls.import_images(project, [(f"s{i}.png", png_bytes(im)) for i, (im, _) in
                                         enumerate(samples)])  # fmt: skip
        annotate_brush(ls, CONFIG, ids, [m[0] > 127 for _, m in samples], "object")
        env = label_studio_env(
            redis_url,
            models,
            ls,
            SAM2UNET_DEVICE="cpu",
            SAM2UNET_TRAIN_EPOCHS="2",
            SAM2UNET_TRAIN_BATCH_SIZE="4",
            SAM2UNET_TRAIN_LR=str(LR),
            SAM2UNET_TRAIN_MIN_SAMPLES="4",
            SAM2UNET_TRAIN_HOLDOUT="0.25",
            SAM2UNET_ACTIVE_LEARNING="false",
            SAM2UNET_TRAIN_NODES="2",
            SAM2UNET_TRAIN_RDZV=f"127.0.0.1:{port}",
            SAM2UNET_TRAIN_JOIN_TIMEOUT="120",
        )
        registry = ModelRegistry(models, conn)
        parent = registry.current()
        listed = [v.name for v in registry.versions()]

        # nobody joins: the round fails after the join timeout, nothing changes
        alone = trainer(env, conn, ls, train_join_timeout=4.0)
        report = alone.round(project, "test")
        assert report.status == "failed" and "did not meet" in report.reason, report
        assert registry.current() == parent and [v.name for v in registry.versions()] == listed
        assert not conn.exists(LOCK_KEY) and not conn.exists(ROUND_KEY)

        # the reference: the same round on one machine with two processes, in a copy
        reference = tmp_path / "reference"
        shutil.copytree(models, reference)
        service = trainer(env, conn, ls)
        labels, data, _ = service.training_set(project)
        ref_settings = dataclasses.replace(
            service.settings, model_dir=reference, train_nodes=1, train_devices="cpu:2"
        )
        ref_registry = ModelRegistry(reference, None)
        want = run_round(ref_registry, ref_settings, data, labels, project=project)
        assert want.status in ("promoted", "rejected"), want

        # with an agent on the "second machine"
        agent_env = {**env, "SAM2UNET_TRAIN_ADDR": "localhost"}  # sorts after 127.0.0.1: rank 1
        agent = ServiceProcess(["train-agent", "--name", "a1"], agent_env, "agent", tmp_path)
        try:
            assert wait_idle(conn, "a1")["devices"] == ["cpu"]
            health = create_app(service.settings, conn).test_client().get("/health").get_json()
            assert [(a["name"], a["state"]) for a in health["train_agents"]] == [("a1", "idle")]
            got = service.round(project, "test")
            assert got.status in ("promoted", "rejected"), (got, agent.log()[-3000:])
            agent.wait_log(" done: candidate")
            wait_idle(conn, "a1")
            assert got.sides == want.sides and got.train_size == want.train_size == 4
            assert got.current_metrics == pytest.approx(want.current_metrics, abs=1e-9)
            assert [h["loss"] for h in got.history] == pytest.approx(
                [h["loss"] for h in want.history], rel=1e-5
            )
            assert_same_weights(
                trainable(registry, got.candidate),
                trainable(ref_registry, want.candidate),
                LR,
                steps=2,
            )
            assert got.candidate_metrics == pytest.approx(want.candidate_metrics, abs=1e-4)
            assert [v.name for v in registry.versions()] == [*listed, got.candidate]
            assert not conn.exists(ROUND_KEY)

            # the agent dies at the first step: the round fails, nothing is written
            now_current = registry.current()
            listed = [v.name for v in registry.versions()]

            def kill_agent(event) -> None:
                if event.kind == "step" and agent.proc.poll() is None:
                    agent.kill()

            service._progress = kill_agent
            failed = service.round(project, "START_TRAINING")
            assert failed.status == "failed" and "rank" in failed.reason, failed
            assert registry.current() == now_current
            assert [v.name for v in registry.versions()] == listed
            assert not conn.exists(LOCK_KEY) and not conn.exists(ROUND_KEY)
            assert service.step(block_ms=10) == []
        finally:
            agent.stop()

        # an agent whose volume is not the trainer's: one image differs from the trainer's
        # dataset; the agent refuses the round and it ends at once, saying why
        elsewhere = tmp_path / "elsewhere"
        shutil.copytree(models, elsewhere)
        cache = DatasetCache(elsewhere / "dataset")
        manifest = cache.load_manifest(project)
        task = sorted(manifest.samples, key=int)[0]
        manifest.samples[task].image = "0" * 64
        cache._save_manifest(manifest)
        other_env = {**agent_env, "MODEL_DIR": str(elsewhere)}
        other = ServiceProcess(["train-agent", "--name", "a2"], other_env, "agent2", tmp_path)
        try:
            wait_idle(conn, "a2")
            service._progress = lambda event: None
            t0 = time.monotonic()
            refused = service.round(project, "START_TRAINING")
            assert time.monotonic() - t0 < 100  # not the 120 s join timeout
            assert refused.status == "failed", refused
            assert f"train agent a2: ClusterDataError: task {task} of project" in refused.reason
            assert registry.current() == now_current
            assert [v.name for v in registry.versions()] == listed
            assert not conn.exists(LOCK_KEY) and not conn.exists(ROUND_KEY)
            assert wait_idle(conn, "a2")["error"].startswith("ClusterDataError")
        finally:
            other.stop()
    conn.close()


def test_cluster_settings(redis_conn, model_dir):
    assert parse_endpoint("10.0.0.5:29400") == ("10.0.0.5", 29400)
    assert parse_endpoint("trainer") == ("trainer", 29400)
    assert parse_endpoint("[::1]:1234") == ("::1", 1234)
    for bad in ("", "host:", "host:port", "host:70000", ":29400"):
        with pytest.raises(ConfigError, match="host:port"):
            parse_endpoint(bad)
    with pytest.raises(ValueError, match="SAM2UNET_TRAIN_NODES"):
        Settings(train_nodes=0)
    with pytest.raises(ValueError, match="SAM2UNET_TRAIN_RDZV"):
        TrainerService(
            Settings(model_dir=model_dir, train_nodes=2, train_rdzv="10.0.0.5:http"),
            redis_conn,
            None,
            None,
        )
    one = TrainerService(Settings(model_dir=model_dir), redis_conn, None, None)
    assert one.publisher is None  # one machine: nothing is published


def test_agent_presence(redis_conn):
    from contracts import agents

    agents.announce(redis_conn, "b", "idle", ["cuda:0", "cuda:1"])
    agents.announce(redis_conn, "a", "refused", ["cpu"], "round-1", "ClusterDataError: task 3")
    agents.announce(redis_conn, "c", "training", ["cpu"], "round-1")
    assert 0 < redis_conn.ttl(agents.AGENT_PREFIX + "a") <= agents.AGENT_TTL
    rows = agents.train_agents(redis_conn)
    assert [(r["name"], r["state"]) for r in rows] == [("a", "refused"), ("b", "idle"),
                                                      ("c", "training")]  # fmt: skip
    assert rows[0]["error"] == "ClusterDataError: task 3" and "error" not in rows[1]
    assert rows[1]["devices"] == ["cuda:0", "cuda:1"]
    agents.withdraw(redis_conn, "a")
    redis_conn.delete(agents.AGENT_PREFIX + "c")  # c died: its key expired
    assert [r["name"] for r in agents.train_agents(redis_conn)] == ["b"]
    assert redis_conn.smembers(agents.AGENT_NAMES) == {b"b"}  # the dead one's name is gone too
