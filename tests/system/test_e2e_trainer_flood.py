"""A trainer under a flood of bad webhooks, with a real Label Studio 1.23.2: webhooks generated
by hypothesis go through the real backend's /webhook (secret set, small body limit) to a real
Redis, where the real TrainerService reads them and syncs from Label Studio. Afterwards it is
alive, has nothing pending, has recorded a failed round with its reason for every project Label
Studio does not have; then Label Studio goes away during a real project's sync (a failed
round), comes back, and the retry, with no new webhook, promotes a new version."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from backend.schemas import WebhookEvent
from contracts.events import EVENTS_STREAM
from contracts.metrics import ROUNDS, ROUNDS_KEY
from labelstudio.client import LabelStudioClient
from labelstudio.fetch import FetchPolicy, ImageFetcher
from launcher.redis_server import free_port
from sam2unet.synthetic import generate
from tests.support.lstudio import running_label_studio
from tests.support.services import annotate_brush, png_bytes, round_settings
from trainer.inbox import GROUP
from trainer.service import LOCK_KEY, TrainerService

pytestmark = pytest.mark.e2e

CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels></View>"""
SECRET = "flood-5b0c9e21d7a34f68"
HEADER = "X-Sam2unet-Webhook-Secret"
LIMIT = 4096

missing_project = st.integers(min_value=10**6, max_value=10**6 + 60)
good = {HEADER: SECRET}
valid_event = st.one_of(
    st.builds(lambda p: {"action": "START_TRAINING", "project": {"id": p}}, missing_project),
    st.builds(
        lambda p, a: {
            "action": "ANNOTATION_CREATED",
            "project": {"id": p},
            "annotation": {"id": a},
        },
        missing_project,
        st.integers(1, 10**6),
    ),
    st.builds(
        lambda p, n: {
            "action": "ANNOTATIONS_DELETED",
            "project": p,
            "annotations": [{"id": i} for i in range(n)],
        },
        missing_project.map(str),
        st.integers(0, 50),
    ),
)
wrong_type = st.one_of(
    st.builds(
        lambda a: {"action": a, "project": 1},
        st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2), st.just("")),
    ),
    st.builds(
        lambda p: {"action": "START_TRAINING", "project": p},
        st.one_of(
            st.floats(allow_nan=False),
            st.booleans(),
            st.lists(st.integers(), max_size=2),
            st.text(alphabet="xyz-²", min_size=1, max_size=5),
            st.just(-1),
        ),
    ),
    st.builds(
        lambda v: {"action": "ANNOTATIONS_DELETED", "project": 1, "annotations": v},
        st.one_of(
            st.text(max_size=5),
            st.integers(),
            st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
        ),
    ),
    st.lists(st.integers(), max_size=3),
)


def not_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return True
    return False


request = st.one_of(
    st.tuples(st.just("missing project"), valid_event.map(json.dumps), st.just(good)),
    st.tuples(st.just("malformed JSON"), st.binary(max_size=64).filter(not_json), st.just(good)),
    st.tuples(st.just("wrong types"), wrong_type.map(json.dumps), st.just(good)),
    st.tuples(
        st.just("oversized"),
        st.integers(LIMIT, 3 * LIMIT).map(
            lambda n: json.dumps({"action": "START_TRAINING", "project": 2, "pad": "x" * n})
        ),
        st.just(good),
    ),
    st.tuples(
        st.just("no or wrong secret"),
        valid_event.map(json.dumps),
        st.sampled_from([{}, {HEADER: "guess"}, {"Authorization": "Bearer guess"}]),
    ),
)
EXPECTED = {
    "missing project": 200,
    "malformed JSON": 400,
    "wrong types": 400,
    "oversized": 413,
    "no or wrong secret": 401,
}


def steps(trainer, seconds: float, until) -> list:
    reports = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reports += trainer.step(block_ms=50)
        if until(reports):
            return reports
    raise TimeoutError(f"not done in {seconds} s: {[(r.project, r.status) for r in reports]}")


def pending(conn) -> int:
    return conn.xpending(EVENTS_STREAM, GROUP)["pending"]


