"""With a real Label Studio 1.23.2, a real Redis and a real worker process: a ``preannotate
--acquisition diverse`` run over a project holding near-duplicate images (two images imported
three times each, plus distinct ones) rewrites its prediction scores once the run is completed,
so that the data manager sorted by prediction score ascending lists the k-center order of the
whole run: no two copies of an image in the first batch, and the same order as
:func:`sam2unet.acquisition.run_order` over the features the worker stored (which match the
model's own features of the images). A score that Label Studio refuses to rewrite is logged and
the other predictions are ordered all the same."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from contracts import preannotate as runs
from contracts.registry import ModelRegistry
from sam2unet.acquisition import acquire, run_order
from sam2unet.predictor import Predictor
from sam2unet.synthetic import make_domain_sample, sample_rng
from sam2unet.transforms import decode_image
from tests.lstudio import running_label_studio
from tests.services import ROOT, ServiceProcess, png_bytes, service_env
from tests.test_e2e_acquisition import sorted_by_prediction_score
from tests.test_e2e_label_studio import BRUSH
from worker.run_order import features, stored

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
        env = service_env(
            redis_url,
            models,
            LABEL_STUDIO_URL=ls.url,
            LABEL_STUDIO_API_KEY=ls.pat,
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
        assert "diverse scores 12/12 (0 failed)" in log
        # a copy on a later page came from the result cache, its feature with it
        assert re.search(r"items \([1-9]\d* cached", log), log[-3000:]

        # the order, computed here from what the worker stored
        tasks, _, u, labelled = stored(redis_conn, final["id"])
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
        first = [group[ids.index(t)] for t in order[:BATCH]]
        assert len(set(first)) == BATCH, first  # no two copies of an image in the first batch
        # the uncertainty order alone would put copies side by side: the rewrite mattered
        by_u = [group[ids.index(tasks[i])] for i in np.argsort(-u, kind="stable")]
        assert any(a == b for a, b in itertools.pairwise(by_u))


def test_a_score_that_cannot_be_rewritten_keeps_its_prediction(tmp_path, redis_conn, caplog):
    from labelstudio.client import LabelStudioClient
    from worker.run_order import order_run, remember

    rng = np.random.default_rng(5)
    with running_label_studio(tmp_path / "ls") as ls:
        project = ls.create_project(BRUSH, title="diverse ordering failure")
        ids = ls.import_images(
            project,
            [
                (f"f{i}.png", png_bytes(make_domain_sample(sample_rng(53, i), 64, "easy")[0]))
                for i in range(3)
            ],
        )
        client = LabelStudioClient(ls.url, ls.pat)
        preds = [client.create_prediction(t, [], 0.5, "sam2unet-v1")["id"] for t in ids]
        run_id, _ = runs.start_run(redis_conn, project, acquisition="diverse")
        feats = rng.normal(size=(3, 16))
        remember(redis_conn, run_id, zip(ids, preds, [0.9, 0.5, 0.1], feats, strict=True))
        # the most uncertain task's prediction is gone before the ordering job runs
        assert ls.api("DELETE", f"/api/predictions/{preds[0]}/").status_code == 204
        with caplog.at_level("WARNING", logger="worker.run_order"):
            out = order_run(redis_conn, client, run_id, batch=2, depth=3)
        assert out == {"ordered": 2, "failed": 1}
        assert f"task {ids[0]} keeps its uncertainty score" in caplog.text
        st = runs.status(redis_conn, run_id)
        assert st["ordering"] == "failed" and st["ordered"] == 2
        scores = {t: [p["score"] for p in ls.predictions(t)] for t in ids}
        assert scores[ids[0]] == []  # deleted here, not by the ordering
        # ranks 1 and 2 of 3 (rank 0 was the deleted one): the others' predictions stay
        assert sorted(s for t in ids[1:] for s in scores[t]) == pytest.approx([0.5, 0.75])
