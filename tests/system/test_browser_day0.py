"""Day 0 as an annotator lives it, in a real browser (Chromium driven by Playwright) on a real
Label Studio 1.23.2 and the real stack (backend, worker, Redis), with an official-format SAM2.1
test checkpoint whose U-Net decoder was never trained:

* a task opens with no prediction tab (the untrained version answers no prediction), and
  Label Studio asked the backend for one;
* Auto-Annotation on (bottom bar), a smart keypoint from the "Auto-Detect" pop-out, a negative
  point (Alt+click, the label picked again first), a smart rectangle, ✓, Submit: the annotation
  Label Studio stored holds the brush mask of the last suggestion, and every suggestion is the
  mask SAM2's own predictor gives for the prompts at the places clicked;
* the same with Auto-Accept on (the suggestion is accepted as it comes);
* after a promotion, opening a task again makes Label Studio ask again, and the new version's
  prediction shows.

Screenshots go to ``SAM2UNET_SCREENSHOTS`` (``docs/day0`` regenerates the docs' pictures):

    SAM2UNET_SCREENSHOTS=docs/day0 ./scripts/test.sh tests/system/test_browser_day0.py -s

Click-to-suggestion latencies (ms, as the page saw them) are printed.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import requests

from labelstudio.codecs import rle_to_mask
from modelstore.registry import ModelRegistry
from sam2unet.random_weights import write_random_sam2_checkpoint
from tests.support.browser import (
    VIEWPORT,
    Interactive,
    Shots,
    chromium,
    image_box,
    log_in,
    open_task,
    pick_label,
    pick_smart_tool,
    playwright_missing,
    set_switch,
    sign_up,
)
from tests.support.lstudio import running_label_studio
from tests.support.sam2_helpers import reference_predictor
from tests.support.services import (
    connected_stack,
    fresh_redis_db,
    png_bytes,
)
from tests.worker.test_pipeline import image, make_runtime, reference

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CHROMIUM, NO_CHROMIUM = chromium()
if NO_CHROMIUM or playwright_missing():
    pytestmark.append(pytest.mark.skip(reason=NO_CHROMIUM or playwright_missing()))

AUTH = ("ls-backend", "b4ckend-pass")
PENDING = re.compile(r"^\d+ suggestions?$")  # the bottom bar's "1 suggestions ✗ ✓"
EMAIL, PASSWORD = "annotator@example.com", "an0tator-pass-1"
H, W = 240, 320
#: The docs' label config (docs/day0.md): each chip says what it is.
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Foreground" background="#FF0000"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Click: Foreground" background="#1E90FF"/>
  </KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true">
    <Label value="Box: Foreground" background="#FFA500"/>
  </RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def day0(tmp_path_factory, redis_server):
    """The stack, a project of three disc images with the backend connected (interactive), and
    a logged-in annotator's page."""
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("day0")
    model_dir = tmp / "models"
    sam2_model = write_random_sam2_checkpoint(model_dir / "base" / "sam2.1_hiera_test.pt", "test")
    version = make_runtime(model_dir, "test").version
    redis_url, conn = fresh_redis_db(redis_server, 14)
    images = [image(H, W, seed=s) for s in (21, 22, 23)]
    with (
        running_label_studio(tmp / "ls") as ls,
        connected_stack(ls, redis_url, model_dir, AUTH, tmp / "logs", "day0", 180) as (
            url,
            backend,
            worker,
        ),
    ):
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            project = ls.create_project(LABEL_CONFIG, title="day0")
            tasks = ls.import_images(
                project, [(f"disc{i}.png", png_bytes(img)) for i, img in enumerate(images)]
            )
            ls.add_ml_backend(project, url, AUTH, "sam2unet-assist", True)
            sign_up(browser, ls.url, EMAIL, PASSWORD)
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(60_000)
            log_in(page, ls.url, EMAIL, PASSWORD)
            ref = reference_predictor(sam2_model, "test")
            yield {
                "ls": ls,
                "page": page,
                "project": project,
                "tasks": tasks,
                "images": images,
                "ref": ref,
                "version": version,
                "model_dir": model_dir,
                "conn": conn,
                "backend": backend,
                "worker": worker,
                "shots": Shots(page),
            }
        finally:
            browser.close()
            pw.stop()
    conn.close()


