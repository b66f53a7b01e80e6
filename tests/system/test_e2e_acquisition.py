"""With a real Label Studio 1.23.2: after a training round, the project's tasks are re-predicted
by a worker process whose acquisition strategy is ``tta``, and the data manager sorted by
prediction score ascending lists the unlabeled tasks in the order that strategy asks for
(:func:`sam2unet.acquisition.select` on the same images with the current version)."""

from __future__ import annotations

import json
import shutil

import pytest

from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from sam2unet.acquisition import acquire, select
from sam2unet.predictor import Predictor
from sam2unet.synthetic import make_domain_sample, sample_rng
from sam2unet.transforms import decode_image
from tests.support.lstudio import running_label_studio
from tests.support.services import (
    ServiceProcess,
    annotate_brush,
    label_studio_env,
    png_bytes,
)
from tests.system.test_e2e_label_studio import BRUSH, our_predictions, wait_until

pytestmark = pytest.mark.e2e
STRATEGY = "tta"


def sorted_by_prediction_score(ls, project: int, version: str) -> list[dict]:
    """The project's tasks as the data manager lists them sorted by prediction score ascending,
    once the finished pre-annotation run has pointed the project at ``version``."""
    # the data manager's prediction score averages the predictions of the project's model
    # version (Label Studio 1.23): the worker sets it when the run is completed
    wait_until(
        lambda: ls.api("GET", f"/api/projects/{project}").json().get("model_version") == version,
        60,
        f"project {project} pointed at {version}",
    )
    # the data manager: a tab sorted by prediction score, ascending
    view = ls.api(
        "POST",
        "/api/dm/views",
        json={"project": project, "data": {"ordering": ["tasks:predictions_score"]}},
    ).json()
    return ls.api(
        "GET",
        "/api/tasks",
        params={"project": project, "view": view["id"], "page_size": 100, "fields": "all"},
    ).json()["tasks"]


def test_sorting_by_prediction_score_lists_the_strategys_order(
    tmp_path, redis_url, redis_conn, model_dir
):
    from labelstudio.client import LabelStudioClient
    from labelstudio.fetch import FetchPolicy, ImageFetcher
    from trainer.service import TrainerService

    shutil.copytree(model_dir, tmp_path / "models")
    models = tmp_path / "models"
    domains = ["easy", "low_contrast", "small", "several", "camouflage"]
    samples = [make_domain_sample(sample_rng(31, i), 64, domains[i % 5]) for i in range(12)]
    pngs = [png_bytes(img) for img, _ in samples]
    with running_label_studio(tmp_path / "ls") as ls:
        project = ls.create_project(BRUSH, title="acquisition order")
        ids = ls.import_images(project, [(f"a{i}.png", b) for i, b in enumerate(pngs)])
        annotate_brush(ls, BRUSH, ids[:4], [m[0] > 0 for _, m in samples[:4]], "Circle")
        env = label_studio_env(
            redis_url,
            models,
            ls,
            SAM2UNET_ACQUISITION=STRATEGY,
        )
        logs = tmp_path / "logs"
        logs.mkdir()
        worker = ServiceProcess(["worker", "--name", "acq-worker"], env, "worker", logs)
        try:
            worker.wait_log("worker ready", timeout=120)
            settings = Settings.from_env(
                {k: v for k, v in env.items() if k.startswith(("SAM2UNET_", "LABEL_STUDIO"))},
                model_dir=models,
                redis_url=redis_url,
                train_epochs=2,
            )
            client = LabelStudioClient(ls.url, ls.pat)
            fetch = ImageFetcher(client, FetchPolicy.from_settings(settings)).fetch
            service = TrainerService(settings, redis_conn, client, fetch)
            report = service.round(project, "acquisition test")
            assert report.status in ("promoted", "rejected"), report
            assert report.val_size == 2  # half of four: the held-out minimum's cap
            if report.status != "promoted":  # a promotion has started it already
                service.active_learning(project)
            version = service.registry.current()
            unlabeled = ids[4:]
            for tid in unlabeled:
                wait_until(
                    lambda t=tid: [
                        p for p in our_predictions(ls, t) if p["model_version"] == version
                    ],
                    180,
                    f"prediction of task {tid}",
                )
        finally:
            worker.stop()

        # what the strategy asks for, computed here on the same images and version
        loaded = ModelRegistry(models, None).load(version)
        predictor = Predictor(loaded.model, loaded.config, device="cpu", batch_size=1)
        images = [decode_image(b) for b in pngs[4:]]
        u = [a.uncertainty for a in acquire(predictor, images, STRATEGY)]
        expected = [unlabeled[i] for i in select(STRATEGY, u, len(u))]

        listed = sorted_by_prediction_score(ls, project, version)
        order = [t["id"] for t in listed if t["id"] in set(unlabeled)]
        scores = {t["id"]: t.get("predictions_score") for t in listed}
        print("strategy order:", expected, "data manager:", order, json.dumps(scores))
        assert order == expected
