"""The untrained-decoder rule, through the real backend, a real worker process and a real Redis:
a fresh registry holding only an official SAM2.1 checkpoint makes no automatic masks (no
prediction for any task: an empty list in its place) and still serves prompts; one promoted round
of the real trainer code later, automatic masks come back. ``/health``, ``/setup`` and
``versions show`` name the prompt head and whether the automatic head was trained."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import redis

from backend.app import create_app
from contracts.settings import Settings
from labelstudio.codecs import rle_to_mask
from modelstore.registry import ModelRegistry
from modelstore.version_heads import SAM2_HEAD
from sam2unet.random_weights import write_random_sam2_checkpoint
from sam2unet.synthetic import generate
from tests.support.model_helpers import cpu_config, seeded_model
from tests.support.protocol import FIXTURES
from tests.support.services import LabelStudioLikeFiles, png_bytes, service_env, workers
from tests.system.test_serving import expected_masks
from trainer.round import run_round


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())["json"]


def versions_cli(env: dict[str, str], monkeypatch, capsys, *args: str):
    """``sam2unet-assist versions ...`` in this process, with the services' environment."""
    from cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert main(["versions", *args]) == 0
    return capsys.readouterr().out


@pytest.fixture
def fresh(tmp_path, redis_url):
    """MODEL_DIR with one official-format SAM2.1 checkpoint (test size, the whole SAM2 model:
    its prompt encoder and mask decoder included) and nothing else."""
    model_dir = tmp_path / "models"
    write_random_sam2_checkpoint(model_dir / "base" / "sam2.1_hiera_test.pt", "test")
    return model_dir


@pytest.mark.slow
def test_untrained_decoder_answers_empty_until_a_promoted_round(
    fresh, redis_url, tmp_path, monkeypatch, capsys
):
    conn = redis.Redis.from_url(redis_url)
    files = LabelStudioLikeFiles(tmp_path / "files")
    shapes = generate(3, 64, seed=5)
    refs = [files.add(f"upload/1/s{i}.png", png_bytes(img)) for i, (img, _) in enumerate(shapes)]
    tasks = [{"id": 10 + i, "data": {"image": f"{files.url}/{r}"}} for i, r in enumerate(refs)]
    batch = copy.deepcopy(fixture("post_predict_batch.json"))
    batch["tasks"] = tasks
    interactive = copy.deepcopy(fixture("post_predict_interactive.json"))
    interactive["tasks"][0]["data"]["image"] = tasks[0]["data"]["image"]
    for item in interactive["params"]["context"]["result"]:
        item["original_width"] = item["original_height"] = 64
    env = service_env(redis_url, fresh)
    settings = Settings.from_env(env)
    client = create_app(settings, conn).test_client()
    try:
        (tmp_path / "logs").mkdir()
        with workers(env, conn, 1, tmp_path / "logs") as (worker,):
            r = client.post("/predict", json=batch)
            assert r.status_code == 200, r.get_json()
            registry = ModelRegistry(fresh, conn)
            first = registry.current()
            info = registry.get(first)
            assert info.source.startswith("sam2:") and info.decoder_trained is False
            assert info.base_prompt_decoder is True
            results = r.get_json()["results"]
            assert len(results) == len(tasks)
            # no prediction for any task: Label Studio stores none, shows no prediction tab,
            # and asks again when a task is opened (docs/day0.md)
            assert results == [[] for _ in tasks]
            assert "was never trained" in worker.log()

            health = client.get("/health").get_json()
            assert health["model_version"] == first
            assert health["prompt_head"] == SAM2_HEAD
            assert health["automatic_head_trained"] is False
            assert any("never trained" in w for w in health["warnings"])
            setup = client.post("/setup", json=fixture("post_setup.json")).get_json()
            assert setup == {
                "model_version": first,
                "prompt_head": SAM2_HEAD,
                "automatic_head_trained": False,
            }

            # prompts are still served, under the version itself
            r = client.post("/predict", json=interactive)
            assert r.status_code == 200, r.get_json()
            (res,) = r.get_json()["results"]
            assert res["model_version"] == first, res
            assert "prompts: SAM2 head" in worker.log()  # answered by SAM2's own head
            # a context without a usable prompt falls back to the automatic head: no noise
            promptless = copy.deepcopy(interactive)
            promptless["params"]["context"]["result"] = [
                {
                    "type": "choices",
                    "value": {"choices": ["x"]},
                    "from_name": "c",
                    "to_name": "image",
                }
            ]
            r = client.post("/predict", json=promptless)
            assert r.status_code == 200, r.get_json()
            (res,) = r.get_json()["results"]
            assert res["result"] == [] and res["model_version"] == first, res
            assert "no prompt, and the automatic head was never trained" in worker.log()

            # one round of the real trainer code on labelled shapes, promoted
            train_settings = settings.with_(
                device="cpu",
                train_epochs=6,
                train_batch_size=8,
                train_lr=3e-3,
                train_holdout=0.25,
                train_min_samples=4,
            )
            samples = [(i + 1, img, m) for i, (img, m) in enumerate(generate(32, 64, seed=9))]
            report = run_round(registry, train_settings, samples, ("object",), project=1)
            assert report.status == "promoted", report
            second = report.candidate
            assert registry.current() == second and registry.get(second).decoder_trained

            r = client.post("/predict", json=batch)
            results = r.get_json()["results"]
            assert [res["model_version"] for res in results] == [second] * len(tasks)
            expected = expected_masks(fresh, second, [img for img, _ in shapes])
            for res, want in zip(results, expected, strict=True):
                got = np.zeros_like(want)
                for item in res["result"]:
                    got |= rle_to_mask(item["value"]["rle"], *want.shape)
                assert np.array_equal(got, want)
            assert any(res["result"] for res in results)  # automatic masks are back
            health = client.get("/health").get_json()
            assert health["automatic_head_trained"] is True
            assert not any("never trained" in w for w in health["warnings"])
    finally:
        files.close()

    rows = json.loads(versions_cli(env, monkeypatch, capsys, "list", "--json"))
    heads = {row["version"]: (row["prompt_head"], row["automatic_head_trained"]) for row in rows}
    assert heads == {first: (SAM2_HEAD, False), second: (SAM2_HEAD, True)}
    (row,) = json.loads(versions_cli(env, monkeypatch, capsys, "show", first))
    assert row["prompt_head"] == SAM2_HEAD and row["automatic_head_trained"] is False
    table = versions_cli(env, monkeypatch, capsys, "list").splitlines()
    assert "untrained" in next(line for line in table if first in line)
    assert "untrained" not in next(line for line in table if second in line)


