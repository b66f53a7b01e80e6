"""The /webhook door: an optional shared secret (``SAM2UNET_WEBHOOK_SECRET``), a size limit
(``SAM2UNET_WEBHOOK_MAX_BYTES``) and bounded stream entries, on the real Flask app and a real
Redis (oversized bodies through gunicorn on a real socket: tests/system/
test_webhook_guard_socket.py). Settings come from environment variables, as the services read them."""

from __future__ import annotations

import base64
import copy
import json
import logging

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from backend.app import create_app
from contracts.events import EVENTS_STREAM
from contracts.settings import Settings
from tests.support.protocol import fixture

SECRET = "hook-9f2c1e7a55d04b3d"
HEADER = "X-Sam2unet-Webhook-Secret"
AUTH = ("ls-backend", "b4ckend-pass")
BASIC = "Basic " + base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()


@pytest.fixture
def make_client(redis_conn, tmp_path):
    def make(**env: str):
        settings = Settings.from_env(env, model_dir=tmp_path)
        return create_app(settings, redis_conn).test_client()

    return make


def payload(name: str, **changes) -> dict:
    body = copy.deepcopy(fixture(name)["json"])
    body.update(changes)
    return body


def entries(conn) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in conn.xrange(EVENTS_STREAM)]


def test_a_set_secret_is_required_on_every_webhook(make_client, redis_conn, caplog):
    client = make_client(SAM2UNET_WEBHOOK_SECRET=SECRET)
    caplog.set_level(logging.INFO)
    bodies = [
        payload("post_webhook_start_training.json", project={"id": 999999}),
        payload("post_webhook_annotation_created.json"),
        payload("post_webhook_annotations_deleted.json"),
    ]
    wrong = [
        {},
        {HEADER: ""},
        {HEADER: "wrong"},
        {HEADER: SECRET[:-1]},
        {HEADER: SECRET + "x"},
        {HEADER.lower(): SECRET.upper()},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Token {SECRET}"},
        {"Authorization": BASIC},  # basic auth is not configured here
    ]
    for body in bodies:
        for headers in wrong:
            r = client.post("/webhook", json=body, headers=headers)
            assert r.status_code == 401, (headers, r.get_json())
            err = r.get_json()
            assert err["error"] == "unauthorized" and HEADER in err["message"]
        # an unparseable body is refused for its missing secret, before it is read
        r = client.post("/webhook", data=b"{nope", content_type="application/json")
        assert r.status_code == 401
    assert entries(redis_conn) == []
    assert "webhook refused" in caplog.text
    assert SECRET not in caplog.text and SECRET[:-1] not in caplog.text

    for i, headers in enumerate(({HEADER: SECRET}, {"Authorization": f"Bearer {SECRET}"})):
        for body in bodies:
            r = client.post("/webhook", json=body, headers=headers)
            assert r.status_code == 200, r.get_json()
            assert r.get_json()["status"] == "recorded"
        assert len(entries(redis_conn)) == 3 * (i + 1)
    assert SECRET not in caplog.text


def test_with_a_secret_and_basic_auth_either_one_is_enough(make_client, redis_conn):
    """Label Studio's "Start Training" call carries the backend's basic auth and no custom
    header; the project webhook carries the header and no basic auth."""
    client = make_client(
        SAM2UNET_WEBHOOK_SECRET=SECRET, BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1]
    )
    start = payload("post_webhook_start_training.json")
    created = payload("post_webhook_annotation_created.json")
    bad_basic = "Basic " + base64.b64encode(b"ls-backend:nope").decode()
    for body in (start, created):
        assert client.post("/webhook", json=body).status_code == 401
        assert (
            client.post("/webhook", json=body, headers={"Authorization": bad_basic}).status_code
            == 401
        )
        assert (
            client.post("/webhook", json=body, headers={"Authorization": BASIC}).status_code == 200
        )
        assert client.post("/webhook", json=body, headers={HEADER: SECRET}).status_code == 200
    assert client.post("/train", json={"project": 1}).status_code == 401
    assert client.post("/train", json={"project": 1}, headers={HEADER: SECRET}).status_code == 200
    assert len(entries(redis_conn)) == 5


def test_without_a_secret_the_webhooks_stay_as_label_studio_sends_them(make_client, redis_conn):
    client = make_client()
    assert (
        client.post("/webhook", json=payload("post_webhook_start_training.json")).status_code == 200
    )
    client = make_client(BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1])
    created = payload("post_webhook_annotation_created.json")
    assert client.post("/webhook", json=created).status_code == 200
    start = payload("post_webhook_start_training.json")
    assert client.post("/webhook", json=start).status_code == 401
    assert client.post("/webhook", json=start, headers={"Authorization": BASIC}).status_code == 200


def big_annotation_list(n: int) -> dict:
    return {
        "action": "ANNOTATIONS_CREATED",
        "project": {"id": 4},
        "annotations": [{"id": i, "result": [{"value": {"rle": [0] * 40}}]} for i in range(n)],
    }


