"""The tab's "Automatic tags" box in a real headless Chromium, against the real daemon running the tagger double.

The daemon's kohya workspace is laid out like sd-scripts with the tagger double at finetune/ (tests/tagger_double),
and its environment lets the kohya python (here the test python) import the onnx/onnxruntime stand-ins. The model
is not cached at first: the double "downloads" it (TAGGER_DOUBLE_DOWNLOAD=1) on the first run, slowly enough
(TAGGER_DOUBLE_SLOW_S per picture) that the progress can be seen and cancelled.
"""

from __future__ import annotations

import base64
import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image

from tests import test_ui_plugin_browser as base
from tests.helpers import KOHYA_DOUBLE
from tests.tagger_double.layout import onnx_pythonpath, sd_scripts_with_double
from tests.test_ui_plugin_browser import (
    Env,
    artifacts_dir,
    daemon_json,
    drop_images,
    installed_ed,
    open_tab,
)

# the shared browser-test fixtures (chromium, a page per test, the shared test daemon + ED)
browser, page, env = base.browser, base.page, base.env

pytestmark = pytest.mark.browser

SLOW_S = "0.4"
RED, DARK_RED, PINK, BLUE = (200, 30, 30), (150, 20, 20), (250, 200, 200), (30, 30, 200)


def coloured(colours: list[tuple[int, int, int]], prefix: str = "hero") -> list[dict[str, str]]:
    files = []
    for i, colour in enumerate(colours):
        buf = io.BytesIO()
        Image.new("RGB", (160, 192), colour).save(buf, format="PNG")
        files.append({"name": f"{prefix}-{i:02d}.png", "b64": base64.b64encode(buf.getvalue()).decode()})
    return files


@pytest.fixture(scope="module")
def tag_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("ui-tagger")
    kohya = {"python": sys.executable, "script_path": str(KOHYA_DOUBLE), "workspace": str(sd_scripts_with_double(tmp))}
    extra_env = {"PYTHONPATH": onnx_pythonpath(), "TAGGER_DOUBLE_DOWNLOAD": "1", "TAGGER_DOUBLE_SLOW_S": SLOW_S}
    with installed_ed(tmp, {"allow_cpu": True, "kohya": kohya}, extra_env=extra_env) as env:
        yield env


def wait_captions(page: Any, expected: list[str]) -> None:
    page.wait_for_function(
        """(want) => JSON.stringify(Array.from(
            document.querySelectorAll('[data-clora=tagger-caption] > span:last-child')
        ).map((s) => s.textContent)) === JSON.stringify(want)""", arg=expected, timeout=10000)