def test_preannotation_run_writes_no_noise(fresh, redis_conn):
    """A project-wide run on a version with an untrained decoder stops with the reason before
    reading a single task (the Label Studio address answers nothing: it is never asked)."""
    from contracts import preannotate as runs
    from labelstudio.client import LabelStudioClient
    from worker.run_pages import process_page
    from worker.runtime import ModelRuntime, WorkerContext

    settings = Settings(model_dir=fresh, model_size="test", image_size=64, device="cpu")
    runtime = ModelRuntime(settings, ModelRegistry(fresh, redis_conn))
    ctx = WorkerContext(
        settings,
        redis_conn,
        runtime,
        fetch=lambda url, base, task: b"",
        ls_client=LabelStudioClient("http://127.0.0.1:9", "token"),
    )
    run_id, started = runs.start_run(redis_conn, 7)
    assert started
    assert "never trained" in process_page(ctx, run_id, 1)["error"]
    st = runs.status(redis_conn, run_id)
    assert st["status"] == runs.FAILED and "never trained" in st["error"]
    assert st["done"] == 0 and st["total"] is None


@pytest.mark.parametrize(
    ("source", "recorded", "trained"),
    [
        ("random-init", None, False),
        ("sam2:sam2.1_hiera_tiny.pt", None, False),
        ("released:salient", None, True),
        ("init-checkpoint:v3.pt", None, True),
        ("", None, True),  # a training round's version
        ("sam2:sam2.1_hiera_tiny.pt", True, True),  # recorded: the record wins
        ("", False, False),
    ],
)
def test_decoder_trained_of_versions_with_and_without_a_record(source, recorded, trained):
    from modelstore.registry import VersionInfo
    from modelstore.version_heads import decoder_trained

    info = VersionInfo("sam2unet-tiny-v1", 1, 0.0, "tiny", ("object",), None, source=source)
    if recorded is not None:
        info = VersionInfo.from_dict({**info.to_dict(), "decoder_trained": recorded})
    assert decoder_trained(info) is trained


def test_prompt_head_of_a_version_without_a_record_reads_its_base(fresh, tmp_path):
    """Versions written before the record: the base file decides (SAM2's prompt encoder and
    mask decoder in its ``model``: "sam2"; a bare trunk: "crop")."""
    from modelstore.registry import VersionInfo
    from modelstore.version_heads import CROP_HEAD, prompt_head_for
    from sam2unet.checkpoints import trunk_state_of, write_sam2_checkpoint

    registry = ModelRegistry(fresh, None)
    write_sam2_checkpoint(fresh / "base" / "trunk.pt", trunk_state_of(seeded_model(cpu_config())))
    for base, head in (("sam2.1_hiera_test.pt", SAM2_HEAD), ("trunk.pt", CROP_HEAD)):
        info = VersionInfo(
            "sam2unet-test-v1", 1, 0.0, "test", ("object",), {"name": base, "sha256": "x"}
        )
        assert info.base_prompt_decoder is None
        assert prompt_head_for(info, registry) == head
        assert prompt_head_for(info) == CROP_HEAD  # no registry to look in: not claimed
