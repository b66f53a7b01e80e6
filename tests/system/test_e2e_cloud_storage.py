"""End to end: task images in an S3 bucket connected to a real Label Studio 1.23.2.

A real S3-compatible server (moto in server mode, ``tests/support/storage_servers.py``) on loopback holds the
images; Label Studio imports them through S3 import storages, one set to presigned URLs and one
proxying the bytes. Our backend and a worker run as real processes; "Retrieve predictions",
``preannotate`` and a training round each read the bucket's images through Label Studio's
storage endpoint. One Label Studio and one S3 server serve every test of this module.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import redis
import requests

from contracts.errors import ImageFetchError
from labelstudio.client import LabelStudioClient
from labelstudio.codecs import brush_result, results_to_masks
from labelstudio.fetch import FetchPolicy, ImageFetcher
from labelstudio.labelconfig import parse_label_config
from launcher.redis_server import free_port
from sam2unet.transforms import decode_image
from tests.support.lstudio import running_label_studio
from tests.support.protocol import FIXTURES
from tests.support.services import (
    ServiceProcess,
    fresh_redis_db,
    label_studio_env,
    png_bytes,
    round_settings,
)
from tests.support.storage_servers import GCSServer, S3Server
from tests.system.test_e2e_label_studio import BRUSH, circle_sample, wait_until

pytestmark = pytest.mark.e2e

AUTH = ("ls-backend", "cl0ud-pass")
BUCKET = "assist-images"
GCS_BUCKET = "assist-gcs"
# eight images of two sizes: a mask at the wrong size would show
SIZES = [(80, 96), (72, 88)] * 4
TARGET = parse_label_config(BRUSH)


def bucket_images() -> dict[str, np.ndarray]:
    return {f"img/{i}.png": circle_sample(700 + i, h, w)[0] for i, (h, w) in enumerate(SIZES)}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, redis_server, model_dir):
    """moto S3 with a bucket of images, Label Studio, our backend and one worker (which may
    fetch presigned URLs on private addresses: SAM2UNET_ALLOW_PRIVATE_STORAGE, and no
    allow-listed hosts)."""
    root = tmp_path_factory.mktemp("cloud")
    shutil.copytree(model_dir, root / "models")
    redis_url, _ = fresh_redis_db(redis_server, 13)
    s3 = S3Server()
    gcs = GCSServer()
    images = bucket_images()
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    gcs.create_bucket(GCS_BUCKET)
    for key, img in images.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=png_bytes(img), ContentType="image/png")
        gcs.put(GCS_BUCKET, key, png_bytes(img))
    try:
        with running_label_studio(root / "ls", extra_env=gcs.label_studio_env()) as ls:
            port = free_port()
            env = label_studio_env(
                redis_url,
                root / "models",
                ls,
                BASIC_AUTH_USER=AUTH[0],
                BASIC_AUTH_PASS=AUTH[1],
                SAM2UNET_ALLOW_HOSTS="",
                SAM2UNET_ALLOW_PRIVATE_STORAGE="true",
                SAM2UNET_BATCH_SIZE="4",
            )
            logs = root / "logs"
            logs.mkdir()
            backend = ServiceProcess(
                ["backend", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                env,
                "backend",
                logs,
            )
            worker = ServiceProcess(["worker", "--name", "cloud-worker"], env, "worker", logs)
            try:
                backend.wait_http(f"http://127.0.0.1:{port}/health")
                worker.wait_log("worker ready", timeout=120)
                yield {
                    "ls": ls,
                    "s3": s3,
                    "gcs": gcs,
                    "images": images,
                    "url": f"http://127.0.0.1:{port}",
                    "worker": worker,
                    "root": root,
                    "redis_server": redis_server,
                }
            finally:
                for p in (worker, backend):
                    p.stop()
    finally:
        s3.close()
        gcs.close()


def s3_project(
    cloud, title: str, presign: bool, presign_ttl: int = 1, kind: str = "s3"
) -> list[dict]:
    """A project whose tasks come from the bucket through an S3 (or GCS) import storage,
    synced; returns its tasks (as ``/api/tasks`` lists them), the project id in each."""
    ls = cloud["ls"]
    project = ls.create_project(BRUSH, title=title)
    body = {
        "project": project,
        "title": f"{title} bucket",
        "bucket": BUCKET if kind == "s3" else GCS_BUCKET,
        "prefix": "img",
        "regex_filter": r".*\.png",
        "use_blob_urls": True,
        "presign": presign,
        "presign_ttl": presign_ttl,
    }
    if kind == "s3":
        body.update(cloud["s3"].storage_params())
    else:
        body["google_project_id"] = "assist-test"
    storage = ls.api("POST", f"/api/storages/{kind}", json=body).json()
    ls.api("POST", f"/api/storages/{kind}/{storage['id']}/sync")
    tasks = wait_until(
        lambda: len(t := ls.tasks(project)) == len(cloud["images"]) and t,
        60,
        f"the storage sync of project {project}",
    )
    for t in tasks:
        t["project"] = project
    return tasks


def image_key(task: dict) -> str:
    """The bucket key of a task's image, from the storage endpoint URL that Label Studio's
    API lists for it (``/tasks/<id>/resolve/?fileuri=<base64 of s3://bucket/key>``)."""
    data = task["data"]
    value = data.get("image") or data.get("$undefined$")
    assert isinstance(value, str), data
    if "fileuri=" in value:
        raw = parse_qs(urlsplit(value).query)["fileuri"][0]
        value = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    for prefix in (f"s3://{BUCKET}/", f"gs://{GCS_BUCKET}/"):
        if value.startswith(prefix):
            return value[len(prefix) :]
    raise AssertionError(value)


def our_predictions(ls, task_id: int) -> list[dict]:
    return [
        p
        for p in ls.predictions(task_id)
        if str(p.get("model_version", "")).startswith("sam2unet-")
    ]


def assert_masks_fit(cloud, tasks: list[dict], version: str) -> None:
    """Each task holds one prediction of ``version`` whose brush mask has its image's size."""
    ls = cloud["ls"]
    for t in tasks:
        preds = wait_until(
            lambda tid=t["id"]: [
                p for p in our_predictions(ls, tid) if p["model_version"] == version
            ],
            120,
            f"a prediction of task {t['id']}",
        )
        assert len(preds) == 1, preds
        h, w = cloud["images"][image_key(t)].shape[:2]
        (item,) = preds[0]["result"]
        assert (item["original_height"], item["original_width"]) == (h, w)
        masks = results_to_masks(preds[0]["result"], TARGET, h, w)
        assert masks["Circle"].shape == (h, w) and masks["Circle"].any()


def backend_json(cloud, method: str, path: str, **kw) -> dict:
    r = requests.request(method, cloud["url"] + path, auth=AUTH, timeout=120, **kw)
    assert r.status_code < 300, r.text
    return r.json()


def predict_direct(cloud, task: dict) -> dict:
    """POST /predict with one task as Label Studio sends it (its raw data: the bucket URI)."""
    ls = cloud["ls"]
    raw = {**task, "data": {"image": f"s3://{BUCKET}/{image_key(task)}"}}
    body = {"tasks": [raw], "project": f"{task['project']}.1", "label_config": BRUSH}
    assert ls  # the task ids are Label Studio's
    (result,) = backend_json(cloud, "POST", "/predict", json=body)["results"]
    return result


@pytest.mark.parametrize("presign", [True, False], ids=["presigned", "proxied"])
def test_retrieve_predictions_reads_bucket_images(cloud, presign):
    ls = cloud["ls"]
    tasks = s3_project(cloud, f"retrieve {presign}", presign)
    ls.add_ml_backend(tasks[0]["project"], cloud["url"], basic_auth=AUTH)
    version = backend_json(cloud, "GET", "/versions")["current"]
    ls.retrieve_predictions(tasks[0]["project"])
    assert_masks_fit(cloud, tasks, version)
    # Label Studio sent the bucket URIs themselves, and the worker read every one
    log = cloud["worker"].log()
    assert "no prediction" not in log, log[-3000:]


@pytest.mark.parametrize("presign", [True, False], ids=["presigned", "proxied"])
def test_preannotate_reads_bucket_images(cloud, presign):
    tasks = s3_project(cloud, f"preannotate {presign}", presign)
    project = tasks[0]["project"]
    run = backend_json(cloud, "POST", "/preannotate", json={"project": project})["id"]
    st = wait_until(
        lambda: (
            (s := backend_json(cloud, "GET", f"/preannotate/{run}"))["status"] != "running" and s
        ),
        300,
        "the pre-annotation run",
        interval=1.0,
    )
    assert st["status"] == "completed" and st["done"] == len(tasks) and st["failed"] == 0, st
    assert_masks_fit(cloud, tasks, backend_json(cloud, "GET", "/versions")["current"])


@pytest.mark.parametrize("presign", [True, False], ids=["presigned", "proxied"])
def test_training_round_dataset_holds_the_true_pixels(cloud, presign, tmp_path):
    """The trainer's dataset sync reads the annotated tasks' images from the bucket (its
    presigned host admitted by SAM2UNET_ALLOW_HOSTS here) and a round trains on them."""
    from trainer.service import TrainerService

    ls = cloud["ls"]
    tasks = s3_project(cloud, f"train {presign}", presign)
    project = tasks[0]["project"]
    for t in tasks[:5]:
        img = cloud["images"][image_key(t)]
        h, w = img.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[h // 4 : h // 2, w // 4 : w // 2] = True
        item = brush_result(mask, TARGET, "Circle", 1.0)
        item.pop("score", None)
        ls.annotate(t["id"], [item])
    shutil.copytree(cloud["root"] / "models", tmp_path / "models")
    settings = round_settings(
        tmp_path / "models",
        data_dir=tmp_path / "dataset",
        label_studio_url=ls.url,
        label_studio_api_key=ls.pat,
        allow_hosts=(f"127.0.0.1:{cloud['s3'].port}",),
    )
    conn = redis.Redis.from_url(f"redis://127.0.0.1:{cloud['redis_server'].port}/14")
    conn.flushdb()
    client = LabelStudioClient(ls.url, ls.pat)
    fetcher = ImageFetcher(client, FetchPolicy.from_settings(settings))
    service = TrainerService(settings, conn, client, fetcher.fetch)
    report = service.round(project, "cloud storage test")
    assert report.status in ("promoted", "rejected"), report.to_json()
    samples = service.cache.samples(project)
    assert len(samples) == 5
    for sample, img, masks in samples:
        task = next(t for t in tasks if t["id"] == sample.task)
        truth = cloud["images"][image_key(task)]
        assert np.array_equal(img, truth)
        assert masks.shape == (1, *truth.shape[:2]) and masks.any()


def test_gcs_storage_through_the_emulator(cloud):
    """A GCS import storage (gcp-storage-emulator, proxied: see GCSServer): "Retrieve
    predictions" sends gs:// URIs, and the API's resolve URLs (what preannotate and the trainer
    read) give the same true pixels."""
    ls = cloud["ls"]
    tasks = s3_project(cloud, "gcs proxied", False, kind="gcs")
    ls.add_ml_backend(tasks[0]["project"], cloud["url"], basic_auth=AUTH)
    version = backend_json(cloud, "GET", "/versions")["current"]
    ls.retrieve_predictions(tasks[0]["project"])
    assert_masks_fit(cloud, tasks, version)
    fetcher = ImageFetcher(LabelStudioClient(ls.url, ls.pat), FetchPolicy())
    for t in tasks[:3]:
        truth = cloud["images"][image_key(t)]
        for url in (f"gs://{GCS_BUCKET}/{image_key(t)}", t["data"]["image"]):
            assert np.array_equal(decode_image(fetcher.fetch(url, None, t["id"])), truth)


def test_interactive_call_on_a_bucket_image(cloud):
    """An interactive call (a keypoint prompt, as Label Studio sends it) on a task whose image
    is a bucket URI: answered from the bucket's image, at its size."""
    captured = json.loads((FIXTURES / "post_predict_interactive.json").read_text())["json"]
    task = s3_project(cloud, "interactive", True)[0]
    h, w = cloud["images"][image_key(task)].shape[:2]
    context = copy.deepcopy(captured["params"]["context"])
    for item in context["result"]:
        item.update(original_width=w, original_height=h)
    body = {
        "tasks": [{"id": task["id"], "data": {"image": f"s3://{BUCKET}/{image_key(task)}"}}],
        "project": f"{task['project']}.1",
        "label_config": captured["label_config"],
        "params": {"context": context},
    }
    (res,) = backend_json(cloud, "POST", "/predict", json=body)["results"]
    assert not res["model_version"].endswith("/failed"), res
    for item in res["result"]:
        assert (item["original_height"], item["original_width"]) == (h, w)
    cloud["worker"].wait_log(f"task {task['id']}: prompts:", timeout=30)


def test_result_cache_keys_on_content_across_presigned_urls(cloud):
    """The same task predicted twice: two presigned URLs (Label Studio signs afresh), one
    computation."""
    tasks = s3_project(cloud, "cache", True)
    ours = [r for r in cloud["s3"].requests if r.headers.get("User-Agent") == "sam2unet-assist"]
    cached = cloud["worker"].log().count("1 items (1 cached")
    first = predict_direct(cloud, tasks[0])
    second = predict_direct(cloud, tasks[0])
    assert first["result"] and second["result"], (first, second)
    after = [r for r in cloud["s3"].requests if r.headers.get("User-Agent") == "sam2unet-assist"]
    fetched = after[len(ours) :]
    assert len(fetched) == 2  # each call read the image, through a presigned URL of its own
    assert cloud["worker"].log().count("1 items (1 cached") > cached
    assert first["model_version"] == second["model_version"]
    for a, b in zip(first["result"], second["result"], strict=True):
        assert a["value"] == b["value"]


def test_cloud_errors_are_named_per_task(cloud):
    """An object deleted after the sync, an expired presign, and gs:// or azure-blob:// URIs
    that no storage of the project can read: each task fails alone, with its reason in the
    failed placeholder and in the worker's log, never a traceback."""
    ls = cloud["ls"]
    s3 = cloud["s3"]
    presigned = s3_project(cloud, "errors presigned", True)
    proxied = s3_project(cloud, "errors proxied", False)
    expired = s3_project(cloud, "errors expired", True, presign_ttl=0)
    # anonymous credentials (the emulator's) cannot sign: Label Studio answers 404
    unsigned = s3_project(cloud, "errors gcs presigned", True, kind="gcs")
    gone = image_key(presigned[0])
    s3.client().delete_object(Bucket=BUCKET, Key=gone)
    try:
        cases = [
            (
                next(t for t in presigned if image_key(t) == gone),
                None,
                f"storage host 127.0.0.1:{s3.port} answered HTTP 403",
            ),
            (next(t for t in proxied if image_key(t) == gone), None, "could not read it from"),
            (expired[1], None, "presigned URL Label Studio issued has expired"),
            (presigned[2], f"gs://{BUCKET}/{image_key(presigned[2])}", "no cloud storage"),
            (presigned[3], f"azure-blob://{BUCKET}/x.png", "no cloud storage"),
            (
                unsigned[0],
                f"gs://{GCS_BUCKET}/{image_key(unsigned[0])}",
                "could not presign it",
            ),
        ]
        for task, uri, reason in cases:
            raw = {**task, "data": {"image": uri or f"s3://{BUCKET}/{image_key(task)}"}}
            body = {"tasks": [raw], "project": f"{task['project']}.1", "label_config": BRUSH}
            (res,) = backend_json(cloud, "POST", "/predict", json=body)["results"]
            assert res["model_version"].endswith("/failed"), res
            assert reason in res["error"], res
            assert "Traceback" not in res["error"]
        log = cloud["worker"].log()
        for task, _, reason in cases:
            assert f"task {task['id']}: no prediction:" in log
            assert reason in log
        assert "Traceback" not in log
    finally:
        s3.client().put_object(
            Bucket=BUCKET, Key=gone, Body=png_bytes(cloud["images"][gone]), ContentType="image/png"
        )
    assert ls


def test_presigned_target_on_a_private_address_needs_an_allowance(cloud):
    """Without SAM2UNET_ALLOW_HOSTS or SAM2UNET_ALLOW_PRIVATE_STORAGE the presigned URL on the
    loopback storage host is refused, naming both settings; the proxied storage needs neither;
    the same presigned URL placed in a task by hand is refused even with the storage allowance."""
    ls = cloud["ls"]
    presigned = s3_project(cloud, "rule presigned", True)
    proxied = s3_project(cloud, "rule proxied", False)
    client = LabelStudioClient(ls.url, ls.pat)
    uri = f"s3://{BUCKET}/{image_key(presigned[0])}"
    plain = ImageFetcher(client, FetchPolicy())
    with pytest.raises(ImageFetchError, match="SAM2UNET_ALLOW_PRIVATE_STORAGE") as e:
        plain.fetch(uri, None, presigned[0]["id"])
    assert "loopback" in str(e.value) and "X-Amz-Signature=..." in str(e.value)
    assert not re.search(r"Signature=[0-9a-fA-F%]{8}", str(e.value))  # redacted
    truth = cloud["images"][image_key(proxied[0])]
    data = plain.fetch(f"s3://{BUCKET}/{image_key(proxied[0])}", None, proxied[0]["id"])
    assert np.array_equal(decode_image(data), truth)
    allowed = ImageFetcher(client, FetchPolicy(allow_private_storage=True))
    data = allowed.fetch(uri, None, presigned[0]["id"])
    assert np.array_equal(decode_image(data), cloud["images"][image_key(presigned[0])])
    # the presigned URL Label Studio hands out, put into a task's data: not issued for this fetch
    r = ls.session.get(
        ls.url + presigned[0]["data"]["image"].removeprefix(ls.url),
        headers=ls._headers(),
        allow_redirects=False,
        timeout=10,
    )
    assert r.status_code == 303, r.status_code
    with pytest.raises(ImageFetchError, match="loopback address"):
        allowed.fetch(r.headers["Location"], None, presigned[0]["id"])


def test_api_key_never_reaches_the_storage_host(cloud):
    """Runs last: every request that reached the S3 server during the module. Label Studio signs
    its own (AWS signatures); ours carry no Authorization and no cookie (Label Studio's session
    cookie would otherwise follow: cookies ignore ports), and the API key, its access tokens
    and Label Studio's auth schemes appear nowhere."""
    ls = cloud["ls"]
    ours = [r for r in cloud["s3"].requests if r.headers.get("User-Agent") == "sam2unet-assist"]
    assert len(ours) >= 16  # presigned reads of the retrieve, pre-annotate and train tests
    for r in ours:
        assert "Authorization" not in r.headers and "Cookie" not in r.headers, r
        assert r.method == "GET" and ("Signature" in r.query or "X-Amz-Signature" in r.query)
    for r in cloud["s3"].requests:
        text = repr((r.path, r.query, r.headers))
        assert ls.pat not in text
        auth = r.headers.get("Authorization", "")
        assert not auth.startswith(("Bearer", "Token")), r
        assert "eyJ" not in text  # no JWT (access tokens are JWTs) of any kind