def test_a_flood_of_bad_webhooks_then_a_real_round_promotes(
    redis_conn, model_dir, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="trainer")
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    samples = generate(6, 64, seed=5)
    with running_label_studio(tmp_path / "ls") as ls:
        project = ls.create_project(CONFIG, title="flood survivor")
        ids = ls.import_images(
            project, [(f"s{i}.png", png_bytes(img)) for i, (img, _) in enumerate(samples)]
        )
        annotate_brush(ls, CONFIG, ids, [m[0] > 127 for _, m in samples], "object")
        conf = round_settings(
            models,
            label_studio_url=ls.url,
            label_studio_api_key=ls.pat,
            allow_hosts=("127.0.0.1", "localhost"),
            webhook_secret=SECRET,
            webhook_max_bytes=LIMIT,
            train_debounce=0.0,
            train_min_new=1,
            train_backoff=600.0,
            train_backoff_max=600.0,
            promote_tolerance=1.0,  # any candidate passes: the round's outcome is not the point
        )
        app = create_app(conf, redis_conn).test_client()
        ls_client = LabelStudioClient(ls.url, ls.pat)
        fetch = ImageFetcher(ls_client, FetchPolicy.from_settings(conf)).fetch
        trainer = TrainerService(conf, redis_conn, ls_client, fetch)
        sent: dict[str, int] = {}
        missing: set[int] = set()
        rounds: list = []

        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(req=request)
        def flood(req):
            kind, body, headers = req
            data = body if isinstance(body, bytes) else body.encode()
            r = app.post("/webhook", data=data, content_type="application/json", headers=headers)
            assert r.status_code == EXPECTED[kind], (kind, data[:200], r.get_json())
            assert isinstance(r.get_json(), dict)
            sent[kind] = sent.get(kind, 0) + 1
            if r.get_json().get("status") == "recorded":
                missing.add(WebhookEvent.parse(json.loads(data)).project)
            if sum(sent.values()) % 25 == 0:
                rounds.extend(trainer.step(block_ms=10))  # the trainer reads during the flood

        flood()
        print("webhooks sent:", sent, "projects Label Studio lacks:", len(missing))
        assert sum(sent.values()) >= 150 and set(sent) == set(EXPECTED)
        # stream entries nobody's backend would write
        for fields in (
            {"action": "START_TRAINING"},
            {b"\xff": b"\xfe"},
            {"action": "ANNOTATION_CREATED", "project": "7", "annotations": "{"},
            {"action": "SCHEDULED_ROUND", "project": "²"},
        ):
            redis_conn.xadd(EVENTS_STREAM, fields)

        rounds += steps(
            trainer,
            300,
            until=lambda rs: (
                pending(redis_conn) == 0 and {r.project for r in rounds + rs} >= missing
            ),
        )
        assert pending(redis_conn) == 0
        assert not redis_conn.exists(LOCK_KEY)
        assert {r.project for r in rounds} == missing
        assert all(r.status == "failed" and "HTTP 404" in r.reason for r in rounds)
        recorded = [json.loads(x) for x in redis_conn.lrange(ROUNDS_KEY, 0, -1)]
        assert {r["project"] for r in recorded} == missing
        assert all(r["status"] == "failed" and "HTTP 404" in r["reason"] for r in recorded)
        failed = int(redis_conn.hget(ROUNDS.key, json.dumps(["failed"])))
        assert failed == len(rounds)
        health = app.get("/health").get_json()["trainer"]
        assert health["failing_projects"] == len(missing)
        assert health["last_round"]["status"] == "failed"

        # Label Studio goes away during the real project's sync; it comes back before the retry
        before = trainer.registry.current()
        trainer.settings = dataclasses.replace(conf, train_backoff=1.0, train_backoff_max=2.0)
        trainer.client = LabelStudioClient(f"http://127.0.0.1:{free_port()}", ls.pat)
        r = app.post(
            "/webhook", json={"action": "START_TRAINING", "project": project}, headers=good
        )
        assert r.status_code == 200
        (down,) = steps(trainer, 60, until=lambda rs: any(x.project == project for x in rs))
        assert down.status == "failed" and "unreachable" in down.reason
        assert pending(redis_conn) == 0
        trainer.client = ls_client
        (back,) = steps(trainer, 600, until=lambda rs: any(x.project == project for x in rs))
    assert back.status == "promoted", back.to_json()
    assert trainer.registry.current() == back.candidate != before
    assert pending(redis_conn) == 0 and not redis_conn.exists(LOCK_KEY)
    assert f"rounds of project {project} work again after 1 failed round(s)" in caplog.text
    health = app.get("/health").get_json()["trainer"]
    assert health["last_round"]["status"] == "promoted"
    assert project not in {f["project"] for f in health["failing"]}
