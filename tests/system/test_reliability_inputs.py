"""Bad input against real components: bad images, refused URLs and local paths through a real
worker (per-task errors, the other tasks served), Label Studio unreachable, wrong label configs,
unknown webhook actions, non-JSON and oversized bodies.

The worker's Label Studio (``LABEL_STUDIO_URL``) is a closed loopback port, so relative URLs
cannot be fetched; images are served from loopback servers.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import redis
from PIL import Image

from backend.app import create_app
from contracts.events import EVENTS_STREAM
from contracts.settings import Settings
from launcher.redis_server import free_port
from tests.labelstudio.test_fetch import Server, body, bomb_png, redirect
from tests.support.protocol import fixture, red_circle
from tests.support.services import (
    LabelStudioLikeFiles,
    fresh_redis_db,
    png_bytes,
    service_env,
    workers,
)

CFG = fixture("post_setup.json")["json"]["schema"]
MAX_BYTES = 400_000
LS_KEY = "ls-api-key-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(redis_server, model_dir, tmp_path_factory):
    url, conn = fresh_redis_db(redis_server, 9)
    root = tmp_path_factory.mktemp("inputs")
    files = LabelStudioLikeFiles(root / "files")
    server = Server({})
    local = root / "local-root"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "ok.png").write_bytes(png_bytes(red_circle(seed=3)))
    outside = root / "outside.png"  # a valid image outside the root: must never be read
    outside.write_bytes(png_bytes(red_circle(seed=4)))
    os.symlink(outside, local / "sub" / "escape.png")
    os.symlink(local / "sub" / "ok.png", local / "inside-link.png")
    dead_ls = f"http://127.0.0.1:{free_port()}"
    env = service_env(
        url,
        model_dir,
        LABEL_STUDIO_URL=dead_ls,
        LABEL_STUDIO_API_KEY=LS_KEY,
        SAM2UNET_MAX_IMAGE_BYTES=str(MAX_BYTES),
        SAM2UNET_LOCAL_FILES_ROOTS=str(local),
        SAM2UNET_FETCH_TIMEOUT="5",
    )
    try:
        with workers(env, conn, 1, root) as procs:
            settings = Settings.from_env(env)
            app = create_app(settings, redis.Redis.from_url(url))
            yield {
                "client": app.test_client(),
                "settings": settings,
                "conn": conn,
                "files": files,
                "server": server,
                "worker": procs[0],
                "dead_ls": dead_ls,
                "url": url,
            }
    finally:
        files.close()
        server.close()
        conn.flushdb()


def big_png(min_bytes: int) -> bytes:
    """A valid PNG of random pixels larger than ``min_bytes``."""
    side = int((min_bytes / 3) ** 0.5) + 64
    arr = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = png_bytes(arr)
    assert len(data) > min_bytes
    return data


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_images_and_refused_urls_are_per_task_errors(stack):
    files, server = stack["files"], stack["server"]
    good = png_bytes(red_circle(seed=1))
    full = png_bytes(red_circle(seed=2))
    routes = {
        "/corrupt.png": body(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8),
        "/truncated.png": body(full[: len(full) // 2]),
        "/empty.png": body(b""),
        "/huge.png": body(big_png(MAX_BYTES)),
        "/bomb.png": body(bomb_png(100_000, 100_000)),
        "/html.png": body(b"<html>login</html>", "text/html"),
        "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-loopback": redirect(f"http://127.0.0.2:{server.port}/good.png"),
        "/to-file": redirect("file:///etc/passwd"),
        "/good.png": body(good),
        "/good.jpg": body(jpeg_bytes(red_circle(seed=5))),
    }
    server.routes.update(routes)
    s = server.url
    cases = [
        (f"{s}/good.png", None),
        (f"{s}/corrupt.png", "cannot decode"),
        (f"{s}/truncated.png", "cannot decode"),
        (f"{s}/empty.png", "empty image"),
        (f"{s}/huge.png", f"exceeds {MAX_BYTES} bytes"),
        (f"{s}/bomb.png", "pixel"),
        (f"{s}/good.jpg", None),
        (f"{s}/html.png", "cannot decode"),
        (f"{s}/missing.png", "HTTP 404"),
        (f"{s}/to-metadata", "link-local address"),
        (f"{s}/to-loopback", "loopback address"),
        (f"{s}/to-file", "'file' URL refused"),
        ("file:///etc/passwd", "'file' scheme is not allowed"),
        ("ftp://example.com/x.png", "'ftp' scheme is not allowed"),
        ("http://10.1.2.3/x.png", "private address"),
        ("s3://bucket/key.png", "Label Studio unreachable"),  # read through its storage endpoint
        ("data:image/png;base64,not*base64", "invalid base64"),
        ("/data/local-files/?d=sub/ok.png", None),  # read from the local root
        ("/data/local-files/?d=inside-link.png", None),  # a link inside the root
        ("/data/local-files/?d=../outside.png", "Label Studio unreachable"),
        ("/data/local-files/?d=sub/escape.png", "Label Studio unreachable"),
        (f"{files.url}/nothing-here.png", "HTTP 404"),
        (f"{s}/good.png", None),
    ]
    tasks = [{"id": i + 1, "data": {"image": u}} for i, (u, _) in enumerate(cases)]
    tasks.insert(3, {"id": 999, "data": {"other": "no image key"}})
    cases.insert(3, ("<none>", None))
    t0 = time.monotonic()
    r = stack["client"].post("/predict", json={"tasks": tasks, "label_config": CFG})
    seconds = time.monotonic() - t0
    assert r.status_code == 200, r.get_data(as_text=True)
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    log = stack["worker"].log()
    for task, (url, reason), res in zip(tasks, cases, results, strict=True):
        if task["id"] == 999:
            assert res["result"] == [] and res["model_version"].endswith("/failed")
        elif reason is None:
            assert res["result"], (url, res)
            assert not res["model_version"].endswith("/failed")
        else:
            assert res["result"] == [] and res["model_version"].endswith("/failed"), (url, res)
            assert f"task {task['id']}: no prediction:" in log
            line = next(x for x in log.splitlines() if f"task {task['id']}: no prediction:" in x)
            assert reason in line, (url, line)
    assert "Traceback" not in log
    assert seconds < 30
    failed = sum(1 for res in results if res["model_version"].endswith("/failed"))
    print(f"\n{len(tasks)} tasks, {failed} refused with per-task errors, in {seconds:.1f}s")


def test_label_studio_unreachable_gives_clear_per_task_errors_quickly(stack):
    dead = stack["dead_ls"]
    tasks = [{"id": 200 + i, "data": {"image": f"/data/upload/1/t{i}.png"}} for i in range(5)]
    stack["server"].routes["/ok.png"] = body(png_bytes(red_circle(seed=9)))
    tasks.insert(2, {"id": 300, "data": {"image": f"{stack['server'].url}/ok.png"}})
    t0 = time.monotonic()
    r = stack["client"].post("/predict", json={"tasks": tasks, "label_config": CFG})
    seconds = time.monotonic() - t0
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    assert [bool(x["result"]) for x in results] == [False, False, True, False, False, False]
    log = stack["worker"].log()
    for t in tasks:
        if t["id"] != 300:
            assert f"task {t['id']}: no prediction: Label Studio unreachable at {dead}" in log
    assert LS_KEY not in log
    assert seconds < 10, seconds
    print(f"\nLabel Studio down: {len(tasks)} tasks answered in {seconds:.2f}s")


WRONG_CONFIGS = {
    "no Image": (
        '<View><Text name="t" value="$text"/><BrushLabels name="b" toName="t">'
        '<Label value="x"/></BrushLabels></View>',
        "no Image tag",
    ),
    "no segmentation control": (
        '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">'
        '<Label value="x"/></RectangleLabels></View>',
        "no BrushLabels or PolygonLabels",
    ),
    "several segmentation controls": (
        '<View><Image name="i" value="$image"/><BrushLabels name="a" toName="i">'
        '<Label value="x"/></BrushLabels><PolygonLabels name="p" toName="i">'
        '<Label value="y"/></PolygonLabels></View>',
        "several segmentation controls (a, p)",
    ),
    "no labels": (
        '<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i"/></View>',
        "has no labels",
    ),
    "constant image value": (
        '<View><Image name="i" value="http://x/y.png"/><BrushLabels name="b" toName="i">'
        '<Label value="x"/></BrushLabels></View>',
        "must be a task data variable",
    ),
    "not XML": ("<View><Image", "not valid XML"),
    "entities": (
        '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY e "x">]><View>&e;</View>',
        "DTD or entities",
    ),
    "empty": ("   ", "'schema'"),
}


@pytest.mark.parametrize("name", list(WRONG_CONFIGS))
def test_wrong_label_configs_are_400_with_a_reason(stack, name):
    xml, reason = WRONG_CONFIGS[name]
    client = stack["client"]
    r = client.post("/setup", json={"schema": xml, "project": "1.1"})
    assert r.status_code == 400, r.get_data(as_text=True)
    assert reason in r.get_json()["message"]
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {}}], "label_config": xml})
    assert r.status_code == 400
    assert r.get_json()["error"] in ("invalid_label_config", "bad_request")


def test_unknown_webhook_actions_are_acknowledged_not_recorded(stack):
    client, conn = stack["client"], stack["conn"]
    before = conn.xlen(EVENTS_STREAM)
    for action in ("PROJECT_UPDATED", "TASKS_DELETED", "LABEL_LINK_CREATED", "SOMETHING_NEW", "x"):
        r = client.post("/webhook", json={"action": action, "project": {"id": 1}})
        assert r.status_code == 200 and r.get_json() == {"status": "ignored", "action": action}
    assert conn.xlen(EVENTS_STREAM) == before
    bad = [
        {"action": ""},
        {"action": 5},
        {"project": 1},
        {"action": "ANNOTATION_CREATED", "annotations": 5},
        {"action": "ANNOTATION_CREATED", "tasks": {"id": 1}},
        {"action": "ANNOTATION_CREATED", "project": "²"},
        {"action": "ANNOTATION_CREATED", "project": 10**30},
    ]
    for payload in bad:
        r = client.post("/webhook", json=payload)
        assert r.status_code == 400, (payload, r.get_data(as_text=True))
        assert set(r.get_json()) == {"error", "message"}
    assert conn.xlen(EVENTS_STREAM) == before
    # with basic auth on, an unknown action needs it (only annotation/task events come without)
    settings = stack["settings"].with_(basic_auth_user="u", basic_auth_pass="p")
    authed = create_app(settings, redis.Redis.from_url(stack["url"])).test_client()
    r = authed.post("/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 1}})
    assert r.status_code == 401 and r.get_json()["error"] == "unauthorized"


POSTS = ("/setup", "/predict", "/webhook", "/train", "/preannotate")
NOT_JSON = {
    "garbage": ("text/plain", b"hello"),
    "invalid JSON": ("application/json", b'{"tasks": ['),
    "JSON array": ("application/json", b"[1, 2]"),
    "JSON string": ("application/json", b'"tasks"'),
    "JSON null": ("application/json", b"null"),
    "empty": ("application/json", b""),
    "form": ("application/x-www-form-urlencoded", b"tasks=1&label_config=2"),
    "binary": ("application/octet-stream", bytes(range(256))),
    "bad UTF-8": ("application/json", b'{"a": "\xff\xfe"}'),
}


def test_non_json_bodies_are_400_json(stack):
    client = stack["client"]
    n = 0
    for path in POSTS:
        for name, (ctype, data) in NOT_JSON.items():
            r = client.post(path, data=data, content_type=ctype)
            assert r.status_code == 400, (path, name, r.status_code, r.get_data(as_text=True))
            body_ = r.get_json()
            assert set(body_) == {"error", "message"} and body_["message"], (path, name)
            n += 1
    print(f"\n{n} non-JSON bodies: all 400 JSON")


def test_preannotate_page_size_must_be_a_true_integer(stack):
    client = stack["client"]
    for page_size in (True, 0, 1001, "10", 2.5):
        r = client.post("/preannotate", json={"project": 1, "page_size": page_size})
        assert r.status_code == 400, (page_size, r.get_data(as_text=True))
        assert "page_size" in r.get_json()["message"]


def test_bodies_over_the_limit_are_413_json(stack):
    client = stack["client"]
    limit = client.application.config["MAX_CONTENT_LENGTH"]
    huge = b"x" * (limit + 1)
    for path in POSTS:
        r = client.post(path, data=huge, content_type="application/json")
        assert r.status_code == 413, (path, r.status_code)
        assert r.get_json()["error"] == "request_entity_too_large"
    # just under the limit is parsed (and refused for what it says, not for its size); webhooks
    # have a limit of their own (SAM2UNET_WEBHOOK_MAX_BYTES, tests/backend/test_webhook_guard.py)
    r = client.post("/setup", data=b" " * (limit - 20) + b'{"project":"x"}')
    assert r.status_code == 400  # content type is not JSON