def test_oversized_bodies_get_413_json_and_record_nothing(make_client, redis_conn, caplog):
    caplog.set_level(logging.INFO)
    client = make_client()
    data = json.dumps(big_annotation_list(60_000)).encode()
    assert len(data) > 8 * 1024 * 1024
    r = client.post("/webhook", data=data, content_type="application/json")
    assert r.status_code == 413, r.get_json()
    assert r.get_json()["error"] == "request_entity_too_large"
    assert "1048576" in r.get_json()["message"]
    assert "webhook body" in caplog.text
    assert entries(redis_conn) == []

    client = make_client(SAM2UNET_WEBHOOK_MAX_BYTES="3000")
    small = json.dumps(big_annotation_list(20)).encode()
    assert 3000 < len(small) < 10_000
    r = client.post("/webhook", data=small, content_type="application/json")
    assert r.status_code == 413 and "3000" in r.get_json()["message"]
    r = client.post("/train", data=small, content_type="application/json")
    assert r.status_code == 413
    ok = json.dumps(big_annotation_list(2)).encode()
    r = client.post("/webhook", data=ok, content_type="application/json")
    assert r.status_code == 200
    # other endpoints keep their own (larger) limit
    r = client.post("/setup", data=small, content_type="application/json")
    assert r.status_code == 400  # read, and refused for its content


def test_a_long_annotation_list_is_capped_in_the_stream(make_client, redis_conn):
    client = make_client()
    body = {
        "action": "ANNOTATIONS_CREATED",
        "project": {"id": 4},
        "annotations": [{"id": i} for i in range(60_000)],
    }
    data = json.dumps(body).encode()
    assert len(data) < 1024 * 1024
    r = client.post("/webhook", data=data, content_type="application/json")
    assert r.status_code == 200, r.get_json()
    (fields,) = entries(redis_conn)
    assert sum(len(k) + len(v) for k, v in fields.items()) < 2048
    from backend.events import MAX_EVENT_IDS

    assert json.loads(fields[b"annotations"]) == list(range(MAX_EVENT_IDS))
    assert fields[b"count"] == b"60000"
    assert fields[b"project"] == b"4"


ACTIONS = [
    "START_TRAINING",
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATIONS_DELETED",
    "TASKS_CREATED",
    "PROJECT_DELETED",
]
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
project_value = st.one_of(
    st.integers(min_value=-5, max_value=2**64),
    st.text(max_size=12),
    st.builds(lambda i: {"id": i}, json_value),
    json_value,
)
webhook_object = st.fixed_dictionaries(
    {"action": st.one_of(st.sampled_from(ACTIONS), json_value)},
    optional={
        "project": project_value,
        "annotation": st.one_of(json_value, st.builds(lambda i: {"id": i}, json_value)),
        "annotations": st.one_of(json_value, st.lists(st.builds(lambda i: {"id": i}, json_value))),
        "task": json_value,
        "tasks": json_value,
    },
)
request_body = st.one_of(
    webhook_object.map(lambda b: json.dumps(b).encode()),
    json_value.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=200),
    st.integers(min_value=2000, max_value=6000).map(
        lambda n: json.dumps({"action": "START_TRAINING", "project": 1, "pad": "x" * n}).encode()
    ),
)
credentials = st.sampled_from(["none", "secret", "bearer", "wrong", "basic"])


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=request_body, creds=credentials)
def test_any_body_gets_a_clear_answer_and_a_bounded_entry(make_client, redis_conn, data, creds):
    client = make_client(SAM2UNET_WEBHOOK_SECRET=SECRET, SAM2UNET_WEBHOOK_MAX_BYTES="2048")
    headers = {
        "none": {},
        "secret": {HEADER: SECRET},
        "bearer": {"Authorization": f"Bearer {SECRET}"},
        "wrong": {HEADER: "not-" + SECRET},
        "basic": {"Authorization": BASIC},
    }[creds]
    note(f"body {data!r}, credentials {creds}")
    before = redis_conn.xlen(EVENTS_STREAM)
    r = client.post("/webhook", data=data, content_type="application/json", headers=headers)
    body = r.get_json()
    assert isinstance(body, dict), r.get_data()
    added = redis_conn.xlen(EVENTS_STREAM) - before
    if creds not in ("secret", "bearer"):
        assert r.status_code == 401 and body["error"] == "unauthorized"
    elif len(data) > 2048:
        assert r.status_code == 413 and body["error"] == "request_entity_too_large"
    else:
        assert r.status_code in (200, 400), body
    if r.status_code != 200:
        assert set(body) == {"error", "message"} and "Traceback" not in body["message"]
        assert added == 0
    else:
        assert body["status"] in ("recorded", "ignored")
        assert added == (1 if body["status"] == "recorded" else 0)
    for _, fields in redis_conn.xrevrange(EVENTS_STREAM, count=1):
        assert sum(len(k) + len(v) for k, v in fields.items()) < 2048
