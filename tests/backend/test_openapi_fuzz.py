"""Fuzzing the backend from its own OpenAPI description (schemathesis, hypothesis).

Requests generated from ``GET /openapi.json`` (valid and invalid bodies, parameters and headers)
go to the real Flask app over WSGI, with a real Redis and no worker (predictions wait only for a
short deadline). Every answer must be a documented status with a body matching the documented
schema; no 500, no traceback, and every error body is JSON ``{"error", "message"}``.
"""

from __future__ import annotations

import collections
import json

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from backend.app import create_app
from contracts.settings import Settings

pytestmark = pytest.mark.slow

BRUSH = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Object"/></BrushLabels></View>'
)


@pytest.fixture(scope="module")
def fuzz_model_dir(tmp_path_factory):
    """A registry with one test-size version (random trunk): /versions has details to show."""
    from modelstore.bootstrap import ensure_current_version
    from modelstore.registry import ModelRegistry

    d = tmp_path_factory.mktemp("fuzz-models")
    ensure_current_version(ModelRegistry(d, None), Settings(model_size="test", image_size=64))
    return d


@pytest.fixture
def fuzz_app(redis_url, fuzz_model_dir):
    settings = Settings(redis_url=redis_url, model_dir=fuzz_model_dir, predict_deadline=0.05)
    conn = redis.Redis.from_url(redis_url)
    app = create_app(settings, conn)
    yield app
    conn.flushdb()
    conn.close()


class Tally:
    """Counts requests per (method, path, status) and collects violations."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.failures: list[str] = []

    def check(self, case, response) -> None:
        key = (case.method.upper(), case.operation.path, response.status_code)
        self.counts[key] += 1
        text = response.text
        where = f"{case.method.upper()} {case.formatted_path} -> {response.status_code}"
        if response.status_code >= 500 and response.status_code != 503:
            self.failures.append(f"{where}: server error {text[:200]}")
        if "Traceback" in text or 'File "/' in text:
            self.failures.append(f"{where}: traceback in the body")
        if response.status_code >= 400:
            try:
                body = json.loads(text)
            except ValueError:
                self.failures.append(f"{where}: error body is not JSON: {text[:200]!r}")
                return
            if not (
                isinstance(body, dict)
                and isinstance(body.get("error"), str)
                and isinstance(body.get("message"), str)
            ):
                self.failures.append(f"{where}: error body is not {{error, message}}: {body}")
        try:
            case.validate_response(
                response,
                checks=[
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )
        except Exception as e:  # a schemathesis check failure: recorded, reported at the end
            self.failures.append(f"{where}: {type(e).__name__}: {str(e)[:300]}")


def _run(schema, mode: GenerationMode, examples: int, tally: Tally, headers=None) -> None:
    strategy = schema.as_strategy(generation_mode=mode)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def send(case) -> None:
        response = case.call(headers=headers)
        tally.check(case, response)

    send()


def test_openapi_document_describes_every_route(fuzz_app):
    client = fuzz_app.test_client()
    r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.get_json()
    assert doc["openapi"].startswith("3.")
    documented = {
        (m.upper(), p.replace("{run_id}", "<run_id>"))
        for p, ops in doc["paths"].items()
        for m in ops
    }
    routes = {
        (m, rule.rule)
        for rule in fuzz_app.url_map.iter_rules()
        if rule.endpoint != "static"
        for m in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert routes <= documented, routes - documented
    for path in ("/setup", "/predict", "/webhook", "/train", "/preannotate"):
        assert "requestBody" in doc["paths"][path]["post"], path
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "413", "503"} <= set(responses), (path, responses)


def test_fuzz_openapi_operations(fuzz_app):
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    tally = Tally()
    _run(schema, GenerationMode.POSITIVE, 300, tally)
    _run(schema, GenerationMode.NEGATIVE, 250, tally)
    total = sum(tally.counts.values())
    by_status = collections.Counter(s for (_, _, s) in tally.counts.elements())
    per_op = collections.Counter(f"{m} {p}" for (m, p, _) in tally.counts.elements())
    print(f"\nfuzz: {total} requests; statuses {dict(sorted(by_status.items()))}")
    for op, n in sorted(per_op.items()):
        print(f"  {op}: {n}")
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert total >= 500
    assert by_status[500] == 0
    # the generator reached the real work, not only the parsers
    assert by_status[200] >= 50 and by_status[400] >= 50
    assert len(per_op) >= 10


def test_fuzz_with_basic_auth_on(redis_url, fuzz_model_dir):
    settings = Settings(
        redis_url=redis_url,
        model_dir=fuzz_model_dir,
        predict_deadline=0.05,
        basic_auth_user="ls",
        basic_auth_pass="fuzz-secret",
    )
    app = create_app(settings, redis.Redis.from_url(redis_url))
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    tally = Tally()
    _run(schema, GenerationMode.POSITIVE, 80, tally)
    _run(schema, GenerationMode.NEGATIVE, 40, tally)
    by_status = collections.Counter(s for (_, _, s) in tally.counts.elements())
    print(f"\nfuzz with basic auth: {sum(by_status.values())} requests; {dict(by_status)}")
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert by_status[401] >= 20
    assert by_status[200] >= 1  # the open endpoints still answer
    redis.Redis.from_url(redis_url).flushdb()
