"""The trainer's incremental sync through a real Label Studio 1.23.2: after annotations are
created, updated, cancelled or deleted and tasks deleted, in any order hypothesis draws, a sync
that reads only what changed gives the same training set (sample ids, annotation revisions,
images and masks) as a full read of the project; the reasons for a full read are logged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.settings import Settings
from labelstudio.client import LabelStudioClient
from labelstudio.codecs import brush_result
from labelstudio.fetch import FetchPolicy, ImageFetcher
from labelstudio.labelconfig import parse_label_config
from sam2unet.synthetic import make_domain_sample, sample_rng
from tests.support.lstudio import running_label_studio
from tests.support.services import png_bytes
from tests.system.test_e2e_label_studio import BRUSH
from trainer.dataset import DatasetCache

pytestmark = pytest.mark.e2e
N = 6
TARGET = parse_label_config(BRUSH)


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    with running_label_studio(tmp_path_factory.mktemp("ls")) as ls:
        yield ls


@pytest.fixture(scope="module")
def env(ls):
    client = LabelStudioClient(ls.url, ls.pat)
    s = Settings(allow_hosts=("127.0.0.1", "localhost"))
    return client, ImageFetcher(client, FetchPolicy.from_settings(s)).fetch


def mask(seed: int) -> np.ndarray:
    m = np.zeros((64, 64), bool)
    r = np.random.default_rng(seed)
    y, x = r.integers(0, 48, size=2)
    m[y : y + 16, x : x + 12] = True
    return m


def annotate(ls, task: int, seed: int, cancelled: bool = False) -> int:
    item = brush_result(mask(seed), TARGET, "Circle", 1.0)
    item.pop("score", None)
    body = {"result": [] if cancelled else [item], "was_cancelled": cancelled}
    r = ls.api("POST", f"/api/tasks/{task}/annotations", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def dataset(cache: DatasetCache, project: int) -> dict[int, tuple]:
    """Task -> (annotation id, its updated_at, image digest, masks) of the derived set."""
    return {
        s.task: (s.annotation, s.updated_at, s.image, masks.tobytes())
        for s, _, masks in cache.samples(project)
    }


OPS = st.lists(
    st.tuples(
        st.sampled_from(["annotate", "update", "delete_annotation", "cancel", "delete_task"]),
        st.integers(0, N - 1),
        st.integers(0, 1000),
    ),
    max_size=6,
)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(rounds=st.lists(OPS, min_size=1, max_size=3))
def test_an_incremental_sync_gives_the_training_set_of_a_full_one(ls, env, tmp_path, rounds):
    client, fetch = env
    project = ls.create_project(BRUSH, title="incremental sync")
    pngs = [png_bytes(make_domain_sample(sample_rng(83, i), 64, "easy")[0]) for i in range(N)]
    ids = ls.import_images(project, [(f"s{i}.png", b) for i, b in enumerate(pngs)])
    annotations: dict[int, list[int]] = {t: [] for t in ids}
    for t in ids[:3]:
        annotations[t].append(annotate(ls, t, t))
    # no margin: these writes are done before each sync starts (Label Studio's Date header,
    # to the second, is the cursor)
    cache = DatasetCache(tmp_path / f"inc-{project}", margin=0)
    first = cache.sync(client, project, fetch)
    assert first.mode == "full" and first.reason.startswith("first sync"), first
    deleted: set[int] = set()
    touched = set(ids[:3])
    for k, ops in enumerate(rounds):
        for op, i, seed in ops:
            t = ids[i]
            if t in deleted:
                continue
            if op == "annotate":
                annotations[t].append(annotate(ls, t, seed))
            elif op == "cancel":
                annotations[t].append(annotate(ls, t, seed, cancelled=True))
            elif op == "update" and annotations[t]:
                item = brush_result(mask(seed), TARGET, "Circle", 1.0)
                item.pop("score", None)
                a = annotations[t][-1]
                r = ls.api("PATCH", f"/api/annotations/{a}/", json={"result": [item]})
                assert r.status_code == 200, r.text
            elif op == "delete_annotation" and annotations[t]:
                a = annotations[t].pop(int(seed) % len(annotations[t]))
                assert ls.api("DELETE", f"/api/annotations/{a}/").status_code == 204
            elif op == "delete_task":
                assert ls.api("DELETE", f"/api/tasks/{t}/").status_code == 204
                deleted.add(t)
        inc = cache.sync(client, project, fetch)
        assert inc.mode == "incremental", inc
        full_cache = DatasetCache(tmp_path / f"full-{project}-{k}")
        full = full_cache.sync(client, project, fetch)
        assert full.mode == "full" and full.reason.startswith("first sync")
        got, want = dataset(cache, project), dataset(full_cache, project)
        assert got.keys() == want.keys(), (ops, inc, full)
        assert got == want, ops
        # no task that never changed is read with its annotations (changes within the second
        # of a sync's start are read again by the next one)
        touched |= {ids[i] for _, i, _ in ops}
        assert inc.read <= len(touched), (ops, inc)


def test_the_reasons_for_a_full_read(ls, env, tmp_path, caplog):
    client, fetch = env
    project = ls.create_project(BRUSH, title="full sync reasons")
    png = png_bytes(make_domain_sample(sample_rng(89, 0), 64, "easy")[0])
    (task,) = ls.import_images(project, [("r.png", png)])
    annotate(ls, task, 1)
    cache = DatasetCache(tmp_path / "c")
    with caplog.at_level(logging.INFO, logger="trainer.dataset"):
        assert cache.sync(client, project, fetch).reason == "first sync (no manifest)"
        assert cache.sync(client, project, fetch).mode == "incremental"
        assert cache.sync(client, project, fetch, full=True).reason == "asked for"
        # a cursor later than Label Studio's clock (a restored backup, a clock set back)
        m = cache.load_manifest(project)
        m.cursor = "2999-01-01T00:00:00.000000Z"
        cache._save_manifest(m)
        assert cache.sync(client, project, fetch).reason.startswith("cursor 2999-01-01")
        m = cache.load_manifest(project)
        m.cursor = ""
        cache._save_manifest(m)
        assert cache.sync(client, project, fetch).reason == "no cursor in the manifest"
        periodic = DatasetCache(tmp_path / "c", full_every=0)
        assert periodic.sync(client, project, fetch).reason.startswith("periodic")
        # the labelling config changed (a label added)
        config = BRUSH.replace("</BrushLabels>", '<Label value="Square"/></BrushLabels>')
        assert ls.api("PATCH", f"/api/projects/{project}", json={"label_config": config}).ok
        assert cache.sync(client, project, fetch).reason == "labelling config changed"
    assert "full sync: asked for" in caplog.text
    assert len(cache.samples(project)) == 1
