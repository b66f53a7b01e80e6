"""Bulk prediction writes through a real Label Studio 1.23.2: every task's prediction is written
exactly once, when Label Studio refuses a call (a task deleted mid-run), when a writer dies
after Label Studio stored a call but before it heard back, and when a real worker is killed
with SIGKILL while it writes a pre-annotation run's buffer."""

from __future__ import annotations

import contextlib
import logging
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import preannotate as runs
from labelstudio.client import LabelStudioClient
from labelstudio.writeback import PredictionWriter
from sam2unet.synthetic import make_domain_sample, sample_rng
from tests.support.lstudio import running_label_studio
from tests.support.protocol import EFFICIENT_PREDICTION_IMPORT
from tests.support.services import label_studio_env, png_bytes, workers
from tests.system.test_e2e_label_studio import BRUSH
from worker.preannotate import BUFFER_PREFIX, FLUSH_LOCK_PREFIX

pytestmark = pytest.mark.e2e
RESULT = [
    {
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "value": {"format": "rle", "rle": [0, 1, 2, 3], "brushlabels": ["Circle"]},
        "original_width": 64,
        "original_height": 64,
    }
]


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    with running_label_studio(tmp_path_factory.mktemp("ls")) as ls:
        yield ls


def versions_per_task(client: LabelStudioClient, project: int, version: str) -> dict[int, int]:
    """Task id -> how many predictions of ``version`` it holds, for every task of the project."""
    out: dict[int, int] = {}
    page = 1
    while True:
        tasks, total = client.task_page(project, page, 100, full=True)
        for t in tasks:
            out[t["id"]] = sum(1 for p in t["predictions"] if p["model_version"] == version)
        if not tasks or len(out) >= (total or 0):
            return out
        page += 1


def new_project(ls, n: int) -> tuple[int, list[int]]:
    project = ls.create_project(BRUSH, title="bulk writes")
    ids = ls.import_tasks(project, [{"data": {"image": f"/data/x{i}.png"}} for i in range(n)])
    return project, ids


def items(ids: list[int], version: str) -> list[dict]:
    return [{"task": t, "result": RESULT, "score": 0.5, "model_version": version} for t in ids]


def test_a_refused_call_is_split_until_the_deleted_task_is_found(ls, redis_conn, caplog):
    client = LabelStudioClient(ls.url, ls.pat)
    project, ids = new_project(ls, 300)
    gone = ids[137]
    assert ls.api("DELETE", f"/api/tasks/{gone}/").status_code == 204
    writer = PredictionWriter(client, redis_conn, batch_size=128)
    with caplog.at_level(logging.ERROR, logger="labelstudio.writeback"):
        report = writer.write(project, "run-a", items(ids, "v-refused"))
    assert report.failed.keys() == {gone} and report.refused == {gone}
    assert report.written == set(ids) - {gone}
    assert f"task {gone}: prediction refused by Label Studio" in caplog.text
    # three calls of 128, 128, 44; the refused one split down to the single item: 2 log2(128)
    assert writer.calls <= 3 + 2 * 7
    counts = versions_per_task(client, project, "v-refused")
    assert set(counts) == set(ids) - {gone} and set(counts.values()) == {1}
    assert writer.counts("run-a", "v-refused") == (299, 1)
    # writing the same scope again sends nothing that was written
    again = PredictionWriter(client, redis_conn, batch_size=128)
    again.write(project, "run-a", items(ids, "v-refused"))
    assert versions_per_task(client, project, "v-refused") == counts
    assert again.counts("run-a", "v-refused") == (299, 1)


@pytest.fixture(scope="module")
def ls_efficient(tmp_path_factory):
    """A Label Studio with its per-call prediction import (docs/deployment.md)."""
    with running_label_studio(
        tmp_path_factory.mktemp("ls-efficient"), extra_env=EFFICIENT_PREDICTION_IMPORT
    ) as ls:
        yield ls


def test_the_per_call_import_refuses_a_deleted_task_and_writes_the_rest_once(
    ls_efficient, redis_conn
):
    ls = ls_efficient
    client = LabelStudioClient(ls.url, ls.pat)
    project, ids = new_project(ls, 300)
    gone = ids[200]
    assert ls.api("DELETE", f"/api/tasks/{gone}/").status_code == 204
    writer = PredictionWriter(client, redis_conn, batch_size=128)
    report = writer.write(project, "run-e", items(ids, "v-efficient"))
    assert report.failed.keys() == {gone} and report.written == set(ids) - {gone}
    counts = versions_per_task(client, project, "v-efficient")
    assert set(counts) == set(ids) - {gone} and set(counts.values()) == {1}
    # this import path does not check results against the label config: an item Label
    # Studio's other path leaves out is stored as sent, and so counted written
    project, ids = new_project(ls, 4)
    preds = items(ids, "v-unchecked")
    preds[1] = {**preds[1], "result": [{"from_name": "nope", "to_name": "image", "value": {}}]}
    report = PredictionWriter(client, redis_conn, batch_size=4).write(project, "run-f", preds)
    assert report.written == set(ids) and not report.failed
    assert versions_per_task(client, project, "v-unchecked") == dict.fromkeys(ids, 1)


