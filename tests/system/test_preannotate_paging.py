"""A pre-annotation run reads every task present when it started exactly once, through a real
Label Studio 1.23.2, a real Redis and a real worker process: a task deleted after the first page
was read does not make the run miss the task after it (pages by offset did: the deletion shifts
the tasks still to read one place to the left, and one of them falls into the page already
read). A property test reads projects page by page while tasks are deleted and added between
pages: each task is read at most once, and every task present at the start and not deleted is
read."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq import Queue

from contracts import preannotate as runs
from contracts.jobs import QUEUE_BACKGROUND
from contracts.settings import Settings
from labelstudio.client import LabelStudioClient
from sam2unet.synthetic import make_domain_sample, sample_rng
from tests.support.lstudio import running_label_studio
from tests.support.services import label_studio_env, png_bytes, workers
from tests.system.test_bulk_writes import versions_per_task
from tests.system.test_e2e_label_studio import BRUSH
from worker.process import make_context
from worker.run_pages import process_page

pytestmark = pytest.mark.e2e
PAGE = 4


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    with running_label_studio(tmp_path_factory.mktemp("ls")) as ls:
        yield ls


def test_a_task_deleted_mid_run_makes_no_other_task_unread(
    ls, tmp_path, redis_url, redis_conn, model_dir
):
    n = 3 * PAGE + 2
    project = ls.create_project(BRUSH, title="paging")
    pngs = [png_bytes(make_domain_sample(sample_rng(71, i), 64, "easy")[0]) for i in range(n)]
    ids = ls.import_images(project, [(f"p{i}.png", b) for i, b in enumerate(pngs)])
    env = label_studio_env(
        redis_url,
        model_dir,
        ls,
        SAM2UNET_WRITE_BATCH="5",
    )
    settings = Settings.from_env(
        {k: v for k, v in env.items() if k.startswith(("SAM2UNET_", "LABEL_STUDIO"))},
        model_dir=model_dir,
        redis_url=redis_url,
    )
    run_id, _ = runs.start_run(redis_conn, project, page_size=PAGE)
    # the first page is read here, then a task of it is deleted before the next page is read
    redis_conn.delete("rq:queue:" + QUEUE_BACKGROUND)
    ctx = make_context(settings, redis_conn)
    first = process_page(ctx, run_id, 1)
    assert first["tasks"] == PAGE, first
    deleted = ids[1]
    assert ls.api("DELETE", f"/api/tasks/{deleted}/").status_code == 204
    with workers(env, redis_conn, 1, tmp_path) as procs:
        deadline = time.monotonic() + 300
        while runs.status(redis_conn, run_id)["status"] == "running":
            assert time.monotonic() < deadline, runs.status(redis_conn, run_id)
            time.sleep(0.2)
        logs = "".join(p.log() for p in procs)
    final = runs.status(redis_conn, run_id)
    assert final["status"] == "completed", (final, logs[-3000:])
    counts = versions_per_task(LabelStudioClient(ls.url, ls.pat), project, final["model_version"])
    # every task but the deleted one holds exactly one prediction of the run's version
    assert counts == {t: 1 for t in ids if t != deleted}, (counts, final)
    assert final["done"] == n - 1 and final["failed"] == 1, final


def enqueued_tasks(conn) -> list[int]:
    """Task ids of the predict jobs waiting in the background queue (page jobs left out)."""
    out = []
    for job in Queue(QUEUE_BACKGROUND, connection=conn).jobs:
        if job.func_name == "worker.jobs.predict":
            out += [item["task_id"] for item in job.args[0]["items"]]
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(0, 13),
    page=st.integers(1, 5),
    # after which page: delete the task at this index (of the tasks at the start), or add one
    changes=st.lists(
        st.tuples(st.integers(1, 3), st.sampled_from(["delete", "add"]), st.integers(0, 12)),
        max_size=4,
    ),
)
def test_every_task_present_at_the_start_is_read_once(
    ls, redis_url, redis_conn, model_dir, n, page, changes
):
    project = ls.create_project(BRUSH, title="paging property")
    tasks = [{"data": {"image": f"/data/q{i}.png"}} for i in range(n)]
    ids = ls.import_tasks(project, tasks) if tasks else []  # Label Studio refuses none
    env = label_studio_env(redis_url, model_dir, ls)
    settings_ = Settings.from_env(
        {k: v for k, v in env.items() if k.startswith(("SAM2UNET_", "LABEL_STUDIO"))},
        model_dir=model_dir,
        redis_url=redis_url,
    )
    redis_conn.flushdb()
    run_id, _ = runs.start_run(redis_conn, project, page_size=page)
    redis_conn.delete("rq:queue:" + QUEUE_BACKGROUND)
    ctx = make_context(settings_, redis_conn)
    read: list[int] = []
    deleted: set[int] = set()
    number = 1
    while True:
        out = process_page(ctx, run_id, number)
        assert "error" not in out, out
        read += enqueued_tasks(redis_conn)
        redis_conn.delete("rq:queue:" + QUEUE_BACKGROUND)  # predict jobs: not run here
        for after, what, i in changes:
            if after != number:
                continue
            if what == "delete" and i < n and ids[i] not in deleted:
                assert ls.api("DELETE", f"/api/tasks/{ids[i]}/").status_code == 204
                deleted.add(ids[i])
            elif what == "add":
                ls.import_tasks(project, [{"data": {"image": f"/data/new{i}.png"}}])
        if redis_conn.hget(runs.RUN_PREFIX + run_id, "paged") == b"1":
            break
        number += 1
        assert number <= n + 10, read
    # each task read once; every task present at the start and not deleted before its page
    assert len(read) == len(set(read)), read
    assert set(ids) - deleted <= set(read), (ids, deleted, read)
    assert all(t > max(ids or [0]) for t in set(read) - set(ids)), read  # added mid-run