def _masks(answer: dict) -> list[np.ndarray]:
    """The brush masks of an interactive answer (``{"data": {"result": [...]}}``)."""
    items = answer["data"]["result"]
    return [rle_to_mask(it["value"]["rle"], H, W) for it in items if it["type"] == "brushlabels"]


def _assert_sam2s_masks(day0, call: dict, img: np.ndarray) -> None:
    """The answer's mask is what SAM2's own predictor gives for the call's prompts (one object:
    the keypoints, or the rectangle) on the same weights and image."""
    assert call["status"] == 200 and "errors" not in call["answer"], call["answer"]
    items = call["context"]
    points = [it for it in items if it["type"] == "keypointlabels"]
    boxes = [it for it in items if it["type"] == "rectanglelabels"]
    day0["ref"].set_image(img)
    ((logits, _),) = reference(day0["ref"], [(points, boxes[0] if boxes else None)], H, W)
    (got,) = _masks(call["answer"])
    assert got.any(), "the suggestion holds an empty mask"
    assert np.array_equal(got, logits > 0)
    labels = {tuple(it["value"]["brushlabels"]) for it in call["answer"]["data"]["result"]}
    assert labels == {("Foreground",)}  # "Click: Foreground" prompts the Foreground brush


def _stored_brush(day0, task: int) -> np.ndarray:
    (annotation,) = day0["ls"].api("GET", f"/api/tasks/{task}/annotations").json()
    masks = [
        rle_to_mask(it["value"]["rle"], H, W)
        for it in annotation["result"]
        if it["type"] == "brushlabels" and it["value"]["brushlabels"] == ["Foreground"]
    ]
    assert masks, f"no Foreground brush in the submitted annotation: {annotation['result']}"
    return np.logical_or.reduce(masks)


def _predict_requests(day0) -> int:
    """How many /predict requests for one task of the project the backend answered (its
    log)."""
    return sum(
        f"project {day0['project']}, 1 task(s)" in line
        for line in day0["backend"].log().splitlines()
        if " predict " in line
    )


def test_click_negative_box_accept_submit(day0):
    page, shots, inter = day0["page"], day0["shots"], Interactive()
    task, img = day0["tasks"][0], day0["images"][0]
    inter.attach(page)
    before = _predict_requests(day0)
    open_task(page, day0["ls"].url, day0["project"], task)
    # the untrained version: Label Studio asked, stored nothing, shows no prediction tab
    assert _predict_requests(day0) > before
    assert page.get_by_text(day0["version"][:8]).count() == 0
    assert not day0["ls"].predictions(task)
    shots("01-task-opened")

    set_switch(page, "Auto-Annotation", True)
    page.get_by_text("Auto-Accept Suggestions", exact=True).wait_for()
    shots("02-auto-annotation-on")
    box = image_box(page)

    # a smart keypoint on the disc (its centre is at 55 %, 45 %)
    pick_label(page, "Click: Foreground")
    page.locator("button.lsf-tool_smart:not([aria-label])").hover()
    page.locator(".lsf-toolbar__smart").wait_for(state="visible")
    page.wait_for_timeout(300)
    shots("03-auto-detect-popout")
    pick_smart_tool(page, "key-point-tool")
    inter.clicked()
    page.mouse.click(*box.at(0.55, 0.45))
    first = inter.wait(page, 1)
    page.get_by_text(PENDING).wait_for(timeout=20_000)
    shots("04-smart-keypoint-suggestion")
    (kp,) = first["context"]
    assert kp["type"] == "keypointlabels" and kp["is_positive"] is True
    assert kp["value"]["x"] == pytest.approx(55, abs=1)
    assert kp["value"]["y"] == pytest.approx(45, abs=1)
    _assert_sam2s_masks(day0, first, img)

    # a negative point: the label again, then Alt+click
    pick_label(page, "Click: Foreground")
    page.keyboard.down("Alt")
    inter.clicked()
    page.mouse.click(*box.at(0.2, 0.8))
    page.keyboard.up("Alt")
    second = inter.wait(page, 2)
    assert [p["is_positive"] for p in second["context"]] == [True, False]
    assert second["context"][1]["value"]["x"] == pytest.approx(20, abs=1)
    _assert_sam2s_masks(day0, second, img)
    page.wait_for_timeout(300)
    shots("05-negative-point")

    # a smart rectangle around the disc
    pick_label(page, "Box: Foreground")
    pick_smart_tool(page, "rectangle-tool")
    x0, y0 = box.at(0.35, 0.2)
    x1, y1 = box.at(0.75, 0.72)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    page.mouse.move(x1, y1, steps=4)
    inter.clicked()
    page.mouse.up()
    third = inter.wait(page, 3)
    (rect,) = third["context"]
    assert rect["type"] == "rectanglelabels"
    assert rect["value"]["x"] == pytest.approx(35, abs=1)
    assert rect["value"]["width"] == pytest.approx(40, abs=1)
    _assert_sam2s_masks(day0, third, img)
    page.wait_for_timeout(300)
    shots("06-smart-rectangle")

    page.locator("[data-testid=bottombar-accept-suggestions-button]").click()
    page.wait_for_timeout(300)
    shots("07-accepted")
    page.locator("[data-testid=bottombar-submit-button]").click()
    page.wait_for_timeout(1500)
    shots("08-submitted")
    assert np.array_equal(_stored_brush(day0, task), _masks(third["answer"])[0])
    for name, call in (("click", first), ("negative", second), ("box", third)):
        print(f"click-to-mask {name}: {call['ms']:.0f} ms")