def taggers_running(root: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "tag_images_by_wd14_tagger.py" in cmd and str(root) in cmd:
            found.append(proc.pid)
    return found


def test_automatic_tags_from_the_tab(tag_env: Env, page: Any) -> None:
    open_tab(page, tag_env.ed_url)
    start = page.locator("[data-clora=tagger-start]")
    page.wait_for_function(
        "document.querySelector('[data-clora=tagger-reason]')?.textContent === 'Add pictures first.'")
    assert start.is_disabled()
    drop_images(page, coloured([RED, DARK_RED, PINK, BLUE]))
    page.wait_for_function("document.querySelector('[data-clora=tagger-start]')?.disabled === false")
    # the model is not cached yet: the tab says the first use downloads it
    assert "downloads the tagger model" in page.inner_text("[data-clora=tagger-note]")

    start.click()
    page.wait_for_selector("[data-clora=tagger-progress][data-phase=tagging]", timeout=30000)
    page.wait_for_function(
        "/^Tagging: [1-3] \\/ 4 pictures$/"
        ".test(document.querySelector('[data-clora=tagger-progress] span')?.textContent)", timeout=30000)
    page.screenshot(path=str(artifacts_dir() / "tagger-progress.png"))

    page.wait_for_selector("[data-clora=tagger-picker]:not([hidden])", timeout=30000)
    assert page.locator("[data-clora=tagger-progress]").count() == 0
    tags = page.locator("[data-clora=tagger-tag]")
    shown = {tags.nth(i).get_attribute("data-tag"): tags.nth(i).text_content() for i in range(tags.count())}
    assert shown == {"1girl": "1girl×4", "solo": "solo×4", "simple background": "simple background×4",
                     "red hair": "red hair×3", "closed mouth": "closed mouth×3", "smile": "smile×1",
                     "blue hair": "blue hair×1"}
    # the suggested drops (on more than half of the pictures, not generic) start unticked, and the rule is said
    unticked = sorted(page.eval_on_selector_all("[data-clora=tagger-tag] input:not(:checked)",
                                                "(els) => els.map((e) => e.dataset.tag)"))
    assert unticked == ["closed mouth", "red hair"]
    assert "more than half of the pictures" in page.inner_text("[data-clora=tagger-rule]")
    expected = ["1girl, solo, simple background", "1girl, solo, simple background",
                "1girl, solo, simple background, smile", "1girl, solo, blue hair, simple background"]
    wait_captions(page, expected)
    page.screenshot(path=str(artifacts_dir() / "tagger-picker.png"))

    # untick a tag, tick a suggested one: every caption follows, in the tagger's order
    page.locator("[data-clora=tagger-tag][data-tag=solo] input").uncheck()
    page.locator("[data-clora=tagger-tag][data-tag='red hair'] input").check()
    expected = ["1girl, red hair, simple background", "1girl, red hair, simple background",
                "1girl, red hair, simple background, smile", "1girl, blue hair, simple background"]
    wait_captions(page, expected)
    # the picture records hold the same (what the captions editor and the upload read)
    images = page.evaluate("window.CharacterLoRA.state.images.map((i) => ({caption: i.caption, tags: i.tags}))")
    assert [i["caption"] for i in images] == expected
    assert images[0]["tags"] == ["1girl", "solo", "red hair", "simple background", "closed mouth"]

    # words the user typed stay, first; the tags follow the picker
    page.evaluate("window.CharacterLoRA.state.images[0].caption = 'wearing a red scarf, ' + "
                  "window.CharacterLoRA.state.images[0].caption")
    page.locator("[data-clora=tagger-tag][data-tag='red hair'] input").uncheck()
    wait_captions(page, ["wearing a red scarf, 1girl, simple background", "1girl, simple background",
                         "1girl, simple background, smile", "1girl, blue hair, simple background"])

    # the model is cached now: no download note any more; the run was read and freed on the daemon
    page.wait_for_function("document.querySelector('[data-clora=tagger-note]')?.textContent === ''")
    assert daemon_json(tag_env, "GET", "/tagger")["model_cached"] is True


def test_cancel_tagging_from_the_tab(tag_env: Env, page: Any) -> None:
    open_tab(page, tag_env.ed_url)
    drop_images(page, coloured([RED] * 12, prefix="many"))
    page.wait_for_function("document.querySelector('[data-clora=tagger-start]')?.disabled === false")
    page.locator("[data-clora=tagger-start]").click()
    page.wait_for_selector("[data-clora=tagger-progress][data-phase=tagging]", timeout=30000)
    assert taggers_running(tag_env.daemon_config.parent.parent)
    page.locator("[data-clora=tagger-cancel]").click()
    page.wait_for_selector("[data-clora=tagger-notice]")
    assert page.inner_text("[data-clora=tagger-notice]") == "Tagging cancelled."
    assert page.locator("[data-clora=tagger-progress]").count() == 0
    assert page.locator("[data-clora=tagger-picker]").is_hidden()
    end = time.monotonic() + 15
    while taggers_running(tag_env.daemon_config.parent.parent):
        assert time.monotonic() < end, "the tagger still runs after the cancel"
        time.sleep(0.1)
    page.wait_for_function("document.querySelector('[data-clora=tagger-start]')?.disabled === false")


def test_the_button_says_why_the_tagger_cannot_run(env: Env, page: Any) -> None:
    """The shared test daemon's kohya workspace has no finetune/ folder: the reason and its fix are shown."""
    open_tab(page, env.ed_url)
    drop_images(page, coloured([RED, BLUE]))
    page.wait_for_function(
        "document.querySelector('[data-clora=tagger-reason]')?.textContent.startsWith('Tagger script missing: ')")
    reason = page.inner_text("[data-clora=tagger-reason]")
    assert "tag_images_by_wd14_tagger.py does not exist" in reason and "kohya.workspace" in reason
    assert page.locator("[data-clora=tagger-start]").is_disabled()
    page.screenshot(path=str(artifacts_dir() / "tagger-unavailable.png"))