def test_an_item_label_studio_leaves_out_is_counted_failed(ls, redis_conn):
    client = LabelStudioClient(ls.url, ls.pat)
    project, ids = new_project(ls, 10)
    preds = items(ids, "v-bad")
    preds[4] = {**preds[4], "result": [{"from_name": "nope", "to_name": "image", "value": {}}]}
    report = PredictionWriter(client, redis_conn, batch_size=10).write(project, "run-b", preds)
    assert report.refused == {ids[4]} and report.written == set(ids) - {ids[4]}
    counts = versions_per_task(client, project, "v-bad")
    assert counts[ids[4]] == 0 and sum(counts.values()) == 9


class Killed(BaseException):
    """The writer's process ending abruptly (nothing of ours catches it)."""


class DiesAt:
    """The real client, except that its ``at``-th bulk call ends the process: before the call
    reaches Label Studio, or after Label Studio stored it but before the answer came back."""

    def __init__(self, client: LabelStudioClient, at: int, after: bool) -> None:
        self.client, self.at, self.after, self.n = client, at, after, 0

    def import_predictions(self, project, predictions):
        self.n += 1
        if self.n == self.at and not self.after:
            raise Killed
        created = self.client.import_predictions(project, predictions)
        if self.n == self.at:
            raise Killed
        return created

    def __getattr__(self, name):
        return getattr(self.client, name)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 24),
    batch=st.integers(1, 9),
    at=st.integers(1, 6),
    after=st.booleans(),
    deleted=st.sets(st.integers(0, 23), max_size=3),
)
def test_a_writer_killed_anywhere_then_retried_writes_each_task_once(
    ls, redis_conn, n, batch, at, after, deleted
):
    client = LabelStudioClient(ls.url, ls.pat)
    project, ids = new_project(ls, n)
    gone = {ids[i] for i in deleted if i < n}
    for t in gone:
        ls.api("DELETE", f"/api/tasks/{t}/")
    scope = f"run-{time.time_ns()}"
    preds = items(ids, "v-kill")
    with contextlib.suppress(Killed):
        PredictionWriter(DiesAt(client, at, after), redis_conn, batch).write(project, scope, preds)
    report = PredictionWriter(client, redis_conn, batch).write(project, scope, preds)
    assert report.written == set(ids) - gone and set(report.failed) == gone
    counts = versions_per_task(client, project, "v-kill")
    assert counts == {t: 1 for t in ids if t not in gone}


def test_a_run_with_a_worker_killed_while_writing_predicts_each_task_once(
    ls, tmp_path, redis_url, redis_conn, model_dir
):
    n = 160
    project = ls.create_project(BRUSH, title="killed writer")
    pngs = [png_bytes(make_domain_sample(sample_rng(61, i), 64, "easy")[0]) for i in range(n)]
    files = [(f"k{i}.png", b) for i, b in enumerate(pngs)]
    ids = [t for s in range(0, n, 80) for t in ls.import_images(project, files[s : s + 80])]
    env = label_studio_env(
        redis_url,
        model_dir,
        ls,
        SAM2UNET_WRITE_BATCH="40",
    )
    deleted = killed = None
    with workers(env, redis_conn, 2, tmp_path) as procs:
        run_id, _ = runs.start_run(redis_conn, project, page_size=50)
        pending = None
        deadline = time.monotonic() + 300
        while runs.status(redis_conn, run_id)["status"] == "running":
            assert time.monotonic() < deadline, runs.status(redis_conn, run_id)
            # a task deleted after the run read every page (a deletion shifts the pages not
            # read yet), before it is written
            paged = redis_conn.hget(runs.RUN_PREFIX + run_id, "paged") == b"1"
            if deleted is None and paged:
                buffered = redis_conn.hkeys(BUFFER_PREFIX + run_id)
                if buffered:
                    deleted = int(buffered[0])
                    assert ls.api("DELETE", f"/api/tasks/{deleted}/").status_code == 204
            version = runs.status(redis_conn, run_id)["model_version"]
            pending = f"sam2unet:writing:{run_id}:{version}"
            holder = redis_conn.get(FLUSH_LOCK_PREFIX + run_id)
            if killed is None and holder and redis_conn.scard(pending):
                name = holder.decode().split("/")[0]
                killed = next(p for p in procs if p.name == name)
                killed.kill()  # SIGKILL while its bulk call is under way
            time.sleep(0.002)
        logs = "".join(p.log() for p in procs)
    final = runs.status(redis_conn, run_id)
    assert killed is not None and deleted is not None, final
    assert final["status"] == "completed", (final, logs[-4000:])
    assert final["done"] == n - 1 and final["failed"] == 1, final
    assert f"task {deleted}: prediction refused by Label Studio" in logs
    counts = versions_per_task(LabelStudioClient(ls.url, ls.pat), project, final["model_version"])
    assert counts == {t: 1 for t in ids if t != deleted}
