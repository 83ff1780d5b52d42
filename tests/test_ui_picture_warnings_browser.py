"""Warnings about the pictures in the tab (real Chromium, real daemon): per card, for the set, never blocking."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image

from tests.picture_scenes import blurred, jpeg, person, scene
from tests.test_ui_plugin_browser import (  # noqa: F401
    Env,
    artifacts_dir,
    browser,
    drop_images,
    env,
    open_tab,
    page,
)

CARD_CODES = """() => Array.from(document.querySelectorAll('[data-clora=thumb]')).map((card) =>
    Array.from(card.querySelectorAll('[data-clora=picture-warning]')).map((b) => b.dataset.code))"""


def payload(name: str, data: bytes) -> dict[str, str]:
    return {"name": name, "b64": base64.b64encode(data).decode()}


def pictures() -> list[dict[str, str]]:
    """Eight 4:3 photos of one person: five fine, one small, one blurry, one a re-saved copy of the first."""
    me = person(7)
    photos = [scene(me, k, (640, 480)) for k in range(7)]
    copy = Image.open(io.BytesIO(jpeg(photos[0]))).resize((600, 450))
    return [payload(f"mira-{k}.jpg", jpeg(photos[k])) for k in range(5)] + [
        payload("mira-small.jpg", jpeg(photos[5].resize((300, 225)))),
        payload("mira-blurry.jpg", jpeg(blurred(photos[6], 3.0))),
        payload("mira-copy.jpg", jpeg(copy, 60)),
    ]


def card_codes(page: Any) -> list[list[str]]:  # noqa: F811
    return page.evaluate(CARD_CODES)


def fill_form(page: Any) -> None:  # noqa: F811
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.fill("#clora-name", "Warned Mira")
    page.fill("#clora-trigger", "wmira")


def test_warnings_show_on_their_cards_and_start_still_works(env: Env, page: Any) -> None:  # noqa: F811
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    open_tab(page, env.ed_url)
    fill_form(page)
    drop_images(page, pictures())
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 8")
    page.wait_for_function("document.querySelectorAll('[data-clora=picture-warning]').length >= 4", timeout=30000)
    assert card_codes(page) == [["duplicate"], [], [], [], [], ["small"], ["blurry"], ["duplicate"]]
    small = page.locator("[data-clora=thumb]").nth(5).locator("[data-clora=picture-warning]")
    assert "'mira-small.jpg' is only 300×225 pixels" in small.get_attribute("title")
    assert "at least 512×512" in small.get_attribute("title")
    dup = page.locator("[data-clora=thumb]").nth(0).locator("[data-clora=picture-warning]")
    assert "'mira-copy.jpg'" in dup.get_attribute("title") and "Keep the best one" in dup.get_attribute("title")
    # the set's note above the pictures, and the count of cards with warnings
    assert page.locator("[data-clora=picture-set] + [data-clora=thumbs]").count() == 1
    same = page.locator("[data-clora=set-warning][data-code=same_shape]")
    assert "All 8 pictures have the same shape (4:3)" in same.inner_text()
    note = page.inner_text("[data-clora=picture-warnings-note]")
    assert note.startswith("4 of 8 pictures have warnings") and "Start works with them" in note
    # a click says it in a toast too (touch screens have no tooltips)
    toasts = len(page.evaluate("window.__edFake.calls.filter((c) => c.fn === 'showToast')"))
    small.click()
    shown = page.evaluate("window.__edFake.calls.filter((c) => c.fn === 'showToast')")
    assert len(shown) == toasts + 1 and "300×225" in str(shown[-1])
    page.screenshot(path=str(artifacts_dir() / "picture-warnings.png"), full_page=True)

    # removing the copy checks again: the first picture is no longer a duplicate
    page.locator("[data-clora=thumb]").nth(7).locator("[data-clora=remove-image]").click()
    page.wait_for_function(f"JSON.stringify(({CARD_CODES})()) === JSON.stringify([[], [], [], [], [], ['small'], "
                           "['blurry']])", timeout=30000)

    # warnings never block: Start is enabled and the job starts with the pictures as they are
    drop_images(page, [pictures()[7]])
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false", timeout=30000)
    page.click("[data-clora=start]")
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 0", timeout=60000)
    page.wait_for_selector("[data-clora=job-row]", timeout=30000)
    page.wait_for_function("document.querySelector('[data-clora=picture-set]').hidden", timeout=10000)
    assert errors == []


def test_an_answer_for_an_older_list_is_ignored(env: Env, page: Any) -> None:  # noqa: F811
    held: list[Any] = []
    asked: list[str] = []

    def hold_first(route: Any) -> None:
        asked.append(route.request.url)
        if not held:
            held.append(route)  # answered by the test, once the list has changed
        else:
            route.continue_()

    page.route("**/pictures/check*", hold_first)
    open_tab(page, env.ed_url)
    fill_form(page)
    # any badge the stale answer would draw, even for a moment
    page.evaluate("""() => { window.__staleSeen = false; new MutationObserver(() => {
        if (document.querySelector('[data-clora=picture-warning][data-code=blurry]')) window.__staleSeen = true
    }).observe(document.body, { subtree: true, childList: true }) }""")
    photos = pictures()
    drop_images(page, photos[:3])
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 3")
    page.wait_for_timeout(900)  # past the debounce: the first check is asked and held
    assert len(held) == 1
    drop_images(page, [photos[5]])  # the small one: a newer list, whose check waits for the running one
    page.wait_for_timeout(900)
    assert len(asked) == 1  # one request at a time: a check holds one of the daemon's upload slots
    stale = {"pictures": [{"index": i, "name": "x", "width": 1, "height": 1, "warnings": [
        {"code": "blurry", "message": "stale", "hint": "stale", "others": []}]} for i in range(3)], "set": []}
    held[0].fulfill(status=200, content_type="application/json", body=json.dumps(stale),
                    headers={"Access-Control-Allow-Origin": "*"})
    page.wait_for_function(f"JSON.stringify(({CARD_CODES})()) === JSON.stringify([[], [], [], ['small']])",
                           timeout=30000)
    assert len(asked) == 2
    assert page.evaluate("window.__staleSeen") is False


def test_a_daemon_without_the_check_shows_nothing(env: Env, page: Any) -> None:  # noqa: F811
    asked: list[str] = []
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def old_daemon(route: Any) -> None:
        asked.append(route.request.url)
        route.fulfill(status=404, content_type="text/plain", body="404: Not Found",
                      headers={"Access-Control-Allow-Origin": "*"})

    page.route("**/pictures/check*", old_daemon)
    open_tab(page, env.ed_url)
    fill_form(page)
    photos = pictures()
    drop_images(page, photos[:8])
    page.wait_for_function("window.CharacterLoRA.state.pictureChecks.unsupported === true", timeout=10000)
    assert len(asked) == 1 and "resolution=512" in asked[0]
    assert card_codes(page) == [[]] * 8
    assert page.locator("[data-clora=picture-set]").is_hidden()
    page.locator("[data-clora=remove-image]").first.click()  # not asked again
    page.wait_for_timeout(900)
    assert len(asked) == 1
    assert errors == []


def test_a_new_training_resolution_checks_again(env: Env, page: Any) -> None:  # noqa: F811
    asked: list[str] = []
    page.on("request", lambda req: asked.append(req.url) if "/pictures/check" in req.url else None)
    open_tab(page, env.ed_url)
    fill_form(page)
    drop_images(page, pictures()[:3])  # 640×480: enough at 512, not at 768
    page.wait_for_function("window.CharacterLoRA.state.images.every((i) => Array.isArray(i.warnings))",
                           timeout=30000)
    assert card_codes(page) == [[], [], []]
    page.locator("[data-clora=advanced] summary").click()
    page.fill("#clora-p-resolution", "768")
    page.wait_for_function(f"JSON.stringify(({CARD_CODES})()) === JSON.stringify([['small'], ['small'], ['small']])",
                           timeout=30000)
    assert [u.split("?")[1] for u in asked] == ["resolution=512", "resolution=768"]
    assert "fewer than the 768×768" in page.locator("[data-clora=picture-warning]").first.get_attribute("title")
