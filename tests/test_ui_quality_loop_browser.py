"""Issue 10 §1-2 in a real headless Chromium against the real daemon (kohya double): the loss chart (live, and
again after a reload), the saved epochs with their previews, loss and size, publishing one into ED's LoRA list and
using it. Set-up and helpers: tests/test_ui_plugin_browser.py."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.test_ui_plugin_browser import (
    CHROMIUM,
    Env,
    artifacts_dir,
    calls,
    daemon_json,
    open_tab,
    start_short_job,
    wait_job_done,
)
from tests.test_ui_plugin_browser import browser as browser  # fixtures: pytest finds them by name
from tests.test_ui_plugin_browser import env as env
from tests.test_ui_plugin_browser import page as page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]

CHART = "document.querySelector('[data-clora=loss-canvas]')"


def chart(pg: Any) -> dict[str, Any]:
    return pg.evaluate(
        f"(() => {{ const c = {CHART}; if (!c) return null;"
        " const box = c.getBoundingClientRect();"
        " const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let inked = 0; for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked++;"
        " return {points: +(c.dataset.points || 0), marks: +(c.dataset.marks || 0), last: +(c.dataset.lastStep || 0),"
        " width: box.width, height: box.height, inked, visible: !c.closest('[hidden]')} })()")


def test_loss_chart_and_publishing_an_epoch(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    # 8 steps an epoch, 6 epochs; the preset saves every 2nd epoch, a preview every epoch
    start_short_job(page, "Quality Loop", "qlp",
                    {"epochs": "6", "repeats": "1", "batch_size": "1", "resolution": "256",
                     "sample_every_n_epochs": "1"}, start=0)
    page.wait_for_function("(() => { const j = window.CharacterLoRA.selectedJob();"
                           " return j && j.name === 'Quality Loop' && j.state === 'training' })()", timeout=60000)
    job = page.evaluate("window.CharacterLoRA.selectedJob()")
    assert job["params"]["save_every_n_epochs"] == 2, job["params"]
    # live: the chart grows from `loss` frames while the job trains, with a mark at the end of each epoch
    page.wait_for_function(f"(() => {{ const c = {CHART}; return c && +c.dataset.points >= 12"
                           " && +c.dataset.marks >= 1 })()", timeout=60000)
    live = chart(page)
    assert live["visible"] and live["width"] > 200 and live["height"] > 100 and live["inked"] > 500, live
    assert "steps" in page.inner_text("[data-clora=loss-note]")

    # epoch 2's file is listed (with its preview and loss) and can be published while the job still runs
    card = page.locator("[data-clora=epoch-card][data-epoch='2']")
    card.wait_for(timeout=60000)
    # ED's model list is slow to refresh this time: the card must not say "published" (nor offer "Use it") before
    # ED lists the LoRA and has its trigger word
    page.evaluate("""() => {
        const edGetModels = window.getModels
        window.__modelsGate = new Promise((open) => { window.__openModels = open })
        window.getModels = async (...args) => { await window.__modelsGate; return edGetModels(...args) }
    }""")
    card.locator("[data-clora=epoch-publish]").click()
    lora_id = "Quality_Loop-e02"
    deadline = time.monotonic() + 30
    while not (env.lora_dir / f"{lora_id}.safetensors").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (env.lora_dir / f"{lora_id}.safetensors").is_file()
    time.sleep(0.5)  # frames and renders that follow the daemon's answer
    assert card.locator("[data-clora=epoch-published]").count() == 0
    assert card.locator("[data-clora=epoch-publish]").inner_text().strip() == "Publishing…"
    page.evaluate("window.__openModels()")
    card.locator("[data-clora=epoch-published]").wait_for(timeout=30000)
    assert lora_id in card.inner_text()
    assert (env.lora_dir / f"{lora_id}.safetensors").is_file()
    # ED's list was refreshed and has it; the trigger word went into ED's Bucket for it
    assert page.evaluate("(id) => !!modelsDB.lora[id]", lora_id)
    stores = calls(page, "Bucket.store")
    assert any(c["args"][0] == f"modelinfo/lora/{lora_id}" and c["args"][1]["keywords"] == ["qlp"] for c in stores)
    toasts = [c["args"][0] for c in calls(page, "showToast")]
    assert any("Epoch 2" in t and lora_id in t for t in toasts), toasts
    assert card.locator("[data-clora=epoch-loss]").inner_text().startswith("loss 0.")
    assert "B" in card.locator("[data-clora=epoch-size]").inner_text()
    page.locator("[data-clora=epochs]").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir() / "quality-loop-training.png"), full_page=True)

    # "Use it" selects that epoch's LoRA in ED and puts the trigger word into the prompt
    card.locator("[data-clora=epoch-use]").click()
    value = page.evaluate("loraModelField.value")
    assert lora_id in value["modelNames"]
    assert page.input_value("#prompt").startswith("qlp")

    page.locator("#tab-character-lora").click()
    wait_job_done(page, "Quality Loop")
    total = page.evaluate("window.CharacterLoRA.selectedJob().progress.total")
    assert total == 48
    page.wait_for_function(f"(n) => +{CHART}?.dataset.points === n", arg=total, timeout=30000)
    # every saved epoch: 2, 4 and the final 6, each with its previews; the disk they use
    page.wait_for_function("document.querySelectorAll('[data-clora=epoch-card]').length === 3", timeout=30000)
    assert page.locator("[data-clora=epoch-card]").evaluate_all("cs => cs.map(c => c.dataset.epoch)") == ["2", "4", "6"]
    listed = daemon_json(env, "GET", f"/jobs/{job['id']}/checkpoints")
    assert "on disk" in page.inner_text("[data-clora=epochs-bytes]")
    assert listed["bytes"] > 0 and [c["epoch"] for c in listed["checkpoints"]] == [2, 4, 6]
    page.wait_for_function(
        "Array.from(document.querySelectorAll('[data-clora=epoch-card]')).every((c) =>"
        " c.querySelector('[data-clora=epoch-sample-img]')?.src.startsWith('blob:'))", timeout=30000)
    assert page.locator("[data-clora=epoch-card][data-epoch='2'] [data-clora=epoch-published]").count() == 1
    assert page.locator("[data-clora=epoch-card][data-epoch='4'] [data-clora=epoch-publish]").count() == 1
    # the final epoch is the job's own LoRA
    final = page.locator("[data-clora=epoch-card][data-epoch='6']")
    assert "Quality_Loop" in final.locator("[data-clora=epoch-published]").inner_text()

    # a reload: the chart comes back from the daemon's history, with its epoch marks, and so do the epochs
    page.reload()
    page.wait_for_function("window.__edFake && window.__edFake.ready")
    page.locator("#tab-character-lora").click()
    page.wait_for_function(f"(n) => +{CHART}?.dataset.points === n && +{CHART}.dataset.marks === 5", arg=total,
                           timeout=30000)
    after = chart(page)
    assert after["last"] == total and after["inked"] > 500, after
    page.wait_for_function("document.querySelectorAll('[data-clora=epoch-card]').length === 3", timeout=30000)
    assert "published as" in page.inner_text("[data-clora=epoch-card][data-epoch='2']")
    page.locator("[data-clora=loss-chart]").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir() / "quality-loop-done.png"), full_page=True)

    # publishing a second epoch after the end; its Use it selects it
    card4 = page.locator("[data-clora=epoch-card][data-epoch='4']")
    card4.locator("[data-clora=epoch-publish]").click()
    card4.locator("[data-clora=epoch-use]").wait_for(timeout=30000)
    assert page.evaluate("(id) => !!modelsDB.lora[id]", "Quality_Loop-e04")
    card4.locator("[data-clora=epoch-use]").click()
    assert "Quality_Loop-e04" in page.evaluate("loraModelField.value")["modelNames"]
