"""The Label Studio client against a real Label Studio 1.23.2 (started once for the module)."""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from contracts.errors import ImageFetchError, LabelStudioError
from labelstudio.client import LabelStudioClient, jwt_claims
from labelstudio.fetch import FetchPolicy, ImageFetcher
from tests.support.lstudio import (
    ADMIN_EMAIL,
    LabelStudio,
    ensure_template,
    running_label_studio,
)
from tests.support.sockets import LoopbackServer, QuietHandler

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="tag" toName="image"><Label value="obj"/></PolygonLabels>
</View>"""


def png_bytes(seed: int, h: int = 32, w: int = 48) -> bytes:
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def polygon(label: str = "obj") -> dict:
    return {
        "from_name": "tag",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": 48,
        "original_height": 32,
        "image_rotation": 0,
        "value": {
            "points": [[10.0, 10.0], [60.0, 10.0], [60.0, 70.0]],
            "closed": True,
            "polygonlabels": [label],
        },
    }


def forge(token: str) -> str:
    """The same JWT with a broken signature."""
    head, payload, sig = token.split(".")
    return f"{head}.{payload}.{'A' * len(sig)}"


@pytest.fixture(scope="module")
def ls(tmp_path_factory) -> Iterator[LabelStudio]:
    with running_label_studio(tmp_path_factory.mktemp("label-studio")) as server:
        yield server


@pytest.fixture(scope="module")
def project(ls: LabelStudio) -> tuple[int, list[int], list[bytes]]:
    """A project with 7 uploaded images: (project id, task ids, image bytes)."""
    images = [png_bytes(i) for i in range(7)]
    pid = ls.create_project(LABEL_CONFIG)
    ids = ls.import_images(pid, [(f"im{i}.png", data) for i, data in enumerate(images)])
    return pid, ids, images


@pytest.fixture
def legacy_on(ls: LabelStudio) -> Iterator[None]:
    ls.enable_legacy_tokens()
    yield
    ls.disable_legacy_tokens()


@pytest.mark.e2e
def test_harness_starts_label_studio_as_1_23_creates_it(ls: LabelStudio) -> None:
    assert ls.token_settings() == {"api_tokens_enabled": True, "legacy_api_tokens_enabled": False}
    assert jwt_claims(ls.pat)["token_type"] == "refresh"
    assert ls.proc.poll() is None and ls.start_seconds > 0


@pytest.mark.e2e
def test_each_fresh_label_studio_makes_its_own_personal_token(ls: LabelStudio, tmp_path) -> None:
    """A PAT is checked against the clock of the Label Studio that reads it (``iat`` with no
    leeway), so the shared template carries none: each copy makes its own."""
    template = json.loads((ensure_template() / "harness-tokens.json").read_text())
    assert template["legacy_token"] and not template["pat"]
    with running_label_studio(tmp_path / "second") as second:
        assert second.pat and second.pat != ls.pat
        assert second.legacy_token == ls.legacy_token  # both copies of the one template
        assert second.token_settings()["legacy_api_tokens_enabled"] is False
        # minted by this instance, and refreshed by it
        assert jwt_claims(second.pat)["jti"] != jwt_claims(ls.pat)["jti"]
        assert second.api("GET", "/api/current-user/whoami").json()["email"] == ADMIN_EMAIL


@pytest.mark.e2e
def test_harness_registers_an_ml_backend(ls: LabelStudio) -> None:
    calls: list[tuple[str, str, str | None]] = []

    class Backend(QuietHandler):
        def answer(self, obj: dict) -> None:
            self.send_body(json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:
            calls.append(("GET", self.path, self.headers.get("Authorization")))
            self.answer({"status": "UP"})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            calls.append(("POST", self.path, self.headers.get("Authorization")))
            self.answer({"model_version": "stub-1"})

    with LoopbackServer(Backend) as server:
        pid = ls.create_project(LABEL_CONFIG, title="ml backend")
        backend = ls.add_ml_backend(pid, server.url, basic_auth=("user", "pw"))
        assert backend["url"] == server.url and backend["model_version"] == "stub-1"
        basic = "Basic " + base64.b64encode(b"user:pw").decode()
        assert ("GET", "/health", basic) in calls and ("POST", "/setup", basic) in calls


@pytest.mark.e2e
def test_legacy_token_refused_while_legacy_tokens_are_off(ls: LabelStudio, project) -> None:
    client = LabelStudioClient(ls.url, ls.legacy_token)
    assert client.auth_kind == "legacy"
    with pytest.raises(LabelStudioError, match=r"HTTP 401.*legacy tokens are off") as e:
        client.get_project(project[0])
    assert ls.legacy_token not in e.value.message


@pytest.mark.e2e
def test_legacy_token_works_while_legacy_tokens_are_on(ls: LabelStudio, project, legacy_on) -> None:
    pid, ids, images = project
    client = LabelStudioClient(ls.url, ls.legacy_token)
    assert client.get_project(pid)["label_config"].strip().startswith("<View>")
    task = client.get_task(ids[0])
    assert ImageFetcher(client, FetchPolicy()).fetch(task["data"]["image"]) == images[0]
    ls.disable_legacy_tokens()
    with pytest.raises(LabelStudioError, match="401"):
        client.get_task(ids[0])


@pytest.mark.e2e
def test_pat_is_exchanged_and_refreshed(ls: LabelStudio, project) -> None:
    pid, ids, _ = project
    client = LabelStudioClient(ls.url, ls.pat)
    assert client.auth_kind == "pat"
    assert client.get_project(pid)["id"] == pid
    assert client.refreshes == 1
    first = client._access
    assert jwt_claims(first)["token_type"] == "access"
    assert client._access_exp - time.time() == pytest.approx(300, abs=15)
    client.get_task(ids[0])
    assert client.refreshes == 1  # still valid: no refresh

    # an access token about to expire (within the 30 s margin) is refreshed before use
    client._access_exp = time.time() + 10
    client.get_task(ids[0])
    assert client.refreshes == 2 and client._access != first

    # a token Label Studio refuses (401) is refreshed once and the call retried
    forged = forge(client._access)
    client._access = forged
    client._access_exp = time.time() + 3600
    assert client.get_task(ids[0])["id"] == ids[0]
    assert client.refreshes == 3 and client._access != forged


@pytest.mark.e2e
def test_pat_401_after_refresh_is_a_clear_error(ls: LabelStudio) -> None:
    # a well-formed refresh token that Label Studio did not sign
    client = LabelStudioClient(ls.url, forge(ls.pat))
    with pytest.raises(LabelStudioError, match="refused the personal access token"):
        client.get_project(1)


@pytest.mark.e2e
def test_download_uploaded_image_with_both_token_kinds(ls: LabelStudio, project) -> None:
    _, ids, images = project
    pat_client = LabelStudioClient(ls.url, ls.pat)
    url = pat_client.get_task(ids[1])["data"]["image"]
    assert url.startswith("/data/upload/")
    assert pat_client.absolute_url(url) == ls.url + url

    # Label Studio's loopback origin is allowed without any allow-list
    fetcher = ImageFetcher(pat_client, FetchPolicy())
    assert fetcher.fetch(url) == images[1]
    assert fetcher.fetch(ls.url + url) == images[1]
    rgb = fetcher.fetch_image(url)
    assert rgb.shape == (32, 48, 3)
    assert np.array_equal(rgb, np.asarray(Image.open(io.BytesIO(images[1])).convert("RGB")))
    # an expired access token is refreshed by the fetcher too
    pat_client._access = forge(pat_client._access)
    assert fetcher.fetch(url) == images[1]

    legacy_client = LabelStudioClient(ls.url, ls.legacy_token)
    legacy_fetcher = ImageFetcher(legacy_client, FetchPolicy())
    with pytest.raises(LabelStudioError, match="401"):
        legacy_fetcher.fetch(url)
    ls.enable_legacy_tokens()
    try:
        assert legacy_fetcher.fetch(url) == images[1]
    finally:
        ls.disable_legacy_tokens()

    with pytest.raises(ImageFetchError, match="exceeds 100 bytes"):
        ImageFetcher(pat_client, FetchPolicy(max_bytes=100)).fetch(url)


@pytest.mark.e2e
def test_local_files_through_label_studio_or_from_disk(ls: LabelStudio, project) -> None:
    pid = project[0]
    served, unserved = ls.local_files_root / "served", ls.local_files_root / "unserved"
    served.mkdir(exist_ok=True)
    unserved.mkdir(exist_ok=True)
    (served / "a.png").write_bytes(png_bytes(10))
    (unserved / "b.png").write_bytes(png_bytes(11))
    ls.add_local_storage(pid, served)
    client = LabelStudioClient(ls.url, ls.pat)
    through_ls = ImageFetcher(client, FetchPolicy())
    assert through_ls.fetch("/data/local-files/?d=served/a.png") == png_bytes(10)
    # Label Studio serves local files only inside a connected storage
    with pytest.raises(ImageFetchError, match="answered HTTP 404"):
        through_ls.fetch("/data/local-files/?d=unserved/b.png")
    # a worker beside Label Studio reads them from disk
    fetcher = ImageFetcher(client, FetchPolicy(local_roots=(str(ls.local_files_root),)))
    assert fetcher.fetch("/data/local-files/?d=unserved/b.png") == png_bytes(11)
    assert fetcher.fetch(ls.url + "/data/local-files/?d=served/a.png") == png_bytes(10)


@pytest.mark.e2e
def test_iter_tasks_pages(ls: LabelStudio, project) -> None:
    pid, ids, _ = project
    client = LabelStudioClient(ls.url, ls.pat)
    for page_size in (1, 2, 3, 7, 100):
        tasks = list(client.iter_tasks(pid, page_size=page_size))
        assert [t["id"] for t in tasks] == ids, page_size
    tasks = list(client.iter_tasks(pid, page_size=3, fields="all"))
    assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks)
    assert all("predictions" in t and "annotations" in t for t in tasks)
    empty = ls.create_project(LABEL_CONFIG, title="empty")
    assert list(client.iter_tasks(empty)) == []
    with pytest.raises(LabelStudioError, match="404"):
        list(client.iter_tasks(99999))


@pytest.mark.e2e
def test_predictions_roundtrip(ls: LabelStudio, project) -> None:
    _, ids, _ = project
    client = LabelStudioClient(ls.url, ls.pat)
    created = client.create_prediction(ids[2], [polygon()], 0.75, "v7")
    assert created["task"] == ids[2] and created["model_version"] == "v7"
    listed = client.list_predictions(ids[2])
    assert [p["id"] for p in listed] == [created["id"]]
    assert listed[0]["score"] == pytest.approx(0.75)
    assert listed[0]["result"][0]["value"]["polygonlabels"] == ["obj"]
    assert ls.predictions(ids[2])[0]["id"] == created["id"]  # seen by the harness too
    client.create_prediction(ids[2], [], None, "v8")
    assert {p["model_version"] for p in client.list_predictions(ids[2])} == {"v7", "v8"}
    assert client.list_predictions(ids[3]) == []
    with pytest.raises(LabelStudioError, match="HTTP 400"):
        client.create_prediction(999999, [], 0.5, "v7")


@pytest.mark.e2e
def test_annotations_and_export(ls: LabelStudio, project) -> None:
    pid, ids, _ = project
    client = LabelStudioClient(ls.url, ls.pat)
    assert client.list_annotations(ids[4]) == []
    ann = ls.annotate(ids[4], [polygon()])
    listed = client.list_annotations(ids[4])
    assert [a["id"] for a in listed] == [ann["id"]]
    assert listed[0]["result"][0]["type"] == "polygonlabels"
    exported = client.export_project(pid)
    by_id = {t["id"]: t for t in exported}
    assert ids[4] in by_id
    assert [a["id"] for a in by_id[ids[4]]["annotations"]] == [ann["id"]]
    assert ids[5] not in by_id  # unannotated tasks are left out


@pytest.mark.e2e
def test_missing_things_are_label_studio_errors(ls: LabelStudio) -> None:
    client = LabelStudioClient(ls.url, ls.pat)
    with pytest.raises(LabelStudioError, match="HTTP 404 to GET /api/tasks/999999"):
        client.get_task(999999)
    with pytest.raises(LabelStudioError, match="HTTP 404 to PATCH /api/projects/999999"):
        client.set_project_model_version(999999, "sam2unet-tiny-v2")
    # Label Studio 1.23.2 answers 500 for an upload that does not exist: the task's image
    # cannot be fetched, an error of that task
    missing = r"/data/upload/1/nothing-here\.png answered HTTP (404|500)"
    with pytest.raises(ImageFetchError, match=missing):
        ImageFetcher(client, FetchPolicy()).fetch("/data/upload/1/nothing-here.png")


@pytest.mark.e2e
def test_project_model_version(ls: LabelStudio) -> None:
    client = LabelStudioClient(ls.url, ls.pat)
    pid = ls.create_project(LABEL_CONFIG, title="model version")
    (tid,) = ls.import_images(pid, [("one.png", png_bytes(1))])
    # Label Studio 1.23 accepts only a version the project has predictions of
    with pytest.raises(LabelStudioError, match="HTTP 400 to PATCH"):
        client.set_project_model_version(pid, "sam2unet-tiny-v7")
    client.create_prediction(tid, [polygon()], 0.5, "sam2unet-tiny-v7")
    client.set_project_model_version(pid, "sam2unet-tiny-v7")
    assert ls.api("GET", f"/api/projects/{pid}").json()["model_version"] == "sam2unet-tiny-v7"


@pytest.mark.e2e
def test_no_secret_in_logs(ls: LabelStudio, project, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = LabelStudioClient(ls.url, ls.pat)
    client.get_project(project[0])
    client._access = forge(client._access)
    client.get_task(project[1][0])
    with pytest.raises(LabelStudioError):
        LabelStudioClient(ls.url, ls.legacy_token).get_project(project[0])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "401" in text  # something was logged
    for secret in (ls.pat, ls.legacy_token, client._access, ls.pat.split(".")[2]):
        assert secret not in text
        assert secret not in repr(client)
