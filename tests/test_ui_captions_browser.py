"""Captions in the tab (issue 10 §3), in a real headless Chromium against the real daemon and the kohya double:
each picture's card shows the fixed "<trigger> <class>," prefix (locked, following the trigger and class fields) and
an editor for the rest; edits survive pictures being added and removed; Start sends them and the job's caption files
hold what was typed, the trigger first. The set-up and helpers are those of tests/test_ui_plugin_browser.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.test_ui_plugin_browser import (
    Env,
    artifacts_dir,
    daemon_json,
    drop_images,
    image_payload,
    open_tab,
    wait_job_done,
)
from tests.test_ui_plugin_browser import browser as browser  # fixtures: pytest finds them by name
from tests.test_ui_plugin_browser import env as env
from tests.test_ui_plugin_browser import page as page

CARDS = "document.querySelectorAll('[data-clora=thumb]').length"


def shots() -> Path:
    folder = artifacts_dir() / "captions"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prefixes(page: Any) -> list[str]:
    return page.locator("[data-clora=caption-prefix]").all_inner_texts()


def caption_inputs(page: Any) -> Any:
    return page.locator("[data-clora=caption-input]")


def typed(page: Any) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('[data-clora=caption-input]')).map((i) => i.value)")


def job_captions(env: Env, job_id: str) -> list[str]:
    data = Path(yaml.safe_load(env.daemon_config.read_text(encoding="utf-8"))["data_dir"])
    folder = data / "jobs" / job_id / "dataset" / "img"
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]


def test_captions_are_edited_under_each_picture_and_the_job_writes_them_trigger_first(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.fill("#clora-name", "Captioned Hero")
    page.locator("[data-clora=advanced] summary").click()
    for key, value in (("epochs", "1"), ("repeats", "1"), ("batch_size", "3"), ("resolution", "256"),
                       ("sample_every_n_epochs", "0")):
        page.fill(f"#clora-p-{key}", value)
    page.locator("[data-clora=advanced] summary").click()
    drop_images(page, image_payload(8, start=40))
    page.wait_for_function(f"{CARDS} === 8")
    # the prefix follows the trigger and class fields as they are typed (the class word defaults to person)
    assert set(prefixes(page)) == {"‹trigger› person,"}
    page.locator("#clora-trigger").press_sequentially("c4pt")
    assert set(prefixes(page)) == {"c4pt person,"}
    page.fill("#clora-class", "woman")
    assert set(prefixes(page)) == {"c4pt woman,"}
    # the prefix is not editable: no field, nothing focusable, typing at it changes nothing
    chip = page.locator("[data-clora=caption-prefix]").first
    assert chip.evaluate("(n) => !n.isContentEditable && !n.querySelector('input, textarea') && n.tabIndex < 0")
    chip.click()
    page.keyboard.type("xyz")
    assert set(prefixes(page)) == {"c4pt woman,"} and typed(page) == [""] * 8

    inputs = caption_inputs(page)
    inputs.nth(0).fill("smiling, red scarf")
    inputs.nth(2).click()
    page.keyboard.type("on a beach")
    page.keyboard.press("Enter")  # one line only: Enter adds nothing
    page.keyboard.type(", C4PT")
    note = page.locator("[data-clora=caption-note]").nth(2)
    assert note.inner_text() == "“c4pt” is already first; it is left out here."
    # while a caption is typed, more pictures arrive and every card is rebuilt: the typing goes on in the same box
    inputs.nth(5).click()
    page.keyboard.type("looking ")
    drop_images(page, image_payload(2, start=60))
    page.wait_for_function(f"{CARDS} === 10")
    page.wait_for_function("window.CharacterLoRA.state.images.every((i) => i.checked)")
    page.keyboard.type("back")
    assert typed(page) == ["smiling, red scarf", "", "on a beach, C4PT", "", "", "looking back", "", "", "", ""]
    inputs.nth(9).fill("close-up")
    # removing a picture keeps every other picture's caption with its picture
    page.locator("[data-clora=remove-image]").nth(1).click()
    page.wait_for_function(f"{CARDS} === 9")
    want = ["smiling, red scarf", "on a beach, C4PT", "", "", "looking back", "", "", "", "close-up"]
    assert typed(page) == want
    assert page.evaluate("window.CharacterLoRA.state.images.map((i) => i.caption)") == want
    page.screenshot(path=str(shots() / "captions-form.png"), full_page=True)

    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false", timeout=30000)
    page.click("[data-clora=start]")
    wait_job_done(page, "Captioned Hero")
    job_id = page.evaluate("window.CharacterLoRA.selectedJob().id")
    job = daemon_json(env, "GET", f"/jobs/{job_id}/status")
    assert (job["trigger"], job["class_token"], job["image_count"]) == ("c4pt", "woman", 9)
    assert job_captions(env, job_id) == [
        "c4pt woman, smiling, red scarf\n", "c4pt woman, on a beach\n", "c4pt woman\n", "c4pt woman\n",
        "c4pt woman, looking back\n", "c4pt woman\n", "c4pt woman\n", "c4pt woman\n", "c4pt woman, close-up\n"]
    # the form is empty again for the next character
    page.wait_for_function(f"{CARDS} === 0")


def test_twenty_five_captioned_cards_fit_the_form(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.fill("#clora-trigger", "f1t")
    drop_images(page, image_payload(25, start=70))
    page.wait_for_function(f"{CARDS} === 25")
    caption_inputs(page).nth(24).fill("a long caption, " * 6)
    for width in (1280, 1920, 800):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        got = page.evaluate("""() => {
            const form = document.querySelector('[data-clora=form]').getBoundingClientRect()
            const thumbs = document.querySelector('[data-clora=thumbs]')
            const box = thumbs.getBoundingClientRect()
            const cards = Array.from(thumbs.querySelectorAll('[data-clora=thumb]')).map((c) => {
                const r = c.getBoundingClientRect()
                const pic = c.querySelector('.clora-thumb-pic').getBoundingClientRect()
                const input = c.querySelector('[data-clora=caption-input]').getBoundingClientRect()
                const remove = c.querySelector('[data-clora=remove-image]').getBoundingClientRect()
                return { left: r.left, right: r.right, pic: [pic.width, pic.height], input: input.width,
                         inputInside: input.left >= r.left && input.right <= r.right + 0.5,
                         removeOnPic: remove.left >= pic.left && remove.right <= pic.right + 0.5 }
            })
            return { form: [form.left, form.right], box: [box.left, box.right], height: box.height,
                     scroll: thumbs.scrollHeight > thumbs.clientHeight,
                     noSideScroll: thumbs.scrollWidth <= thumbs.clientWidth,
                     cards }
        }""")
        assert got["form"][0] <= got["box"][0] and got["box"][1] <= got["form"][1], (width, got)
        assert got["noSideScroll"] and got["height"] <= 562, (width, got["height"])
        assert got["scroll"], f"25 cards should scroll inside the form at {width}px"
        for card in got["cards"]:
            assert card["pic"] == [64, 64] and card["input"] >= 120 and card["inputInside"], (width, card)
            assert card["removeOnPic"], (width, card)
        page.screenshot(path=str(shots() / f"cards-25-{width}.png"), full_page=False)