def test_auto_accept(day0):
    page, shots, inter = day0["page"], day0["shots"], Interactive()
    task, img = day0["tasks"][1], day0["images"][1]
    inter.attach(page)
    open_task(page, day0["ls"].url, day0["project"], task)
    set_switch(page, "Auto-Annotation", True)
    set_switch(page, "Auto-Accept Suggestions", True)
    box = image_box(page)
    pick_label(page, "Click: Foreground")
    pick_smart_tool(page, "key-point-tool")
    inter.clicked()
    page.mouse.click(*box.at(0.55, 0.45))
    call = inter.wait(page, 1)
    _assert_sam2s_masks(day0, call, img)
    page.wait_for_timeout(800)
    assert page.get_by_text(PENDING).count() == 0  # accepted as it came
    shots("09-auto-accept")
    page.locator("[data-testid=bottombar-submit-button]").click()
    page.wait_for_timeout(1500)
    assert np.array_equal(_stored_brush(day0, task), _masks(call["answer"])[0])
    print(f"click-to-mask auto-accept: {call['ms']:.0f} ms")


def test_after_a_promotion_label_studio_asks_again(day0):
    """A version whose automatic head is trained becomes current: the task that showed nothing
    is asked for again when opened, and its prediction shows."""
    page, shots = day0["page"], day0["shots"]
    task = day0["tasks"][2]
    open_task(page, day0["ls"].url, day0["project"], task)
    assert not day0["ls"].predictions(task)
    registry = ModelRegistry(day0["model_dir"], day0["conn"])
    first = registry.get(day0["version"])
    loaded = registry.load(first.name)
    info = registry.create_version(
        loaded.model, loaded.config, loaded.base, parent=first.name, source="browser test"
    )
    registry.promote(info.name, reason="browser test")
    before = _predict_requests(day0)
    page.goto("about:blank")
    open_task(page, day0["ls"].url, day0["project"], task)
    assert _predict_requests(day0) > before
    predictions = day0["ls"].predictions(task)
    assert [p["model_version"] for p in predictions] == [info.name]
    page.wait_for_timeout(500)
    shots("10-after-promotion")
    health = requests.get(f"http://127.0.0.1:{_port(day0)}/health", auth=AUTH, timeout=10).json()
    assert health["model_version"] == info.name and health["automatic_head_trained"] is True


def _port(day0) -> str:
    (ml,) = day0["ls"].api("GET", "/api/ml", params={"project": day0["project"]}).json()
    return ml["url"].rsplit(":", 1)[1]
