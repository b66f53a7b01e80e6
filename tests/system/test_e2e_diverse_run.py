"""With a real Label Studio 1.23.2, a real Redis and a real worker process: a ``preannotate
--acquisition diverse`` run over a project holding near-duplicate images (two images imported
three times each, plus distinct ones) ranks the whole run once every task is predicted and then
writes each prediction once, in bulk, with the score of its rank, so that the data manager
sorted by prediction score ascending lists the k-center order of the whole run: no two copies of
an image in the first batch, and the same order as :func:`sam2unet.acquisition.run_order` over
the features the worker stored (which match the model's own features of the images). A task
deleted before the ordered write is refused, logged and counted failed, the others are written
in order; a run whose order cannot be computed is written with its uncertainty scores."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from contracts import preannotate as runs
from modelstore.registry import ModelRegistry
from sam2unet.acquisition import acquire, run_order
from sam2unet.predictor import Predictor
from sam2unet.synthetic import make_domain_sample, sample_rng
from sam2unet.transforms import decode_image
from tests.support.lstudio import running_label_studio
from tests.support.services import ROOT, ServiceProcess, label_studio_env, png_bytes
from tests.system.test_e2e_acquisition import sorted_by_prediction_score
from tests.system.test_e2e_label_studio import BRUSH
from worker.diverse_order import features, stored

pytestmark = pytest.mark.e2e
BATCH = 4


def test_a_diverse_run_lists_no_near_duplicates_in_a_batch(
    tmp_path, redis_url, redis_conn, model_dir
):
    shutil.copytree(model_dir, tmp_path / "models")
    models = tmp_path / "models"
    domains = ["easy", "low_contrast", "small", "several", "camouflage"]
    distinct = [make_domain_sample(sample_rng(47, i), 64, domains[i % 5])[0] for i in range(8)]
    # images 0 and 1 three times each, then six others
    images = [distinct[0]] * 3 + [distinct[1]] * 3 + distinct[2:]
    group = [0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7]
    pngs = [png_bytes(img) for img in images]
    with running_label_studio(tmp_path / "ls") as ls:
        project = ls.create_project(BRUSH, title="diverse run")
        ids = ls.import_images(project, [(f"d{i}.png", b) for i, b in enumerate(pngs)])
        env = label_studio_env(
            redis_url,
            models,
            ls,
            SAM2UNET_DIVERSE_BATCH=str(BATCH),
        )
        logs = tmp_path / "logs"
        logs.mkdir()
        worker = ServiceProcess(["worker", "--name", "diverse-worker"], env, "worker", logs)
        try:
            worker.wait_log("worker ready", timeout=120)
            cli = subprocess.run(
                [
                    *(sys.executable, "-m", "cli", "preannotate", "--project", str(project)),
                    *("--acquisition", "diverse", "--page-size", "5"),
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            worker.stop()
        log = worker.log()
        assert cli.returncode == 0, cli.stdout + cli.stderr + log[-3000:]
        final = json.loads(cli.stdout.strip().splitlines()[-1])
        assert final["status"] == "completed" and final["acquisition"] == "diverse", final
        assert final["done"] == len(ids) and final["ordering"] == "done", final
        assert final["ordered"] == len(ids)
        assert "diverse order written 12/12 (0 failed)" in log
        # a copy on a later page came from the result cache, its feature with it
        assert re.search(r"items \([1-9]\d* cached", log), log[-3000:]

        # the order, computed here from what the worker stored
        tasks, u, labelled = stored(redis_conn, final["id"])
        assert tasks == sorted(ids) and not labelled
        feats = features(redis_conn, final["id"], tasks)
        expected = [tasks[i] for i in run_order(u, feats, BATCH)]
        # ... which are the model's own numbers for these images
        version = ModelRegistry(models, None).current()
        loaded = ModelRegistry(models, None).load(version)
        predictor = Predictor(loaded.model, loaded.config, device="cpu", batch_size=1)
        ours = acquire(predictor, [decode_image(b) for b in pngs], "diverse")
        by_task = {t: i for i, t in enumerate(tasks)}
        for i, tid in enumerate(ids):
            np.testing.assert_allclose(feats[by_task[tid]], ours[i].feature, rtol=2e-2, atol=2e-3)
            assert abs(u[by_task[tid]] - ours[i].uncertainty) < 1e-4

        listed = sorted_by_prediction_score(ls, project, version)
        order = [t["id"] for t in listed]
        scores = {t["id"]: t.get("predictions_score") for t in listed}
        print("k-center order:", expected, "data manager:", order, json.dumps(scores))
        assert order == expected
        # each task holds one prediction of the version, written once with its rank's score
        for r, t in enumerate(expected):
            preds = [p for p in ls.predictions(t) if p["model_version"] == version]
            assert [p["score"] for p in preds] == [pytest.approx((r + 1) / (len(ids) + 1))], t
        first = [group[ids.index(t)] for t in order[:BATCH]]
        assert len(set(first)) == BATCH, first  # no two copies of an image in the first batch
        # the uncertainty order alone would put copies side by side: the rewrite mattered
        by_u = [group[ids.index(tasks[i])] for i in np.argsort(-u, kind="stable")]
        assert any(a == b for a, b in itertools.pairwise(by_u))


def ordering_run(ls, redis_conn, tmp_path, n: int, label: str):
    """A diverse run of ``n`` new tasks whose predictions wait in its write buffer with their
    uncertainty scores (0.9, 0.8, ...) and whose features are stored: what its predict jobs
    leave behind once every task is predicted. Returns (run id, task ids, worker context)."""
    from contracts.settings import Settings
    from worker.diverse_order import remember
    from worker.preannotate import BUFFER_PREFIX
    from worker.process import make_context

    project = ls.create_project(BRUSH, title=label)
    ids = ls.import_tasks(project, [{"data": {"image": f"/data/{label}{i}.png"}} for i in range(n)])
    run_id, _ = runs.start_run(redis_conn, project, acquisition="diverse")
    redis_conn.delete("rq:queue:background")  # its page job: not run here
    u = [round(0.9 - 0.1 * i, 3) for i in range(n)]
    item = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 8}
    item |= {
        "original_height": 8,
        "value": {"format": "rle", "rle": [0], "brushlabels": ["Circle"]},
    }
    redis_conn.hset(
        BUFFER_PREFIX + run_id,
        mapping={
            str(t): zlib.compress(
                json.dumps(
                    {"task": t, "result": [item], "score": s, "model_version": "sam2unet-v7"}
                ).encode()
            )
            for t, s in zip(ids, u, strict=True)
        },
    )
    feats = np.random.default_rng(5).normal(size=(n, 16))
    remember(redis_conn, run_id, zip(ids, u, feats, strict=True))
    runs.update(
        redis_conn, run_id, strategy="diverse", total=n, paged=1, predicted=n,
        model_version="sam2unet-v7",
    )  # fmt: skip
    settings = Settings(
        model_dir=tmp_path / "models", label_studio_url=ls.url, label_studio_api_key=ls.pat
    )
    return run_id, ids, make_context(settings, redis_conn)


def scores_of(ls, ids: list[int]) -> dict[int, list[float]]:
    return {t: [p["score"] for p in ls.predictions(t)] for t in ids}


def test_a_task_deleted_before_the_ordered_write_is_refused_the_others_are_ordered(
    tmp_path, redis_conn, caplog
):
    from worker.preannotate import order_and_write

    with running_label_studio(tmp_path / "ls") as ls:
        run_id, ids, ctx = ordering_run(ls, redis_conn, tmp_path, 3, "refused")
        # the most uncertain task is deleted after it was predicted, before the ordered write
        assert ls.api("DELETE", f"/api/tasks/{ids[0]}/").status_code == 204
        with caplog.at_level("INFO"):
            out = order_and_write(ctx, run_id)
        assert out == {"ordered": 2, "written": 2, "failed": 1}
        assert f"task {ids[0]}: prediction refused by Label Studio" in caplog.text
        st = runs.status(redis_conn, run_id)
        assert st["status"] == "completed" and st["ordering"] == "done" and st["ordered"] == 2
        # the deleted task kept its rank (0 of 3): the others have ranks 1 and 2, once each
        scores = scores_of(ls, ids[1:])
        assert sorted(s for v in scores.values() for s in v) == pytest.approx([0.5, 0.75])
        assert all(len(v) == 1 for v in scores.values())


def test_a_run_without_an_order_is_written_with_its_uncertainty_scores(
    tmp_path, redis_conn, caplog
):
    from worker.diverse_order import PREFIX
    from worker.preannotate import order_and_write

    with running_label_studio(tmp_path / "ls") as ls:
        run_id, ids, ctx = ordering_run(ls, redis_conn, tmp_path, 3, "unordered")
        redis_conn.delete(PREFIX + run_id + ":features")  # e.g. expired
        with caplog.at_level("INFO"):
            out = order_and_write(ctx, run_id)
        assert out == {"ordered": 0, "written": 3, "failed": 0}
        assert "no diverse order, predictions keep their uncertainty scores" in caplog.text
        st = runs.status(redis_conn, run_id)
        assert st["status"] == "completed" and st["ordering"] == "failed"
        assert scores_of(ls, ids) == {
            t: [pytest.approx(s)] for t, s in zip(ids, [0.9, 0.8, 0.7], strict=True)
        }
