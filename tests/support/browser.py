"""A real browser for the tests: Chromium from the distribution's packages, driven by Playwright
for Python (its own browser download is neither needed nor reachable), on Label Studio's real
labelling UI.

``chromium()`` is the browser's path, or None with the reason it is missing (the tests then skip
with that reason; ``scripts/setup.sh`` installs it as root). The helpers below drive the UI as an
annotator does, by what is on the screen: the login form, the "Auto-Annotation" switch in the
bottom bar, the "Auto-Detect" pop-out of smart tools (hotkey M), the label chips, clicks on the
image, the suggestion's ✓ and Submit. ``Shots`` saves screenshots when ``SAM2UNET_SCREENSHOTS``
names a folder (docs/day0 for the docs' pictures).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
VIEWPORT = {"width": 1400, "height": 900}
#: How long the pop-out of smart tools takes to open under the pointer (its tooltip delay).
POPOUT_DELAY = 1.2


def chromium() -> tuple[str | None, str]:
    """(path of a Chromium binary, "") or (None, why there is none)."""
    wanted = os.environ.get("SAM2UNET_CHROMIUM")
    for path in ([wanted] if wanted else []) + list(CHROMIUM_CANDIDATES):
        if path and os.access(path, os.X_OK):
            return path, ""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found, ""
    return None, (
        "no Chromium: run scripts/setup.sh as root (apt-get install -y chromium) "
        "or set SAM2UNET_CHROMIUM"
    )


def playwright_missing() -> str:
    """Why Playwright cannot be imported ("" when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[dev]'"
    return ""


class Shots:
    """Numbered screenshots into ``SAM2UNET_SCREENSHOTS`` (nothing when it is unset)."""

    def __init__(self, page: Any, prefix: str = "") -> None:
        folder = os.environ.get("SAM2UNET_SCREENSHOTS", "")
        self.folder = Path(folder) if folder else None
        self.page = page
        self.prefix = prefix
        self.saved: list[Path] = []
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> None:
        if self.folder is None:
            return
        # JPEG: the docs' pictures are a tenth of a PNG's size and read the same
        path = self.folder / f"{self.prefix}{name}.jpg"
        self.page.screenshot(path=str(path), type="jpeg", quality=80)
        self.saved.append(path)


def sign_up(browser: Any, ls_url: str, email: str, password: str) -> None:
    """Create an annotator account with Label Studio's sign-up form (in a context of its own)."""
    ctx = browser.new_context(viewport=VIEWPORT)
    try:
        page = ctx.new_page()
        page.goto(f"{ls_url}/user/signup/")
        page.fill("#email", email)
        page.fill("#password", password)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/signup" not in url, timeout=60_000)
    finally:
        ctx.close()


def log_in(page: Any, ls_url: str, email: str, password: str) -> None:
    page.goto(f"{ls_url}/user/login/")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)


def open_task(page: Any, ls_url: str, project: int, task: int) -> None:
    """The labelling view of one task (data manager with the task open)."""
    page.goto(f"{ls_url}/projects/{project}/data?task={task}")
    page.get_by_text("Auto-Annotation", exact=True).wait_for(timeout=90_000)
    page.locator("canvas").first.wait_for(timeout=60_000)
    page.wait_for_timeout(500)  # the image's first paint


def set_switch(page: Any, label: str, on: bool) -> None:
    """Turn a bottom-bar switch ("Auto-Annotation", "Auto-Accept Suggestions") on or off."""
    switch = page.locator("label", has_text=label).first
    if switch_on(page, label) == on:
        return
    switch.get_by_text(label, exact=True).click()
    page.wait_for_timeout(300)
    assert switch_on(page, label) == on, f"the {label!r} switch did not turn {on}"


def switch_on(page: Any, label: str) -> bool:
    """Whether a bottom-bar switch is on (its toggle is drawn checked)."""
    switch = page.locator("label", has_text=label).first
    return switch.locator("[class*=toggle_checked]").count() > 0


def pick_smart_tool(page: Any, tool: str) -> None:
    """Open the "Auto-Detect" pop-out (point at the smart tool button at the bottom of the tool
    column) and click one of its tools: ``key-point-tool`` or ``rectangle-tool``."""
    page.locator("button.lsf-tool_smart:not([aria-label])").hover()
    button = page.locator(f".lsf-toolbar__smart button[aria-label={tool}]")
    button.wait_for(state="visible", timeout=10_000)
    page.wait_for_timeout(200)
    button.click()


def pick_label(page: Any, text: str) -> None:
    page.locator(".lsf-label", has_text=text).first.click()


@dataclass
class ImageBox:
    """Where the task's image is on the screen."""

    x: float
    y: float
    width: float
    height: float

    def at(self, fx: float, fy: float) -> tuple[float, float]:
        """The screen point at fractions (fx, fy) of the image."""
        return self.x + fx * self.width, self.y + fy * self.height


def image_box(page: Any) -> ImageBox:
    """The image's place on the screen: the largest canvas (the image layer; the region
    layers' canvases sit inside it, with a margin)."""
    boxes = [c.bounding_box() for c in page.locator("canvas").all()]
    b = max((b for b in boxes if b), key=lambda b: b["width"] * b["height"])
    return ImageBox(b["x"], b["y"], b["width"], b["height"])


@dataclass
class Interactive:
    """The interactive calls the page made (``/api/ml/<id>/interactive-annotating``): each
    request's prompts, its answer, and the milliseconds from the click to the answer."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    _clicked: float = 0.0

    def attach(self, page: Any) -> None:
        page.on("response", self._on_response)

    def clicked(self) -> None:
        self._clicked = time.monotonic()

    def _on_response(self, response: Any) -> None:
        if "interactive-annotating" not in response.url:
            return
        try:
            body = response.json()
        except Exception:  # an error page: recorded as such
            body = {"errors": [response.status]}
        try:
            sent = response.request.post_data_json or {}
        except Exception:
            sent = {}
        self.calls.append(
            {
                "context": (sent.get("context") or {}).get("result") or [],
                "answer": body,
                "status": response.status,
                "ms": (time.monotonic() - self._clicked) * 1000 if self._clicked else None,
            }
        )

    def wait(self, page: Any, n: int, timeout: float = 60.0) -> dict[str, Any]:
        """The ``n``-th call (1-based) with prompts, once answered. (Playwright's events
        arrive while it waits, so this waits with the page, never with ``time.sleep``.)"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            prompted = [c for c in self.calls if c["context"]]
            if len(prompted) >= n:
                return prompted[n - 1]
            page.wait_for_timeout(20)
        raise TimeoutError(
            f"no answer to interactive call {n} within {timeout:.0f} s: {self.calls}"
        )
