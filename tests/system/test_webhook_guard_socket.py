"""Oversized webhook bodies through a real gunicorn backend, with Content-Length and chunked."""

from __future__ import annotations

import json
import time

import pytest
import requests

from launcher.redis_server import free_port
from tests.backend.test_webhook_guard import HEADER, SECRET, big_annotation_list, entries
from tests.support.services import backend_process, service_env


@pytest.fixture
def live_backend(redis_url, model_dir, tmp_path):
    port = free_port()
    env = service_env(redis_url, model_dir, SAM2UNET_WEBHOOK_SECRET=SECRET)
    proc = backend_process(env, port, tmp_path)
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.stop()


def test_oversized_bodies_over_a_real_socket(live_backend, redis_conn):
    url, proc = live_backend
    data = json.dumps(big_annotation_list(60_000)).encode()
    headers = {HEADER: SECRET, "Content-Type": "application/json"}
    t0 = time.monotonic()
    r = requests.post(url + "/webhook", data=data, headers=headers, timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "request_entity_too_large"

    def chunks():  # no Content-Length: chunked transfer encoding
        for i in range(0, len(data), 64 * 1024):
            yield data[i : i + 64 * 1024]

    try:
        r = requests.post(url + "/webhook", data=chunks(), headers=headers, timeout=30)
        assert r.status_code == 413, r.text
        assert r.status_code == 413 and r.json()["error"] == "request_entity_too_large"
    except requests.ConnectionError:
        pass  # the server may close the connection before the client has sent everything
    assert time.monotonic() - t0 < 20
    r = requests.post(url + "/webhook", json={"action": "START_TRAINING", "project": 3},
                      headers={HEADER: SECRET}, timeout=10)  # fmt: skip
    assert r.status_code == 200 and r.json()["status"] == "recorded"
    assert [f[b"project"] for f in entries(redis_conn)] == [b"3"]
    assert proc.proc.poll() is None
