"""The order of a whole ``diverse`` run over the features its workers stored in a real Redis:
no two identical images in one batch, the most uncertain distinct image first, labelled tasks
as centres, and a diverse run's predictions held in its write buffer until every task is
predicted, which enqueues its ordering job exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from rq import Queue

from contracts import preannotate as runs
from contracts.jobs import QUEUE_BACKGROUND
from contracts.settings import Settings
from sam2unet.acquisition import run_order, select
from worker.diverse_order import (
    PREFIX,
    features,
    ordering,
    rank_scores,
    remember,
    remember_labelled,
    stored,
)
from worker.preannotate import BUFFER_PREFIX, flush
from worker.runtime import WorkerContext


def pool(seed: int = 0, dim: int = 48):
    """Task ids, uncertainties and features: task 1 the most uncertain, tasks 2 and 3 its exact
    copies (same features, uncertainty nearly as high), tasks 4.. distinct and less uncertain."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(9, dim)).astype(np.float16)
    feats = np.concatenate([base[:1], base[:1], base[:1], base[1:]])
    u = np.concatenate([[0.9, 0.89, 0.88], np.linspace(0.7, 0.3, 8)])
    return list(range(1, 12)), u, feats


def test_a_runs_order_never_puts_two_identical_images_in_one_batch(redis_conn):
    tasks, u, feats = pool()
    run_id = "7-1-abc"
    assert remember(redis_conn, run_id, zip(tasks, u, feats, strict=True)) == len(tasks)
    got_tasks, got_u, labelled = stored(redis_conn, run_id)
    assert got_tasks == tasks and not labelled
    np.testing.assert_allclose(got_u, u, atol=1e-6)
    np.testing.assert_array_equal(features(redis_conn, run_id, tasks), feats.astype(np.float32))

    k = 4
    order = ordering(redis_conn, run_id, batch=k, depth=len(tasks))
    assert sorted(order) == tasks
    scores = rank_scores(order)
    assert sorted(scores, key=scores.__getitem__) == order  # ascending score lists the order
    assert min(scores.values()) > 0 and max(scores.values()) < 1
    assert order[0] == 1  # the most uncertain distinct image first
    copies = {1, 2, 3}
    for start in range(0, 8, k):  # batches while distinct images remain: one copy at most
        assert len(copies & set(order[start : start + k])) <= 1, order
    assert set(order[-2:]) == {2, 3}  # the copies come last, after every distinct image
    # the first batch is the k-center-greedy pick from the 4k most uncertain
    dist = {t: np.linalg.norm(feats[t - 1].astype(np.float64) - feats[0]) for t in tasks}
    assert order[1] == max((t for t in tasks[3:]), key=dist.__getitem__)
    # same order as the pure function over the whole run
    assert order == [tasks[i] for i in run_order(got_u, feats, k)]


def test_labelled_tasks_with_known_features_are_centres(redis_conn):
    tasks, u, feats = pool(1)
    run_id = "7-2-def"
    remember(redis_conn, run_id, zip(tasks, u, feats, strict=True))
    remember_labelled(redis_conn, run_id, [1])  # the image with two copies is labelled
    order = ordering(redis_conn, run_id, batch=3, depth=len(tasks))
    assert 1 not in order  # a labelled task is not suggested
    assert set(order[-2:]) == {2, 3}  # its copies add nothing: last
    # with a centre, the first pick is the candidate farthest from it (the 4 x 3 most uncertain
    # unlabelled tasks are all candidates here)
    dist = {t: np.linalg.norm(feats[t - 1].astype(np.float64) - feats[0]) for t in tasks[3:]}
    assert order[0] == max(dist, key=dist.__getitem__)


def test_depth_bounds_the_diverse_part_and_the_rest_follow_uncertainty():
    _, u, feats = pool(2)
    order = run_order(u, feats, 2, depth=4)
    assert sorted(order) == list(range(len(u)))
    rest = order[4:]
    assert rest == sorted(rest, key=lambda i: -u[i])


def test_a_missing_feature_is_an_error_not_a_wrong_order(redis_conn):
    tasks, u, feats = pool(4)
    run_id = "7-3-ghi"
    remember(redis_conn, run_id, zip(tasks, u, feats, strict=True))
    redis_conn.hdel(PREFIX + run_id + ":features", "1")
    with pytest.raises(ValueError, match="no stored feature"):
        ordering(redis_conn, run_id, batch=3, depth=len(tasks))


def test_a_diverse_run_is_held_until_predicted_then_ordered_once(redis_conn):
    run_id, started = runs.start_run(redis_conn, 5, acquisition="diverse")
    assert started
    redis_conn.delete("rq:queue:" + QUEUE_BACKGROUND)  # the first page's job: not run here
    runs.update(redis_conn, run_id, strategy="diverse", total=3, paged=1)
    ctx = WorkerContext(Settings(write_batch=1), redis_conn, None, None)  # type: ignore[arg-type]
    redis_conn.hset(BUFFER_PREFIX + run_id, mapping={"1": b"x", "2": b"y"})
    runs.record(redis_conn, run_id, predicted=2)
    # full write batches, but a diverse run writes nothing before its order is applied
    assert flush(ctx, run_id) == 0 and redis_conn.hlen(BUFFER_PREFIX + run_id) == 2
    assert runs.status(redis_conn, run_id)["ordering"] is None
    assert not Queue(QUEUE_BACKGROUND, connection=redis_conn).jobs
    runs.record(redis_conn, run_id, failed=1)  # every task predicted (or failed)
    for _ in range(3):  # every later flush: the ordering job is enqueued once
        assert flush(ctx, run_id) == 0
    st = runs.status(redis_conn, run_id)
    assert st["status"] == runs.RUNNING and st["ordering"] == "pending"
    jobs = Queue(QUEUE_BACKGROUND, connection=redis_conn).jobs
    assert [(j.func_name, j.args) for j in jobs] == [(runs.ORDER_FUNC, (run_id,))]


def batches_of_select(u, feats, batch, labelled=None, depth=None):
    """The definition of the run's order, written plainly: batch after batch,
    :func:`select` over the images not yet ranked, everything ranked before as centres."""
    depth = len(u) if depth is None else depth
    rest, ranked = list(range(len(u))), []
    centres = np.zeros((0, feats.shape[1])) if labelled is None else labelled.astype(np.float64)
    while rest and len(ranked) < depth:
        k = min(batch, depth - len(ranked))
        sub = select(
            "diverse",
            u[rest],
            k,
            features=feats[rest].astype(np.float64),
            labelled_features=np.concatenate([centres, feats[ranked].astype(np.float64)]),
        )
        picked = [rest[j] for j in sub] or sorted(rest, key=lambda i: -u[i])[:k]
        ranked += picked
        rest = [j for j in rest if j not in set(picked)]
    return ranked + [int(i) for i in np.argsort(-u, kind="stable") if int(i) not in set(ranked)]


def test_the_incremental_order_equals_batches_of_select():
    rng = np.random.default_rng(3)
    for case in range(60):
        n = int(rng.integers(1, 40))
        base = rng.normal(size=(n, 8)).astype(np.float16)
        copies = rng.integers(0, max(1, n // 2), size=n) if case % 2 else np.arange(n)
        feats, u = base[copies], rng.random(n)
        labelled = base[:2] if case % 3 == 0 else None
        batch = int(rng.integers(1, 6))
        depth = None if case % 4 else int(rng.integers(0, n + 1))
        got = run_order(u, feats, batch, labelled_features=labelled, depth=depth)
        assert got == batches_of_select(u, feats, batch, labelled, depth), case
