"""The "Train character LoRA" tab in a real headless Chromium, against the real daemon.

Set-up, as a user would have it:
- a temporary ED install (Linux layout) gets the plugin through install_plugin.py itself;
- the real daemon runs as `python -m daemon --config <tmp>` with the kohya test double (slowed down with
  KOHYA_DOUBLE_STEP_SECONDS so progress can be seen);
- tests/ed_fake serves a page with ED's globals (same names, signatures, behaviour: see
  tests/ed_fake/README.md) and ED's endpoints; /character-lora/info is answered by the installed server
  plugin file.

Screenshots go to test-artifacts/ (or $TEST_ARTIFACTS_DIR); the path is printed in the test summary.
Needs Debian's chromium at /usr/bin/chromium; Playwright never downloads a browser here.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import install_plugin
from daemon.config import update_config_file
from daemon.pipeline.clip_tokenizer import TOKENIZER_FOLDER
from tests.ed_fake.server import FakeEd, ServerThread
from tests.helpers import (
    KOHYA_DOUBLE,
    REPO,
    free_port,
    picture_bytes,
    torch_double_path,
    write_sd1_checkpoint,
    write_sdxl_checkpoint,
)
from tests.tokenizer_files import write_tokenizer

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STEP_SECONDS = os.environ.get("UI_TEST_STEP_SECONDS", "0.12")
SAMPLE_SECONDS = os.environ.get("UI_TEST_SAMPLE_SECONDS", "0.8")  # per preview picture, so the state can be seen
# each picture's latents take this long in the double, so the tab's start-up phase can be seen
CACHE_SECONDS = "0.15"

OTHER_PLUGIN = """
var state = "another plugin's state"
let ui = {}
function connect() { return "another plugin" }
const client = null
createTab({ id: "another", icon: "fa-gear", label: "Another plugin", content: "<p>another plugin</p>" })
"""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


def artifacts_dir() -> Path:
    path = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "test-artifacts") / "ui-plugin"
    path.mkdir(parents=True, exist_ok=True)
    return path


class DaemonProcess:
    """`python -m daemon --config <cfg>` as the user would run it; stoppable and restartable."""

    def __init__(self, cfg: Path, url: str, log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.cfg, self.url, self.log = cfg, url, log
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env_vars = {**os.environ, "KOHYA_DOUBLE_STEP_SECONDS": STEP_SECONDS, "PYTHONUNBUFFERED": "1",
                    "KOHYA_DOUBLE_SAMPLE_SECONDS": SAMPLE_SECONDS, "KOHYA_DOUBLE_CACHE_SECONDS": CACHE_SECONDS,
                    **self.extra_env}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "--config", str(self.cfg)], cwd=REPO, env=env_vars, stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_http(self.url + "/health", 30, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@dataclass
class Env:
    ed_root: Path
    daemon_config: Path
    token: str
    daemon: DaemonProcess
    ed_url: str
    fake: FakeEd
    lora_dir: Path


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}: {log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def write_sd2_checkpoint(path: Path) -> Path:
    """Not a model: the key layout of an SD 2.x checkpoint (OpenCLIP text encoder: cond_stage_model.model.*)."""
    save_file({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": np.zeros((2,), dtype=np.float16)},
              str(path))
    return path


def make_ed_root(root: Path, *, listen_port: int) -> Path:
    """An ED install laid out like the Linux zip after a first start."""
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "on_env_start.sh").write_text("#!/bin/bash\n")
    (root / "start.sh").write_text("#!/bin/bash\n")
    (root / "installer_files" / "env" / "bin").mkdir(parents=True)
    for kind in ("stable-diffusion", "lora", "vae"):
        (root / "models" / kind).mkdir(parents=True)
    write_sd1_checkpoint(root / "models" / "stable-diffusion" / "tiny-sd15.safetensors")
    write_sdxl_checkpoint(root / "models" / "stable-diffusion" / "tiny-sdxl.safetensors")
    write_sd2_checkpoint(root / "models" / "stable-diffusion" / "tiny-sd21.safetensors")
    (root / "config.yaml").write_text(yaml.safe_dump({"net": {"listen_port": listen_port}, "update_branch": "main"}))
    (root / "plugins" / "ui").mkdir(parents=True)
    (root / "plugins" / "server").mkdir(parents=True)
    # another user plugin that adds a tab and uses global names our plugin also uses inside its IIFE
    (root / "plugins" / "ui" / "another-tab.plugin.js").write_text(OTHER_PLUGIN)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("ui")
    ed_port = free_port()
    ed_root = make_ed_root(tmp / "easy-diffusion", listen_port=ed_port)
    cfg = tmp / "daemon" / "config.yaml"
    # an offline machine's tokenizer folder (README, "SDXL"): CLIP-L's files; the daemon makes bigG's from them
    tokenizers = tmp / "tokenizers"
    write_tokenizer(tokenizers / TOKENIZER_FOLDER)

    # the user's set-up path: install_plugin.py (ED does not start the daemon here; the test does)
    rc = install_plugin.main(
        ["--ed-root", str(ed_root), "--daemon-python", sys.executable, "--daemon-config", str(cfg), "--no-autostart",
         "--tokenizer-cache", str(tokenizers)]
    )
    assert rc == 0
    daemon_port = free_port()
    workspace = tmp / "workspace"
    workspace.mkdir()
    update_config_file(
        cfg,
        {
            "port": daemon_port,
            "data_dir": str(tmp / "daemon" / "data"),
            "allow_cpu": True,
            "kohya": {"python": sys.executable, "script_path": str(KOHYA_DOUBLE), "workspace": str(workspace)},
        },
    )
    raw = yaml.safe_load(cfg.read_text())
    assert raw["ed_lora_dir"] == str(ed_root / "models" / "lora")
    assert f"http://127.0.0.1:{ed_port}" in raw["allowed_origins"]

    daemon = DaemonProcess(cfg, f"http://127.0.0.1:{daemon_port}", tmp / "daemon.log")
    fake = FakeEd(ed_root, listen_port=ed_port)
    try:
        daemon.start()
        with ServerThread(fake.app(), ed_port) as server:
            yield Env(ed_root, cfg, raw["token"], daemon, server.url, fake, ed_root / "models" / "lora")
    finally:
        daemon.stop()
        # printed past pytest's output capture, so CI logs always show where the screenshots are
        capture = request.config.pluginmanager.getplugin("capturemanager")
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\nUI plugin screenshots: {artifacts_dir()}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if "[Character LoRA]" in msg.text else None)
    yield pg
    context.close()
    assert not errors, f"uncaught errors or plugin warnings on the page: {errors}"


def open_tab(page: Any, url: str, *, built: bool = True) -> None:
    page.goto(url)
    page.wait_for_function("window.__edFake && window.__edFake.ready")
    page.locator("#tab-character-lora").click()
    page.locator("#tab-content-character-lora.active").wait_for()
    if built:
        # the loader's modules fill the tab after createTab made it: wait for our root before reading any part of it
        page.locator("#tab-content-character-lora [data-clora=root]").wait_for()


def image_payload(count: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {"name": f"hero-{i:02d}.png", "b64": base64.b64encode(picture_bytes(i, size=(160, 192))).decode()}
        for i in range(start, start + count)
    ]


def drop_images(page: Any, files: list[dict[str, str]]) -> None:
    """A real drop event carrying File objects, as the browser makes for files dragged from the desktop."""
    data_transfer = page.evaluate_handle(
        """(files) => {
            const dt = new DataTransfer()
            for (const f of files) {
                const bin = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0))
                dt.items.add(new File([bin], f.name, { type: "image/png" }))
            }
            return dt
        }""",
        files,
    )
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event("[data-clora=dropzone]", event, {"dataTransfer": data_transfer})


def wait_state(page: Any, label: str, timeout: float = 30000) -> None:
    page.wait_for_function(
        "(label) => document.querySelector('[data-clora=job-state]')?.textContent === label", arg=label, timeout=timeout
    )


def calls(page: Any, fn: str) -> list[dict[str, Any]]:
    return page.evaluate("(fn) => window.__edFake.calls.filter((c) => c.fn === fn)", fn)


SAMPLE_IMGS_LOADED = """(n) => {
    const imgs = Array.from(document.querySelectorAll('[data-clora=samples] [data-clora=sample-img]'))
    return imgs.length === n && imgs.every((i) => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)
}"""


def sample_labels(page: Any) -> list[str]:
    return page.locator("[data-clora=sample] .clora-sample-label").all_inner_texts()


def test_train_from_the_tab_end_to_end(env: Env, page: Any) -> None:
    sample_requests: list[str] = []
    page.on("request", lambda req: sample_requests.append(req.url) if "/samples/" in req.url else None)
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    assert page.locator("[data-clora=banner]").is_hidden()
    # an empty form says what to type first; an invalid value says what to fix
    assert page.inner_text("[data-clora=start-reason]") == "Type a character name."

    # base model defaults to ED's current model, with its architecture from modelsDB
    assert page.input_value("#clora-base-model") == "tiny-sd15"
    assert page.get_attribute("[data-clora=arch]", "data-arch") == "sd1"
    assert "SD 1.x" in page.inner_text("[data-clora=arch]")

    # an SDXL model is shown as such and can be trained; an SD 2.x one is refused before upload, in the
    # daemon's words (its /fit answer)
    page.select_option("#clora-base-model", "tiny-sdxl")
    assert page.get_attribute("[data-clora=arch]", "data-arch") == "sdxl"
    assert "SDXL" in page.inner_text("[data-clora=arch]")
    assert page.inner_text("[data-error-for=base_model]") == ""
    page.select_option("#clora-base-model", "tiny-sd21")
    why = daemon_json(env, "GET", "/fit?base_model=tiny-sd21")["why"]
    assert "SD 2.x" in why
    page.wait_for_function("(why) => document.querySelector('[data-error-for=base_model]')?.textContent === why",
                           arg=why)
    page.select_option("#clora-base-model", "tiny-sd15")
    assert page.inner_text("[data-error-for=base_model]") == ""

    # the trigger word is validated inline, as the daemon does
    page.fill("#clora-name", "Captain Mira!")
    assert page.inner_text("[data-clora=start-reason]") == "Fix the name first."
    page.fill("#clora-name", "Captain Mira")
    assert page.inner_text("[data-clora=start-reason]") == "Type a trigger word."
    page.fill("#clora-trigger", "mira tok")
    assert "spaces" in page.inner_text("[data-error-for=trigger]")
    assert page.inner_text("[data-clora=start-reason]") == "Fix the trigger word first."
    page.fill("#clora-trigger", "m1ra,x")
    assert "commas" in page.inner_text("[data-error-for=trigger]")
    page.fill("#clora-trigger", "m1ra")
    assert page.inner_text("[data-error-for=trigger]") == ""
    page.fill("#clora-class", "woman")

    # a short run: advanced params (only the changed ones are sent)
    page.locator("[data-clora=advanced] summary").click()
    page.fill("#clora-p-epochs", "2")
    page.fill("#clora-p-repeats", "3")
    page.fill("#clora-p-batch_size", "1")
    page.fill("#clora-p-resolution", "256")
    # unchanged, the preview field shows what the daemon will use: the preset's 2, or 0 on a CPU-only daemon
    cpu = daemon_json(env, "POST", "/config/test")["device"] == "cpu"
    assert page.input_value("#clora-p-sample_every_n_epochs") == ("0" if cpu else "2")
    # a preview picture every epoch; more than the run's epochs is refused inline, as the daemon would
    page.fill("#clora-p-sample_every_n_epochs", "3")
    assert "from 0 (off) to the number of epochs (2)" in page.inner_text("[data-clora=params-error]")
    assert page.get_attribute("#clora-p-sample_every_n_epochs", "aria-invalid") == "true"
    page.fill("#clora-p-sample_every_n_epochs", "1")
    assert page.inner_text("[data-clora=params-error]") == ""
    assert page.get_attribute("#clora-p-sample_every_n_epochs", "aria-invalid") == "false"

    assert page.is_disabled("[data-clora=start]")
    drop_images(page, image_payload(8))
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 8")
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false")
    assert page.inner_text("[data-clora=count]").startswith("8")
    get_models_before = len(calls(page, "getModels"))

    page.click("[data-clora=start]")
    # progress from the WebSocket: state, a moving bar with step/total, epoch, loss, rate, ETA, a log tail
    page.wait_for_function(
        "(() => { const s = document.querySelector('[data-clora=stat-step]');"
        " return s && /^[1-9]\\d* \\/ 48$/.test(s.textContent) })()",
        timeout=60000,
    )
    assert page.inner_text("[data-clora=job-state]") == "Training"
    page.wait_for_function("/\\d/.test(document.querySelector('[data-clora=stat-loss]')?.textContent)", timeout=30000)
    assert page.inner_text("[data-clora=stat-epoch]").endswith("/ 2")
    assert page.inner_text("[data-clora=log]").strip()
    assert page.is_visible("[data-clora=cancel]")
    page.screenshot(path=str(artifacts_dir() / "training.png"), full_page=True)

    # a reload mid-training shows the running job again, not an empty page
    sample_requests.clear()
    page.reload()
    page.wait_for_function("window.__edFake && window.__edFake.ready")
    page.locator("#tab-character-lora").click()
    page.wait_for_function(
        "['Training', 'Saving LoRA', 'Done'].includes(document.querySelector('[data-clora=job-state]')?.textContent)",
        timeout=30000,
    )
    assert page.locator("[data-clora=job-row]").count() >= 1
    get_models_before = len(calls(page, "getModels"))
    # the first preview (epoch 1) shows while the second epoch still trains: from the job JSON if it came
    # before the reload, else from its `sample` event
    page.wait_for_function(
        "document.querySelectorAll('[data-clora=sample]').length >= 1"
        " && document.querySelector('[data-clora=job-state]')?.textContent === 'Training'",
        timeout=30000,
    )
    assert sample_labels(page)[0] == "epoch 1"

    wait_state(page, "Done", timeout=90000)
    page.wait_for_selector("[data-clora=use-it]:not([disabled])", timeout=30000)
    job = page.evaluate("window.CharacterLoRA.selectedJob()")
    lora_id = job["lora_id"]
    assert lora_id and (env.lora_dir / f"{lora_id}.safetensors").is_file()

    # getModels() was awaited so ED's lists have the LoRA; the keywords went into ED's Bucket
    assert len(calls(page, "getModels")) > get_models_before
    assert page.evaluate("(id) => !!modelsDB.lora[id]", lora_id)
    stores = calls(page, "Bucket.store")
    assert any(c["args"][0] == f"modelinfo/lora/{lora_id}" and c["args"][1]["keywords"] == ["m1ra"] for c in stores)
    stored = json.loads(env.fake.bucket[f"modelinfo/lora/{lora_id}.json"])
    assert stored["keywords"] == ["m1ra"]
    toasts = [c["args"][0] for c in calls(page, "showToast")]
    assert any("is ready" in t and "m1ra" in t for t in toasts), toasts
    page.screenshot(path=str(artifacts_dir() / "done.png"), full_page=True)

    # preview pictures: epoch 2's came live (no reload since epoch 1), oldest first, the newest highlighted,
    # each fetched once with the token and shown from a blob: URL although the panel was rebuilt since
    assert job["params"]["sample_every_n_epochs"] == 1
    assert [re.search(r"_e(\d{6})_", s["file"]).group(1) for s in job["samples"]] == ["000001", "000002"]  # type: ignore[union-attr]
    page.wait_for_function(SAMPLE_IMGS_LOADED, arg=2, timeout=30000)
    assert sample_labels(page) == ["epoch 1", "epoch 2"]
    assert "clora-latest" in (page.locator("[data-clora=sample]").last.get_attribute("class") or "")
    assert "clora-latest" not in (page.locator("[data-clora=sample]").first.get_attribute("class") or "")
    assert sorted(sample_requests) == sorted(env_url(env, s["url"]) for s in job["samples"]), sample_requests
    page.locator("[data-clora=samples]").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir() / "samples.png"), full_page=True)
    # a click opens it bigger; Esc closes; so does a click on the overlay
    page.locator("[data-clora=sample]").last.click()
    page.wait_for_function(
        "(() => { const i = document.querySelector('[data-clora=viewer] img');"
        " return i && i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0 })()"
    )
    assert "epoch 2" in page.inner_text("[data-clora=viewer]")
    assert page.evaluate("document.querySelector('[data-clora=viewer] img').getBoundingClientRect().width") > 300
    page.screenshot(path=str(artifacts_dir() / "sample-viewer.png"), full_page=False)
    page.keyboard.press("Escape")
    assert page.locator("[data-clora=viewer]").count() == 0
    page.locator("[data-clora=sample]").first.click()
    assert "epoch 1" in page.inner_text("[data-clora=viewer]")
    page.click("[data-clora=viewer]")
    assert page.locator("[data-clora=viewer]").count() == 0

    # "Use it": the LoRA in loraModelField at a sensible weight, the trigger in the prompt, the main tab
    page.click("[data-clora=use-it]")
    value = page.evaluate("loraModelField.value")
    assert lora_id in value["modelNames"]
    assert float(value["modelWeights"][value["modelNames"].index(lora_id)]) == pytest.approx(0.8)
    assert page.input_value("#prompt").startswith("m1ra, ")
    assert "active" in (page.get_attribute("#tab-main", "class") or "")
    assert page.is_visible("#tab-content-main")
    page.screenshot(path=str(artifacts_dir() / "used.png"), full_page=False)

    # the job list keeps the result after a reload, and the panel its preview pictures (from the job JSON)
    open_tab(page, env.ed_url)
    row = page.locator(f"[data-job-id='{job['id']}']")
    row.wait_for()
    assert "Done" in row.inner_text() and lora_id in row.inner_text()
    page.wait_for_function(SAMPLE_IMGS_LOADED, arg=2, timeout=30000)
    assert sample_labels(page) == ["epoch 1", "epoch 2"]


def daemon_json(env: Env, method: str, path: str) -> Any:
    req = urllib.request.Request(
        env.daemon.url + path, method=method, headers={"Authorization": f"Bearer {env.token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def env_url(env: Env, path: str) -> str:
    """The daemon URL of a daemon path (as the page fetches it)."""
    return env.daemon.url + path


def test_preview_field_shows_what_the_daemon_will_use(env: Env, page: Any) -> None:
    """With a CUDA GPU (faked in /config/test's answer) the presets' preview intervals show, and follow epochs."""

    def gpu_daemon(route: Any) -> None:
        resp = route.fetch()
        data = resp.json()
        data.update(device="cuda", gpu={"name": "NVIDIA Test GPU", "vram_gb": 24.0})
        for check in data["checks"]:
            if check["name"] == "gpu":
                check.update(ok=True, detail="NVIDIA Test GPU, 24 GB VRAM (torch 2.4.0)")
        route.fulfill(response=resp, json=data)

    page.route("**/config/test", gpu_daemon)
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.locator("[data-clora=advanced] summary").click()
    field = "#clora-p-sample_every_n_epochs"
    presets = daemon_json(env, "GET", "/presets")["presets"]
    assert page.input_value(field) == str(presets["balanced"]["sample_every_n_epochs"]) == "2"
    page.select_option("#clora-preset", "quality")
    assert page.input_value(field) == str(presets["quality"]["sample_every_n_epochs"])
    page.select_option("#clora-preset", "fast")
    assert page.input_value(field) == "0"
    page.select_option("#clora-preset", "balanced")
    page.fill("#clora-p-epochs", "1")  # shorter than the interval: the daemon drops it, and so does the field
    assert page.input_value(field) == "0"
    page.fill("#clora-p-epochs", "4")
    assert page.input_value(field) == "2"
    assert page.inner_text("[data-clora=params-error]") == ""
    page.fill(field, "3")
    page.fill("#clora-p-epochs", "2")
    assert "(2)" in page.inner_text("[data-clora=params-error]")
    assert page.get_attribute(field, "aria-invalid") == "true"
    page.click("[data-clora=advanced] .clora-actions button")  # Reset to preset
    assert page.input_value(field) == "2" and page.inner_text("[data-clora=params-error]") == ""


def test_too_few_images_keep_start_disabled(env: Env, page: Any, tmp_path: Path) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.fill("#clora-name", "Few Pics")
    page.fill("#clora-trigger", "fewp")
    # the file picker this time
    paths = []
    for item in image_payload(5, start=20):
        p = tmp_path / item["name"]
        p.write_bytes(base64.b64decode(item["b64"]))
        paths.append(str(p))
    page.set_input_files("[data-clora=file-input]", paths)
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 5")
    assert page.is_disabled("[data-clora=start]")
    assert "Add at least 3 more pictures" in page.inner_text("[data-clora=images-reason]")
    assert "Add at least 3 more" in page.inner_text("[data-clora=start-reason]")
    assert page.inner_text("[data-clora=count]").startswith("5")
    # removing one updates the count and the reason live
    page.locator("[data-clora=remove-image]").first.click()
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 4")
    assert "Add at least 4 more" in page.inner_text("[data-clora=images-reason]")
    page.screenshot(path=str(artifacts_dir() / "too-few-images.png"), full_page=True)


def test_the_step_estimate_counts_kohyas_buckets_and_elongated_pictures_are_marked(env: Env, page: Any,
                                                                                    tmp_path: Path) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.locator("[data-clora=advanced] summary").click()
    page.fill("#clora-p-epochs", "2")
    page.fill("#clora-p-batch_size", "2")
    page.fill("#clora-p-repeats", "25")
    paths = []
    for i, size in enumerate([(160, 192)] * 5 + [(192, 160)] * 3):  # upright and landscape: two buckets
        p = tmp_path / f"shape-{i}.png"
        p.write_bytes(picture_bytes(i, size=size))
        paths.append(str(p))
    page.set_input_files("[data-clora=file-input]", paths)
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 8")
    # kohya never mixes buckets in a batch: 2 × (ceil(5·25/2) + ceil(3·25/2)) = 202, not 2 × ceil(8·25/2) = 200
    page.wait_for_function("document.querySelector('[data-clora=preset-help]')?.textContent.includes('202 steps')")
    strip = tmp_path / "strip.png"
    strip.write_bytes(picture_bytes(9, size=(64, 400)))  # 1:6.25, which the daemon refuses
    page.set_input_files("[data-clora=file-input]", [str(strip)])
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 9")
    page.wait_for_function(
        "document.querySelector('[data-clora=images-reason]')?.textContent.includes('more elongated than 1:6')")
    assert page.is_disabled("[data-clora=start]")


def test_unreachable_daemon_shows_a_banner_with_the_fix(env: Env, page: Any, tmp_path: Path) -> None:
    # a second ED whose plugin settings point at a daemon config whose port nobody listens on
    dead_port = free_port()
    ed_port = free_port()
    ed_root = make_ed_root(tmp_path / "ed2", listen_port=ed_port)
    cfg = tmp_path / "dead" / "config.yaml"
    assert install_plugin.main(
        ["--ed-root", str(ed_root), "--daemon-python", sys.executable, "--daemon-config", str(cfg), "--no-autostart"]
    ) == 0
    update_config_file(cfg, {"port": dead_port})
    with socket.socket() as s:  # nothing listens there
        assert s.connect_ex(("127.0.0.1", dead_port)) != 0
    with ServerThread(FakeEd(ed_root, listen_port=ed_port).app(), ed_port) as server:
        open_tab(page, server.url)
        banner = page.locator("[data-clora=banner]")
        banner.wait_for(state="visible", timeout=20000)
        text = banner.inner_text()
        assert f"not running at http://127.0.0.1:{dead_port}" in text
        assert "Fix:" in text and f"-m daemon --config {cfg}" in text
        assert page.is_visible("[data-clora=retry]")
        assert page.is_visible("[data-clora=start-daemon]")
        assert page.is_disabled("[data-clora=start]")
        assert "not reachable" in page.inner_text("[data-clora=start-reason]")
        page.screenshot(path=str(artifacts_dir() / "daemon-unreachable.png"), full_page=True)
        # Retry re-checks (still down: the banner stays, no page error)
        page.click("[data-clora=retry]")
        banner.wait_for(state="visible")


def test_cancel_from_the_tab(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.fill("#clora-name", "Cancel Me")
    page.fill("#clora-trigger", "cnclme")
    page.locator("[data-clora=advanced] summary").click()
    page.fill("#clora-p-epochs", "20")
    page.fill("#clora-p-resolution", "256")
    drop_images(page, image_payload(8, start=40))
    page.wait_for_function("document.querySelectorAll('[data-clora=thumb]').length === 8")
    # previews every 25 epochs of 20: refused before upload, with the reason on the field and on Start
    page.fill("#clora-p-sample_every_n_epochs", "25")
    assert "(20)" in page.inner_text("[data-clora=params-error]")
    assert page.is_disabled("[data-clora=start]")
    assert "Preview every N epochs must be from 0 (off)" in page.inner_text("[data-clora=start-reason]")
    page.fill("#clora-p-sample_every_n_epochs", "5")
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false")
    page.click("[data-clora=start]")
    wait_state(page, "Training", timeout=60000)
    # none yet (epoch 5 is far off): a muted line says when they come
    page.wait_for_selector("[data-clora=samples-note]")
    assert page.inner_text("[data-clora=samples]") == "Preview pictures appear every 5 epochs."
    assert page.locator("[data-clora=sample]").count() == 0
    page.click("[data-clora=cancel]")
    assert "again" in page.inner_text("[data-clora=cancel]")  # a second click confirms
    page.click("[data-clora=cancel]")
    wait_state(page, "Cancelled")
    assert page.is_hidden("[data-clora=samples]")  # finished without any: nothing to announce
    assert page.is_hidden("[data-clora=use-it]")
    assert "Cancelled" in page.locator("[data-clora=job-row]").first.inner_text()


def test_not_ready_daemon_lists_each_failing_check_with_its_fix(env: Env, page: Any, tmp_path: Path) -> None:
    ed_port = free_port()
    ed_root = make_ed_root(tmp_path / "ed3", listen_port=ed_port)
    cfg = tmp_path / "d3" / "config.yaml"
    assert install_plugin.main(
        ["--ed-root", str(ed_root), "--daemon-python", sys.executable, "--daemon-config", str(cfg), "--no-autostart"]
    ) == 0
    port = free_port()
    update_config_file(cfg, {"port": port, "data_dir": str(tmp_path / "d3" / "data"), "allow_cpu": True,
                             "kohya": {"script_path": str(tmp_path / "missing" / "train_network.py")}})
    daemon = DaemonProcess(cfg, f"http://127.0.0.1:{port}", tmp_path / "d3.log")
    daemon.start()
    try:
        with ServerThread(FakeEd(ed_root, listen_port=ed_port).app(), ed_port) as server:
            open_tab(page, server.url)
            banner = page.locator("[data-clora=banner]")
            banner.wait_for(state="visible", timeout=20000)
            assert "not ready to train" in banner.inner_text()
            problems = page.locator("[data-clora=problem]").all_inner_texts()
            assert any(p.startswith("kohya_script:") and "Fix:" in p for p in problems), problems
            assert page.get_attribute("[data-clora=root]", "data-ready") == "false"
            assert page.get_attribute("[data-clora=conn]", "data-status") == "live"
            assert page.is_disabled("[data-clora=start]")
            assert "not ready" in page.inner_text("[data-clora=start-reason]")
            page.screenshot(path=str(artifacts_dir() / "daemon-not-ready.png"), full_page=True)
    finally:
        daemon.stop()


def test_page_origin_not_allowed_by_the_daemon(env: Env, page: Any, tmp_path: Path) -> None:
    """ED opened on an address the daemon's allowed_origins lacks: the banner names the origin and the fix."""
    ed_port = free_port()
    ed_root = make_ed_root(tmp_path / "ed4", listen_port=ed_port)
    for src, dest in ((install_plugin.UI_PLUGIN_SRC, "ui"), (install_plugin.SERVER_PLUGIN_SRC, "server")):
        (ed_root / "plugins" / dest / src.name).write_bytes(src.read_bytes())
    shutil.copytree(install_plugin.UI_ASSETS_SRC, ed_root / "plugins" / "ui" / install_plugin.UI_ASSETS_NAME)
    # settings pointing at the running daemon's config, which does not list this ED's port
    settings = json.loads((env.ed_root / "plugins" / "server" / "character_lora_plugin.json").read_text())
    (ed_root / "plugins" / "server" / "character_lora_plugin.json").write_text(json.dumps(settings))
    with ServerThread(FakeEd(ed_root, listen_port=ed_port).app(), ed_port) as server:
        open_tab(page, server.url)
        banner = page.locator("[data-clora=banner]")
        banner.wait_for(state="visible", timeout=20000)
        text = banner.inner_text()
        assert f"does not accept calls from this page's address ({server.url})" in text
        assert f"Add {server.url} to allowed_origins in {env.daemon_config}" in text
        assert page.locator("[data-clora=problem]").count() == 1
        assert page.is_disabled("[data-clora=start]")


def test_one_iife_no_leaked_globals_and_no_clash_with_other_plugins(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    # the other plugin (same top-level names as our internals) loaded too and kept its globals
    assert page.is_visible("#tab-another")
    assert page.evaluate("connect() === 'another plugin' && state === \"another plugin's state\" && client === null")

    # load our file alone into a bare page: the only new global is window.CharacterLoRA, and it waits for ED
    plugin_js = (env.ed_root / "plugins" / "ui" / "character-lora.plugin.js").read_text()
    page.goto(env.ed_url + "/media/ed-fake/ed-fake.css")  # same origin, no ED scripts
    before = set(page.evaluate("Object.getOwnPropertyNames(window)"))
    page.add_script_tag(content=plugin_js)
    after = set(page.evaluate("Object.getOwnPropertyNames(window)"))
    assert after - before == {"CharacterLoRA"}
    assert page.evaluate("window.CharacterLoRA.loaded && document.getElementById('tab-character-lora') === null")

    # ED's scripts arriving after the plugin (a plugin manager evaluating it early): the tab still appears
    page.goto(env.ed_url)
    page.wait_for_function("window.__edFake && window.__edFake.ready")
    assert page.locator("#tab-character-lora").count() == 1
    page.add_script_tag(content=plugin_js)  # loaded twice: still one tab
    page.wait_for_timeout(300)
    assert page.locator("#tab-character-lora").count() == 1


def test_reconnects_by_itself_after_the_daemon_restarts(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.wait_for_selector("[data-clora=conn][data-status=live]", timeout=20000)
    rows = page.locator("[data-clora=job-row]").count()
    assert rows >= 1  # the job trained above

    env.daemon.stop()
    page.wait_for_selector("[data-clora=conn]:not([data-status=live])", timeout=20000)
    page.wait_for_selector("[data-clora=banner]:not([hidden])", timeout=20000)
    assert "not running" in page.inner_text("[data-clora=banner]")
    assert page.locator("[data-clora=job-row]").count() == rows  # the list stays while disconnected
    page.screenshot(path=str(artifacts_dir() / "daemon-stopped.png"), full_page=True)

    env.daemon.start()
    page.wait_for_selector("[data-clora=conn][data-status=live]", timeout=45000)
    page.wait_for_selector("[data-clora=banner][hidden]", state="attached", timeout=20000)
    assert page.locator("[data-clora=job-row]").count() == rows
    assert page.get_attribute("[data-clora=root]", "data-ready") == "true"


def test_tab_says_restart_ed_when_its_modules_cannot_load(env: Env, browser: Any, tmp_path: Path) -> None:
    """The loader is installed but ED runs without the server plugin's module route (ED not restarted)."""
    ed_port = free_port()
    ed_root = make_ed_root(tmp_path / "ed-no-route", listen_port=ed_port)
    for src, dest in ((install_plugin.UI_PLUGIN_SRC, "ui"), (install_plugin.SERVER_PLUGIN_SRC, "server")):
        (ed_root / "plugins" / dest / src.name).write_bytes(src.read_bytes())
    shutil.copytree(install_plugin.UI_ASSETS_SRC, ed_root / "plugins" / "ui" / install_plugin.UI_ASSETS_NAME)
    # its own page: the console error this case logs is expected here (the `page` fixture refuses any)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    page.on("pageerror", lambda exc: console.append("pageerror: " + str(exc)))
    with ServerThread(FakeEd(ed_root, listen_port=ed_port, serve_ui_modules=False).app(), ed_port) as server:
        open_tab(page, server.url, built=False)  # the modules never load: no root comes
        note = page.locator("#tab-content-character-lora [data-clora=load-error]")
        note.wait_for(state="visible", timeout=20000)
        text = note.inner_text()
        assert "could not load its code" in text and "restart Easy Diffusion" in text
        assert page.locator("#tab-character-lora").count() == 1
        assert page.locator("[data-clora=root]").count() == 0
        assert page.evaluate("window.CharacterLoRA.modules") == "failed"
        page.screenshot(path=str(artifacts_dir() / "modules-not-loaded.png"), full_page=True)
    context.close()
    assert any("[Character LoRA]" in line and "restart Easy Diffusion" in line for line in console), console
    assert not [line for line in console if line.startswith("pageerror")]


def test_socket_and_api_modules_on_their_own(env: Env, page: Any) -> None:
    """socket.js re-dispatches each frame under its type; api.js fails with typed DaemonErrors."""
    page.goto(env.ed_url)
    page.wait_for_function("window.__edFake && window.__edFake.ready")
    got = page.evaluate(
        """async ([url, token, deadUrl]) => {
            const { DaemonSocket } = await import("/character-lora/ui/socket.js")
            const { DaemonClient, DaemonError } = await import("/character-lora/ui/api.js")
            const sock = new DaemonSocket(() => ({ url, token }))
            const frames = []
            sock.addEventListener("frame", (ev) => frames.push(ev.detail.type))
            const snapshot = new Promise((resolve) => sock.addEventListener("snapshot", (ev) => resolve(ev.detail)))
            sock.open()
            const frame = await snapshot
            sock.wanted = false
            sock.close()

            const client = new DaemonClient()
            client.configure(url, "not-the-token")
            const caught = async (p) => p.then(() => null, (e) => ({
                isDaemonError: e instanceof DaemonError, kind: e.kind, status: e.status, message: e.message }))
            const wrongToken = await caught(client.request("GET", "/jobs"))
            client.configure(deadUrl, token)
            const unreachable = await caught(client.request("GET", "/health", null, { auth: false }))
            return { type: frame.type, jobs: Array.isArray((frame.data || {}).jobs), frames, wrongToken, unreachable }
        }""",
        [env.daemon.url, env.token, f"http://127.0.0.1:{free_port()}"],
    )
    assert got["type"] == "snapshot" and got["jobs"] and got["frames"][0] == "snapshot"
    assert got["wrongToken"]["isDaemonError"] and got["wrongToken"]["kind"] == "http"
    assert got["wrongToken"]["status"] == 401 and got["wrongToken"]["message"]
    assert got["unreachable"]["isDaemonError"] and got["unreachable"]["kind"] == "network"
    assert got["unreachable"]["status"] == 0 and "cannot be reached" in got["unreachable"]["message"]


# ---- lifecycle buttons and Use it model switch


def _ed_with_own_daemon(tmp_path: Path, name: str) -> tuple[Path, Path, int, int]:
    """A second ED install with its own daemon config (own port, token, data dir), as install_plugin.py makes it."""
    ed_port = free_port()
    ed_root = make_ed_root(tmp_path / f"ed-{name}", listen_port=ed_port)
    cfg = tmp_path / f"daemon-{name}" / "config.yaml"
    assert install_plugin.main(
        ["--ed-root", str(ed_root), "--daemon-python", sys.executable, "--daemon-config", str(cfg), "--no-autostart"]
    ) == 0
    port = free_port()
    workspace = tmp_path / f"workspace-{name}"
    workspace.mkdir()
    update_config_file(cfg, {"port": port, "data_dir": str(tmp_path / f"daemon-{name}" / "data"), "allow_cpu": True,
                             "kohya": {"python": sys.executable, "script_path": str(KOHYA_DOUBLE),
                                       "workspace": str(workspace)}})
    return ed_root, cfg, ed_port, port


def test_restart_and_stop_buttons_run_the_daemon_through_ed(env: Env, page: Any, tmp_path: Path) -> None:
    ed_root, cfg, ed_port, port = _ed_with_own_daemon(tmp_path, "life")
    url = f"http://127.0.0.1:{port}"
    daemon = DaemonProcess(cfg, url, tmp_path / "life.log")
    daemon.start()
    fake = FakeEd(ed_root, listen_port=ed_port)
    try:
        with ServerThread(fake.app(), ed_port) as server:
            open_tab(page, server.url)
            page.wait_for_selector("[data-clora=conn][data-status=live]", timeout=30000)
            first_pid = fake.plugin.fetch_health(url)["pid"]
            assert page.is_enabled("[data-clora=restart-daemon]") and page.is_enabled("[data-clora=stop-daemon]")

            # Restart: busy while the plugin stops and starts it, then connected to a new process
            page.click("[data-clora=restart-daemon]")
            page.wait_for_selector("[data-clora=root][data-busy=restarting]", timeout=10000)
            assert page.is_disabled("[data-clora=stop-daemon]")
            assert "Restarting" in page.inner_text("[data-clora=restart-daemon]")
            page.wait_for_selector("[data-clora=root]:not([data-busy])", timeout=90000)
            page.wait_for_selector("[data-clora=conn][data-status=live]", timeout=30000)
            assert daemon.proc is not None and daemon.proc.wait(10) == 0  # the first one shut down cleanly
            second_pid = fake.plugin.fetch_health(url)["pid"]
            assert second_pid != first_pid
            page.wait_for_function(
                "(pid) => window.__edFake.calls.some((c) => c.fn === 'showToast' && c.args[0].includes("
                "'daemon restarted (process ' + pid + ')'))", arg=second_pid, timeout=5000)
            assert page.locator("[data-clora=banner]").is_hidden()

            # Stop: the daemon is gone, the banner offers Start daemon, Stop is off until it runs again
            page.click("[data-clora=stop-daemon]")
            page.wait_for_selector("[data-clora=start-daemon]", timeout=45000)
            # the banner may show while the stop call is still answering (the socket closed first)
            page.wait_for_selector("[data-clora=root]:not([data-busy])", timeout=45000)
            assert fake.plugin.fetch_health(url) is None
            assert page.get_attribute("[data-clora=conn]", "data-status") == "offline"
            assert page.is_disabled("[data-clora=stop-daemon]") and page.is_enabled("[data-clora=restart-daemon]")
            assert "not running" in page.inner_text("[data-clora=banner]")
            page.screenshot(path=str(artifacts_dir() / "daemon-stopped-from-the-tab.png"), full_page=True)

            page.click("[data-clora=start-daemon]")
            page.wait_for_selector("[data-clora=conn][data-status=live]", timeout=45000)
            assert fake.plugin.fetch_health(url)["pid"] not in (first_pid, second_pid)
    finally:
        status, _body = fake.plugin.stop_daemon(str(cfg), fake.plugin.read_daemon_config(str(cfg)))
        daemon.stop()
        assert status == 200


def test_a_leftover_daemon_of_another_config_is_named_not_blamed_on_the_token(env: Env, page: Any,
                                                                             tmp_path: Path) -> None:
    """This ED's config names the port the module's daemon (another config, another token) listens on."""
    ed_root, cfg, ed_port, _port = _ed_with_own_daemon(tmp_path, "leftover")
    update_config_file(cfg, {"port": int(env.daemon.url.rsplit(":", 1)[1])})
    with ServerThread(FakeEd(ed_root, listen_port=ed_port).app(), ed_port) as server:
        open_tab(page, server.url)
        banner = page.locator("[data-clora=banner]")
        banner.wait_for(state="visible", timeout=20000)
        text = banner.inner_text()
        assert f"is a leftover of another configuration (process {env.daemon.proc.pid}" in text
        assert str(env.daemon_config) in text and "Fix: Stop that daemon" in text
        assert "refused the token" not in text and page.locator("[data-clora=problem]").count() == 1
        assert page.get_attribute("[data-clora=conn]", "data-status") == "offline"
        assert page.is_disabled("[data-clora=stop-daemon]") and page.is_disabled("[data-clora=restart-daemon]")
        assert page.is_disabled("[data-clora=start]")
    assert env.daemon.proc is not None and env.daemon.proc.poll() is None  # nothing touched the other daemon


def test_use_it_switches_ed_to_a_model_of_the_loras_architecture(env: Env, page: Any) -> None:
    done = [j for j in daemon_json(env, "GET", "/jobs")["jobs"] if j["state"] == "done" and j["lora_id"]]
    assert done, "the end-to-end test above trains the LoRA this test uses"
    job = done[0]
    assert job["base_model"].endswith("tiny-sd15.safetensors")
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=conn][data-status=live]", timeout=30000)
    page.locator(f"[data-job-id='{job['id']}']").click()
    page.wait_for_selector("[data-clora=use-it]:not([disabled])", timeout=30000)

    # an SDXL model is current: Use it selects the SD 1.x model the LoRA was trained on, and says so
    page.evaluate("stableDiffusionModelField.value = 'tiny-sdxl'")
    assert page.evaluate("stableDiffusionModelField.value") == "tiny-sdxl"
    page.click("[data-clora=use-it]")
    assert page.evaluate("stableDiffusionModelField.value") == "tiny-sd15"
    assert page.input_value("#stable_diffusion_model") == "tiny-sd15"
    toast = calls(page, "showToast")[-1]["args"]
    assert "The model tiny-sdxl is SDXL, and this LoRA is SD 1.x: switched the model to tiny-sd15, the model it " \
           "was trained on." in toast[0]
    assert toast[2] is False
    assert job["lora_id"] in page.evaluate("loraModelField.value")["modelNames"]

    # a matching model stays as it is, and the toast says nothing about the model
    page.locator("#tab-character-lora").click()
    page.click("[data-clora=use-it]")
    assert page.evaluate("stableDiffusionModelField.value") == "tiny-sd15"
    assert "model" not in calls(page, "showToast")[-1]["args"][0].replace("LoRA", "")

    # trained on a model ED no longer lists: another SD 1.x model is picked; none at all: the toast warns
    got = page.evaluate(
        """async ([job, root]) => {
            const { useLora } = await import("/character-lora/ui/use-lora.js")
            const { state } = await import("/character-lora/ui/store.js")
            const toast = () => window.__edFake.calls.filter((c) => c.fn === "showToast").pop().args
            stableDiffusionModelField.value = "tiny-sdxl"
            await useLora({ ...job, base_model: root + "/models/stable-diffusion/deleted.safetensors" })
            const other = { model: stableDiffusionModelField.value, toast: toast() }
            const models = state.daemonModels
            state.daemonModels = models.filter((m) => m.arch !== "sd1")
            stableDiffusionModelField.value = "tiny-sdxl"
            await useLora(job)
            state.daemonModels = models
            return { other, none: { model: stableDiffusionModelField.value, toast: toast() } }
        }""",
        [job, str(env.ed_root)],
    )
    assert got["other"]["model"] == "tiny-sd15"
    assert "switched the model to tiny-sd15." in got["other"]["toast"][0]
    assert got["none"]["model"] == "tiny-sdxl"
    assert "pick an SD 1.x model under Model; none is listed." in got["none"]["toast"][0]
    assert got["none"]["toast"][2] is True

# ---- small things: alpha, speed, layout

def test_advanced_fields_show_what_the_daemon_will_use(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.locator("[data-clora=advanced] summary").click()
    preset = daemon_json(env, "GET", "/presets")
    presets = preset.get("presets", preset)
    balanced = presets["balanced"]
    assert page.input_value("#clora-p-network_dim") == str(balanced["network_dim"])
    assert float(page.input_value("#clora-p-network_alpha")) == balanced["network_alpha"]
    ratio = balanced["network_alpha"] / balanced["network_dim"]
    # a changed rank keeps the preset's alpha/rank ratio, as resolve_params does: the field says so
    page.fill("#clora-p-network_dim", "8")
    assert float(page.input_value("#clora-p-network_alpha")) == 8 * ratio
    page.fill("#clora-p-network_dim", "5")
    assert float(page.input_value("#clora-p-network_alpha")) == 5 * ratio
    assert page.inner_text("[data-clora=params-error]") == ""
    # a typed alpha stays; one above the rank is refused inline, as the daemon would (400, network_alpha)
    page.fill("#clora-p-network_alpha", "16")
    assert "at most the rank (5)" in page.inner_text("[data-clora=params-error]")
    assert page.get_attribute("#clora-p-network_alpha", "aria-invalid") == "true"
    page.fill("#clora-p-network_dim", "32")
    assert page.inner_text("[data-clora=params-error]") == ""
    # learning rates past the daemon's ceiling are refused inline too
    page.fill("#clora-p-unet_lr", "0.5")
    assert "U-Net learning rate must be above 0 and at most 0.01" in page.inner_text("[data-clora=params-error]")
    page.fill("#clora-p-unet_lr", "0.0002")
    assert page.inner_text("[data-clora=params-error]") == ""
    # back to the preset: every field shows the preset's value again
    page.get_by_role("button", name="Reset to preset").click()
    assert float(page.input_value("#clora-p-network_alpha")) == balanced["network_alpha"]
    # no unchanged field shows a value the daemon would refuse
    page.fill("#clora-p-network_dim", "1")
    assert float(page.input_value("#clora-p-network_alpha")) == ratio
    assert page.inner_text("[data-clora=params-error]") == ""
    page.screenshot(path=str(artifacts_dir() / "advanced-alpha.png"), full_page=True)


SEEN_RATES = """() => {
    window.__seenRates = []
    const look = () => {
        const b = document.querySelector('[data-clora=stat-rate]')
        if (b) {
            const seen = b.dataset.phase + ':' + b.textContent
            if (window.__seenRates[window.__seenRates.length - 1] !== seen) window.__seenRates.push(seen)
        }
        requestAnimationFrame(look)
    }
    look()
}"""

LAYOUT = """() => {
    const box = (el) => {
        const r = el.getBoundingClientRect()
        return { x: r.left, y: r.top, w: r.width, h: r.height }
    }
    const lines = (el) => {
        // distinct line boxes of the button's text: 1 when it does not wrap
        const range = document.createRange()
        range.selectNodeContents(el)
        return new Set(Array.from(range.getClientRects()).filter((r) => r.width > 0).map((r) => Math.round(r.top))).size
    }
    const line = (el) => {
        const cs = getComputedStyle(el)
        const lh = parseFloat(cs.lineHeight) || parseFloat(cs.fontSize) * 1.2
        const inner = el.getBoundingClientRect().height - parseFloat(cs.paddingTop) - parseFloat(cs.paddingBottom)
            - parseFloat(cs.borderTopWidth) - parseFloat(cs.borderBottomWidth)
        return { lines: lines(el), inner, lh }
    }
    return {
        status: box(document.querySelector('#server-status')),
        tabs: Array.from(document.querySelectorAll('#tab-container .tab')).map((t) => ({ id: t.id, ...box(t) })),
        header: box(document.querySelector('.clora-header')),
        buttons: Object.fromEntries(
            ['start', 'use-it'].map((k) => [k, line(document.querySelector('[data-clora=' + k + ']'))])),
    }
}"""


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    across = a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
    return across and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def test_speed_tile_shows_previews_and_the_layout_fits_ed(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.evaluate(SEEN_RATES)
    page.fill("#clora-name", "Layout Check")
    page.fill("#clora-trigger", "l4yt")
    page.locator("[data-clora=advanced] summary").click()
    for key, value in (("epochs", "2"), ("repeats", "1"), ("batch_size", "1"), ("resolution", "256"),
                       ("sample_every_n_epochs", "1")):
        page.fill(f"#clora-p-{key}", value)
    drop_images(page, image_payload(8))
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false", timeout=30000)
    page.click("[data-clora=start]")
    # while kohya draws the previews the Speed tile says so, instead of a rate that seems stuck
    page.wait_for_selector("[data-clora=stat-rate][data-phase=preview]", timeout=60000)
    assert page.inner_text("[data-clora=stat-rate]") == "making preview…"
    assert page.inner_text("[data-clora=job-state]") == "Training"
    page.screenshot(path=str(artifacts_dir() / "speed-preview.png"), full_page=True)
    wait_state(page, "Done", timeout=60000)
    page.wait_for_selector("[data-clora=use-it]:not([disabled])", timeout=30000)
    seen = page.evaluate("window.__seenRates")
    # kohya's start-up is said as it goes, with the pictures cached so far, before any rate
    caching = [s for s in seen if s.startswith("caching_latents:caching pictures ")]
    counts = [int(s.split(" ")[-1].split("/")[0]) for s in caching]
    assert caching and all(s.endswith("/8…") for s in caching) and counts == sorted(counts), seen
    assert seen.index(caching[0]) < min(i for i, s in enumerate(seen) if s.startswith("training:") and "/s" in s)
    preview_at = seen.index("preview:making preview…")
    # training resumed after the preview and showed a rate again (steps/s), then the job ended
    assert any(s.startswith("training:") and "/s" in s for s in seen[preview_at:]), seen
    assert page.get_attribute("[data-clora=stat-rate]", "data-phase") == "training"

    for width in (1280, 1400, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        got = page.evaluate(LAYOUT)
        for name, b in got["buttons"].items():
            assert b["lines"] == 1, f"{name} wraps at {width}px: {b}"
            assert b["inner"] < 2 * b["lh"], f"{name} is taller than one line at {width}px: {b}"
        for tab in got["tabs"]:
            assert not _overlap(tab, got["status"]), f"tab {tab['id']} runs into ED's status at {width}px: {got}"
        assert not _overlap(got["header"], got["status"]), f"the tab header runs into ED's status at {width}px"
        page.screenshot(path=str(artifacts_dir() / f"layout-{width}.png"), full_page=False)


# ---- how the run fits the card (GET /fit), SDXL

def test_a_daemon_without_fit_shows_no_tier_line_and_sends_no_tier(env: Env, page: Any) -> None:
    """A daemon older than the memory tiers answers /fit with aiohttp's 404: the form works as before."""
    asked: list[str] = []

    def old_daemon(route: Any) -> None:
        asked.append(route.request.url)
        route.fulfill(status=404, content_type="text/plain", body="404: Not Found")

    page.route("**/fit?*", old_daemon)
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    page.wait_for_function("window.CharacterLoRA.state.fitUnsupported === true", timeout=10000)
    assert len(asked) == 1 and "base_model=tiny-sd15" in asked[0]
    assert page.locator("[data-clora=fit]").is_hidden()
    page.locator("[data-clora=advanced] summary").click()
    assert page.locator("#clora-memory-tier").is_hidden()
    # the fields show the preset's values, and nothing about tiers is sent with the job
    balanced = daemon_json(env, "GET", "/presets")["presets"]["balanced"]
    assert page.input_value("#clora-p-batch_size") == str(balanced["batch_size"])
    sent = page.evaluate("""async () => {
        const { collectParams } = await import("/character-lora/ui/form-rules.js")
        window.CharacterLoRA.state.memoryTier = "24gb"  // even a tier left chosen from another daemon
        return collectParams()
    }""")
    assert sent == {"preset": "balanced"}
    # other models are not asked about again
    page.select_option("#clora-base-model", "tiny-sdxl")
    page.wait_for_timeout(600)
    assert len(asked) == 1


def fit_json(env: Env, **query: Any) -> Any:
    """The daemon's own GET /fit answer: what the tab must show."""
    return daemon_json(env, "GET", "/fit?" + urllib.parse.urlencode(query))


def tier_options(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('#clora-memory-tier option'))
        .map((o) => ({ id: o.value, text: o.textContent, disabled: o.disabled }))""")


def wait_job_done(page: Any, name: str) -> None:
    """The panel shows the job of that name (not an older one), done."""
    page.wait_for_function(
        "(name) => { const j = window.CharacterLoRA.selectedJob(); return j && j.name === name && j.state === 'done'"
        " && document.querySelector('[data-clora=job-state]')?.textContent === 'Done' }", arg=name, timeout=90000)


def wait_fit_line(page: Any, reason: str) -> None:
    page.wait_for_function("(r) => document.querySelector('[data-clora=fit]')?.textContent === r", arg=reason,
                           timeout=15000)
    assert page.is_visible("[data-clora=fit]")


# Records the `params` field of the tab's POST /train (a multipart body with files, which Playwright's request
# object does not expose), then lets the request go on unchanged.
RECORD_TRAIN_PARAMS = """() => {
    const send = window.fetch
    window.__trainParams = []
    window.fetch = function (url, opts) {
        if (String(url).endsWith("/train") && opts && opts.body instanceof FormData) {
            window.__trainParams.push(JSON.parse(opts.body.get("params")))
        }
        return send.apply(this, arguments)
    }
}"""


def test_sdxl_trains_from_the_tab_to_eds_lora_list_with_its_memory_tier(env: Env, page: Any) -> None:
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    # the picker lists ED's SDXL models beside the SD 1.x ones, each with its family; SD 2.x is marked
    options = page.evaluate("""() => Object.fromEntries(
        Array.from(document.querySelectorAll('#clora-base-model option'))
            .map((o) => [o.value, { text: o.textContent, trainable: o.dataset.trainable }]))""")
    assert options["tiny-sd15"] == {"text": "tiny-sd15 — SD 1.x", "trainable": "true"}
    assert options["tiny-sdxl"] == {"text": "tiny-sdxl — SDXL", "trainable": "true"}
    assert options["tiny-sd21"] == {"text": "tiny-sd21 — SD 2.x (cannot be trained)", "trainable": "false"}

    # picking the SDXL model: the daemon's tier line, and the form's values are the ones /fit resolved
    page.select_option("#clora-base-model", "tiny-sdxl")
    fit = fit_json(env, base_model="tiny-sdxl", preset="balanced", memory_tier="auto", images=8)
    assert fit["arch"] == "sdxl" and fit["trainable"] is True and fit["auto"] is True
    wait_fit_line(page, fit["reason"])
    assert page.get_attribute("[data-clora=fit]", "data-tier") == fit["tier"]
    page.locator("[data-clora=advanced] summary").click()
    p = fit["params"]
    sdxl_presets = daemon_json(env, "GET", "/presets?arch=sdxl")["presets"]
    assert p["resolution"] == sdxl_presets["balanced"]["resolution"] == 1024
    page.wait_for_function("document.querySelector('#clora-p-resolution').value === '1024'")
    assert page.input_value("#clora-p-batch_size") == str(p["batch_size"])
    assert float(page.input_value("#clora-p-unet_lr")) == pytest.approx(p["unet_lr"])
    assert float(page.input_value("#clora-p-text_encoder_lr")) == p["text_encoder_lr"]
    assert page.get_attribute("#clora-p-repeats", "placeholder") == f"auto ({p['repeats']})"
    steps = -(-8 * p["repeats"] // p["batch_size"]) * p["epochs"]
    assert page.inner_text("[data-clora=preset-help]").startswith(f"≈ {steps} steps · {p['epochs']} epochs")

    # Advanced's Memory tier: Automatic (naming the tier it picked) and the daemon's tiers; a machine without
    # a CUDA GPU can use the CPU tier only
    opts = tier_options(page)
    assert [o["id"] for o in opts] == ["auto"] + [t["id"] for t in fit["tiers"]]
    assert opts[0]["text"] == f"Automatic ({fit['tier_label']})"
    assert [o["id"] for o in opts if not o["disabled"]] == ["auto", "cpu"]
    with page.expect_request(lambda r: "/fit?" in r.url and "memory_tier=cpu" in r.url):
        page.select_option("#clora-memory-tier", "cpu")
    chosen = fit_json(env, base_model="tiny-sdxl", preset="balanced", memory_tier="cpu", images=8)
    assert chosen["auto"] is False and chosen["reason"] != fit["reason"]
    wait_fit_line(page, chosen["reason"])
    assert page.get_attribute("[data-clora=fit]", "data-auto") == "false"

    # a short run with that tier: the choice goes to /train as params.memory_tier
    page.fill("#clora-name", "Xl Hero")
    page.fill("#clora-trigger", "xlh3ro")
    for key, value in (("epochs", "1"), ("repeats", "1"), ("resolution", "256"), ("sample_every_n_epochs", "0")):
        page.fill(f"#clora-p-{key}", value)
    drop_images(page, image_payload(8, start=60))
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false", timeout=30000)
    # a GPU tier left chosen (e.g. from a daemon on another machine): the daemon's refusal blocks Start
    with pytest.raises(urllib.error.HTTPError) as refused:
        fit_json(env, base_model="tiny-sdxl", preset="balanced", memory_tier="24gb", images=8)
    assert refused.value.code == 400
    error = json.loads(refused.value.read())["error"]
    page.evaluate("""async () => {
        const { state } = await import("/character-lora/ui/store.js")
        const { renderForm } = await import("/character-lora/ui/views/form.js")
        state.memoryTier = "24gb"
        renderForm()
    }""")
    wait_fit_line(page, error)
    assert "clora-warn" in (page.get_attribute("[data-clora=fit]", "class") or "")
    assert page.is_disabled("[data-clora=start]") and page.inner_text("[data-clora=start-reason]") == error
    page.select_option("#clora-memory-tier", "cpu")
    wait_fit_line(page, chosen["reason"])
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false")
    page.evaluate(RECORD_TRAIN_PARAMS)
    page.click("[data-clora=start]")
    page.wait_for_function("window.__trainParams.length === 1")
    sent = page.evaluate("window.__trainParams[0]")
    assert sent["memory_tier"] == "cpu" and sent["preset"] == "balanced" and sent["resolution"] == 256
    wait_job_done(page, "Xl Hero")
    page.wait_for_selector("[data-clora=use-it]:not([disabled])", timeout=30000)
    job = page.evaluate("window.CharacterLoRA.selectedJob()")
    stored = daemon_json(env, "GET", f"/jobs/{job['id']}/status")
    assert stored["params"]["arch"] == "sdxl" and stored["params"]["memory_tier"] == "cpu"
    assert stored["base_model"].endswith("tiny-sdxl.safetensors")

    # the LoRA is an SDXL one, in ED's LoRA list
    lora_id = job["lora_id"]
    lora = env.lora_dir / f"{lora_id}.safetensors"
    assert lora.is_file()
    with lora.open("rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    assert header["__metadata__"]["ss_base_model_version"].startswith("sdxl")
    assert page.evaluate("(id) => !!modelsDB.lora[id]", lora_id)
    # the panel and the list say what it was trained for
    assert page.inner_text("[data-clora=job-settings]").startswith("SDXL · 256 px · memory tier CPU")
    row = page.locator(f"[data-job-id='{job['id']}']")
    assert row.locator("[data-clora=job-arch]").inner_text() == "SDXL"
    page.screenshot(path=str(artifacts_dir() / "sdxl-done.png"), full_page=True)

    # "Use it" while ED renders with an SD 1.x model: ED is switched to the SDXL model the LoRA was trained on
    page.evaluate("stableDiffusionModelField.value = 'tiny-sd15'")
    page.click("[data-clora=use-it]")
    assert page.evaluate("stableDiffusionModelField.value") == "tiny-sdxl"
    assert lora_id in page.evaluate("loraModelField.value")["modelNames"]
    toast = calls(page, "showToast")[-1]["args"]
    assert "The model tiny-sd15 is SD 1.x, and this LoRA is SDXL: switched the model to tiny-sdxl, the model it " \
           "was trained on." in toast[0]
    assert toast[2] is False


@contextlib.contextmanager
def installed_ed(tmp: Path, settings: dict[str, Any], extra_env: dict[str, str] | None = None) -> Iterator[Env]:
    """A fake ED install that got the plugin from install_plugin.py, and its daemon (`python -m daemon`) running
    with `settings` merged into the config the installer wrote (the port and data dir are chosen here)."""
    ed_port = free_port()
    ed_root = make_ed_root(tmp / "easy-diffusion", listen_port=ed_port)
    cfg = tmp / "daemon" / "config.yaml"
    assert install_plugin.main(
        ["--ed-root", str(ed_root), "--daemon-python", sys.executable, "--daemon-config", str(cfg), "--no-autostart"]
    ) == 0
    port = free_port()
    update_config_file(cfg, {"port": port, "data_dir": str(tmp / "daemon" / "data"), **settings})
    daemon = DaemonProcess(cfg, f"http://127.0.0.1:{port}", tmp / "daemon.log", extra_env=extra_env)
    fake = FakeEd(ed_root, listen_port=ed_port)
    try:
        daemon.start()
        with ServerThread(fake.app(), ed_port) as server:
            token = yaml.safe_load(cfg.read_text())["token"]
            yield Env(ed_root, cfg, token, daemon, server.url, fake, ed_root / "models" / "lora")
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def gpu_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A second install whose daemon's probe finds an RTX 4090 (the torch double above)."""
    tmp = tmp_path_factory.mktemp("ui-gpu")
    (tmp / "workspace").mkdir()
    kohya = {"python": sys.executable, "script_path": str(KOHYA_DOUBLE), "workspace": str(tmp / "workspace")}
    # the daemon's probe finds an RTX 4090
    with installed_ed(tmp, {"kohya": kohya}, extra_env={"PYTHONPATH": torch_double_path(tmp)}) as env:
        yield env


def test_a_gpu_daemon_picks_the_tier_by_memory_and_advanced_overrides_it(gpu_env: Env, page: Any) -> None:
    env = gpu_env
    assert daemon_json(env, "POST", "/config/test")["gpu"]["name"] == "NVIDIA GeForce RTX 4090"
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
    assert page.input_value("#clora-base-model") == "tiny-sd15"

    # automatic: the tier for 24 GB, and why, in the daemon's words (the example line)
    auto = fit_json(env, base_model="tiny-sd15", preset="balanced", memory_tier="auto", images=8)
    assert auto["tier"] == "24gb" and auto["auto"] is True
    assert auto["reason"].startswith("NVIDIA GeForce RTX 4090, 24 GB → batch 8, bf16, no checkpointing")
    wait_fit_line(page, auto["reason"])
    page.locator("[data-clora=advanced] summary").click()
    p = auto["params"]
    assert page.input_value("#clora-p-batch_size") == str(p["batch_size"]) == "8"
    balanced = daemon_json(env, "GET", "/presets")["presets"]["balanced"]
    assert p["unet_lr"] > balanced["unet_lr"]  # the square-root rule: batch 8 on a batch-2 preset
    assert float(page.input_value("#clora-p-unet_lr")) == pytest.approx(p["unet_lr"])
    assert float(page.input_value("#clora-p-text_encoder_lr")) == pytest.approx(p["text_encoder_lr"])
    steps = -(-8 * p["repeats"] // 8) * p["epochs"]
    assert page.inner_text("[data-clora=preset-help]").startswith(f"≈ {steps} steps")
    opts = tier_options(page)
    assert opts[0]["text"] == "Automatic (24 GB)"
    assert [o["id"] for o in opts if o["disabled"]] == ["cpu"]  # a machine with a CUDA GPU has no CPU tier

    # a smaller tier chosen in Advanced: the daemon's line and values for it
    page.select_option("#clora-memory-tier", "8gb")
    small = fit_json(env, base_model="tiny-sd15", preset="balanced", memory_tier="8gb", images=8)
    wait_fit_line(page, small["reason"])
    assert "8 GB settings chosen by hand" in small["reason"]
    q = small["params"]
    assert page.input_value("#clora-p-batch_size") == str(q["batch_size"]) == "2"
    assert float(page.input_value("#clora-p-unet_lr")) == pytest.approx(q["unet_lr"])
    page.screenshot(path=str(artifacts_dir() / "tier-chosen.png"), full_page=True)

    # the same tier for the SDXL model: its own line (checkpointing, cached text encoders, fp8)
    page.select_option("#clora-base-model", "tiny-sdxl")
    xl = fit_json(env, base_model="tiny-sdxl", preset="balanced", memory_tier="8gb", images=8)
    wait_fit_line(page, xl["reason"])
    page.wait_for_function("document.querySelector('#clora-p-resolution').value === '1024'")
    assert page.input_value("#clora-p-batch_size") == str(xl["params"]["batch_size"])
    page.select_option("#clora-base-model", "tiny-sd15")
    wait_fit_line(page, small["reason"])

    # a changed batch size: the learning rate follows it as the daemon's rule says, and the job trains with
    # exactly what the form showed, in as many steps as it estimated
    page.fill("#clora-name", "Gpu Hero")
    page.fill("#clora-trigger", "gpuh3ro")
    for key, value in (("batch_size", "4"), ("epochs", "1"), ("repeats", "3"), ("resolution", "256"),
                       ("sample_every_n_epochs", "0")):
        page.fill(f"#clora-p-{key}", value)
    shown_lr = float(page.input_value("#clora-p-unet_lr"))
    assert q["unet_lr"] < shown_lr < p["unet_lr"]
    drop_images(page, image_payload(8, start=80))
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false", timeout=30000)
    estimate = int(re.search(r"≈ (\d+) steps", page.inner_text("[data-clora=preset-help]")).group(1))  # type: ignore[union-attr]
    page.evaluate(RECORD_TRAIN_PARAMS)
    page.click("[data-clora=start]")
    page.wait_for_function("window.__trainParams.length === 1")
    assert page.evaluate("window.__trainParams[0]")["memory_tier"] == "8gb"
    wait_job_done(page, "Gpu Hero")
    job = page.evaluate("window.CharacterLoRA.selectedJob()")
    stored = daemon_json(env, "GET", f"/jobs/{job['id']}/status")
    used = stored["params"]
    assert used["memory_tier"] == "8gb" and used["batch_size"] == 4 and used["mixed_precision"] == "bf16"
    assert used["unet_lr"] == pytest.approx(shown_lr)
    assert stored["progress"]["total"] == estimate == 6
    assert page.inner_text("[data-clora=job-settings]") == "SD 1.x · 256 px · memory tier 8 GB · batch 4, bf16"
    # the tier's reason, and the lever the user changed by hand
    assert page.get_attribute("[data-clora=job-settings]", "title") == used["fit_reason"]
    assert used["fit_reason"] == small["reason"] + "; set by hand: batch_size 4"


# ---- recovery (issue 9): Resume, out-of-memory retries, saved state on disk


def recovery_json(**fields: Any) -> dict[str, Any]:
    """A job's `recovery` record as the daemon writes it (daemon/jobs/models.py Recovery.to_json)."""
    from daemon.jobs.models import Recovery

    return Recovery(**fields).to_json()


def fed_job(job_id: str, state: str, **fields: Any) -> dict[str, Any]:
    """A job JSON of the daemon's shape (Job.to_json), for view checks of states a short test cannot reach."""
    from daemon.jobs.models import Job, JobState

    job = Job(id=job_id, name="Fed Hero", trigger="f3d", class_token="woman", base_model="/m/tiny-sd15.safetensors",
              params={"arch": "sd1", "resolution": 512, "memory_tier": "24gb", "batch_size": 8, "epochs": 10,
                      "mixed_precision": "bf16"},
              image_count=8, state=JobState(state), created_at=time.time(), updated_at=time.time())
    return {**job.to_json(), **fields}


FEED = """async (frames) => {
    const { handleFrame } = await import("/character-lora/ui/events.js")
    const { renderAll } = await import("/character-lora/ui/store.js")
    for (const f of frames) handleFrame(f)
    renderAll()
}"""


def feed(page: Any, *frames: dict[str, Any]) -> None:
    page.evaluate(FEED, list(frames))


def test_recovery_views_from_the_job_json_and_notice_frames(env: Env, page: Any) -> None:
    """What the panel shows for each recovery record, fed as the daemon's frames (states a run here cannot reach:
    a 10-epoch job interrupted after epoch 2, a GPU out-of-memory retry); Resume asks the real daemon."""
    open_tab(page, env.ed_url)
    page.wait_for_selector("[data-clora=conn][data-status=live]", timeout=30000)

    # interrupted after epoch 2 of 10 with 84 MB of saved state: Resume says where it continues, and the size shows
    gone = fed_job("fedinterrupted", "interrupted",
                   recovery=recovery_json(state_epoch=2, state_bytes=84_000_000, step_offset=0),
                   error={"kind": "interrupted", "message": "The daemon stopped while this job was running.",
                          "hint": "Start the job again with the same pictures."})
    assert gone["resumable"] is True
    feed(page, {"type": "job_created", "job_id": gone["id"], "data": gone})
    page.evaluate("async (id) => (await import('/character-lora/ui/store.js')).selectJob(id)", gone["id"])
    assert page.inner_text("[data-clora=job-state]") == "Interrupted"
    assert page.is_visible("[data-clora=resume]")
    assert page.inner_text("[data-clora=resume-plan]") == \
        "Resume continues from epoch 3 of 10 (the state saved after epoch 2)."
    assert page.inner_text("[data-clora=state-size]") == "saved state: 84 MB"
    assert "Fix:" not in page.inner_text("[data-clora=result]")  # the hint to start again is what Resume does
    page.screenshot(path=str(artifacts_dir() / "recovery-interrupted.png"), full_page=True)
    # the daemon does not know this job: its 4xx sentence shows under the job, and the button is usable again
    with pytest.raises(urllib.error.HTTPError) as refused:
        daemon_json(env, "POST", f"/jobs/{gone['id']}/resume")
    assert 400 <= refused.value.code < 500
    sentence = json.loads(refused.value.read())["error"]
    page.click("[data-clora=resume]")
    page.wait_for_function("(document.querySelector('[data-clora=resume-error]')?.textContent || '') !== ''")
    assert page.inner_text("[data-clora=resume-error]").startswith("Could not resume: " + sentence)
    assert page.is_enabled("[data-clora=resume]") and page.inner_text("[data-clora=resume]").strip() == "Resume"

    # nothing saved yet: Resume trains again from the first step
    fresh = fed_job("fedfresh", "interrupted", recovery=recovery_json())
    feed(page, {"type": "job_created", "job_id": fresh["id"], "data": fresh})
    page.evaluate("async (id) => (await import('/character-lora/ui/store.js')).selectJob(id)", fresh["id"])
    assert page.inner_text("[data-clora=resume-plan]") == \
        "Resume starts again from the first step with the same pictures."
    assert page.is_hidden("[data-clora=recovery]")  # no state on disk, no notices: nothing to say

    # a resume that found its base model gone (drive unplugged): kept resumable, the reason, the fix AND the plan
    unplugged = fed_job("fedunplugged", "interrupted",
                        recovery=recovery_json(state_epoch=2, state_bytes=84_000_000, step_offset=0),
                        error={"kind": "model_not_found",
                               "message": "The base model /m/x.safetensors no longer exists.",
                               "hint": "Put the base model back at /m/x.safetensors (or reconnect its drive), then "
                                       "press Resume: the training saved after epoch 2 is kept."})
    feed(page, {"type": "job_created", "job_id": unplugged["id"], "data": unplugged})
    page.evaluate("async (id) => (await import('/character-lora/ui/store.js')).selectJob(id)", unplugged["id"])
    assert page.is_visible("[data-clora=resume]")
    assert page.inner_text("[data-clora=result]").startswith("The base model /m/x.safetensors no longer exists.")
    assert page.inner_text("[data-clora=resume-plan]") == \
        "Resume continues from epoch 3 of 10 (the state saved after epoch 2)."
    assert page.inner_text("[data-clora=fix]").startswith("Fix: Put the base model back at /m/x.safetensors")

    # a GPU job runs out of memory at batch 8: the notice frame's sentence stands out while the retry runs, and the
    # settings line follows the params of the retried run
    running = fed_job("fedoom", "training", progress={"step": 3, "total": 40, "epoch": 1, "epochs": 10, "rate": 2.0,
                                                    "eta_s": 18.5, "loss": 0.1})
    feed(page, {"type": "job_created", "job_id": running["id"], "data": running})
    page.evaluate("async (id) => (await import('/character-lora/ui/store.js')).selectJob(id)", running["id"])
    assert page.inner_text("[data-clora=job-settings]").endswith("batch 8, bf16")
    sentence = ("Ran out of GPU memory at batch 8; retrying with batch 4 and gradient checkpointing "
                "(retry 1 of 2).")
    retried = recovery_json(retries=[{"attempt": 1, "from_tier": "24gb", "to_tier": "16gb", "from_batch": 8,
                                      "to_batch": 4, "at_step": 3, "message": sentence}], notices=[sentence])
    feed(page, {"type": "notice", "job_id": running["id"],
                "data": {"kind": "oom_retry", "message": sentence, "recovery": retried,
                         "params": {**running["params"], "batch_size": 4, "gradient_checkpointing": True}}})
    assert page.inner_text("[data-clora=oom-retry]").strip() == sentence
    assert page.locator("[data-clora=notice]").count() == 0  # said once, prominently
    assert page.inner_text("[data-clora=job-settings]").endswith("batch 4, bf16, gradient checkpointing")
    page.screenshot(path=str(artifacts_dir() / "recovery-oom-retry.png"), full_page=True)
    # done: the retry is history, listed with the other recovery sentences
    feed(page, {"type": "result", "job_id": running["id"],
                "data": {"state": "done", "artifact": None, "lora_id": None, "error": None}})
    assert page.locator("[data-clora=oom-retry]").count() == 0
    assert page.locator("[data-clora=notice]").all_inner_texts() == [sentence]
    # a job that was retried, then interrupted and resumed: the run now going is the resume, not the retry
    later = fed_job("fedoomresumed", "training", recovery={**retried, "notices": [sentence, "Resumed from the state "
                                                                                 "saved after epoch 2 of 10."]})
    feed(page, {"type": "job_created", "job_id": later["id"], "data": later})
    page.evaluate("async (id) => (await import('/character-lora/ui/store.js')).selectJob(id)", later["id"])
    assert page.locator("[data-clora=oom-retry]").count() == 0
    assert page.locator("[data-clora=notice]").all_inner_texts() == later["recovery"]["notices"]

    # a resumed run: the daemon counts on from the saved epoch (step = offset + kohya's bar), so the bar and the list
    # start at 8 / 12, not at 0
    resumed = fed_job("fedresumed", "training",
                      progress={"step": 8, "total": 12, "epoch": 3, "epochs": 3, "rate": 2.0, "eta_s": 2.0},
                      recovery=recovery_json(resumes=1, step_offset=8, notices=["Resumed from the state saved after "
                                                                                "epoch 2 of 3."]))
    feed(page, {"type": "job_created", "job_id": resumed["id"], "data": resumed})
    page.evaluate("async (id) => (await import('/character-lora/ui/store.js')).selectJob(id)", resumed["id"])
    assert page.inner_text("[data-clora=stat-step]") == "8 / 12"
    assert page.get_attribute("[data-clora=progress]", "aria-valuenow") == "67"
    assert page.locator(f"[data-job-id={resumed['id']}] td").nth(2).inner_text() == "66%"  # the list's Result
    assert page.locator("[data-clora=notice]").all_inner_texts() == ["Resumed from the state saved after epoch 2 of 3."]
    feed(page, {"type": "progress", "job_id": resumed["id"], "data": {"step": 10, "rate": 2.0, "eta_s": 1.0}})
    assert page.inner_text("[data-clora=stat-step]") == "10 / 12"
    assert page.inner_text("[data-clora=stat-eta]") == "1s"

    # these jobs are not the daemon's: a reload of the list (as after a reconnect) drops them again
    page.evaluate("async () => (await import('/character-lora/ui/connection.js')).refreshJobs()")
    page.wait_for_function("!document.querySelector('[data-job-id^=fed]')", timeout=10000)


SEEN_STEPS = """() => {
    window.__seenSteps = []
    const look = () => {
        const s = document.querySelector('[data-clora=stat-step]')
        const b = document.querySelector('[data-clora=job-state]')
        if (s && b) {
            const seen = b.textContent + ':' + s.textContent
            if (window.__seenSteps[window.__seenSteps.length - 1] !== seen) window.__seenSteps.push(seen)
        }
        requestAnimationFrame(look)
    }
    look()
}"""


def start_short_job(page: Any, name: str, trigger: str, params: dict[str, str], start: int) -> None:
    page.fill("#clora-name", name)
    page.fill("#clora-trigger", trigger)
    page.locator("[data-clora=advanced] summary").click()
    for key, value in params.items():
        page.fill(f"#clora-p-{key}", value)
    drop_images(page, image_payload(8, start=start))
    page.wait_for_function("document.querySelector('[data-clora=start]')?.disabled === false", timeout=30000)
    page.click("[data-clora=start]")


def test_an_interrupted_job_resumes_from_the_tab_and_ends_like_an_uninterrupted_run(page: Any, tmp_path: Path) -> None:
    """The tab shows the saved state's size while the job trains; the daemon stops then (auto_resume off); the tab
    offers Resume, which continues after the saved epoch, counts its steps on from there, and ends Done; the saved
    state is then gone."""
    ed_root, cfg, ed_port, port = _ed_with_own_daemon(tmp_path, "resume")
    update_config_file(cfg, {"auto_resume": False})
    url = f"http://127.0.0.1:{port}"
    # slower steps: the state's size (stored as kohya writes it, fetched every few seconds) shows while it trains
    daemon = DaemonProcess(cfg, url, tmp_path / "resume.log", extra_env={"KOHYA_DOUBLE_STEP_SECONDS": "0.2"})
    token = yaml.safe_load(cfg.read_text())["token"]
    own = Env(ed_root, cfg, token, daemon, "", FakeEd(ed_root, listen_port=ed_port), ed_root / "models" / "lora")
    daemon.start()
    try:
        with ServerThread(own.fake.app(), ed_port) as server:
            open_tab(page, server.url)
            page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
            # 8 pictures x 2 repeats at batch 1: 16 steps an epoch, 96 in all; the balanced preset saves (LoRA and
            # state) every 2 epochs
            start_short_job(page, "Resume Hero", "r3sume", {"epochs": "6", "repeats": "2", "batch_size": "1",
                                                            "resolution": "256", "sample_every_n_epochs": "0"},
                            start=100)
            page.wait_for_function("document.querySelector('[data-clora=job-state]')?.textContent === 'Training'"
                                   " && /^saved state: \\d/.test(document.querySelector('[data-clora=state-size]')"
                                   "?.textContent || '')", timeout=60000)
            page.screenshot(path=str(artifacts_dir() / "resume-state-size.png"), full_page=True)
            job_id = page.evaluate("window.CharacterLoRA.selectedJob().id")
            daemon.stop()  # the running trainer is killed and the job recorded as interrupted
            daemon.start()
            stored = daemon_json(own, "GET", f"/jobs/{job_id}/status")
            assert stored["state"] == "interrupted" and stored["resumable"] is True
            saved = stored["recovery"]["state_epoch"]
            assert saved in (2, 4) and 10_000 <= stored["recovery"]["state_bytes"] < 999_500  # the double's: KB

            # the tab reconnects by itself and offers Resume, saying where it continues and what is kept on disk
            page.wait_for_selector("[data-clora=conn][data-status=live]", timeout=45000)
            page.wait_for_selector("[data-clora=resume]", timeout=30000)
            assert page.inner_text("[data-clora=job-state]") == "Interrupted"
            assert page.inner_text("[data-clora=resume-plan]") == \
                f"Resume continues from epoch {saved + 1} of 6 (the state saved after epoch {saved})."
            page.wait_for_function("(t) => document.querySelector('[data-clora=state-size]')?.textContent === t",
                                   arg=f"saved state: {stored['recovery']['state_bytes'] / 1000:.0f} KB")
            page.screenshot(path=str(artifacts_dir() / "resume-offered.png"), full_page=True)
            page.evaluate(SEEN_STEPS)
            page.click("[data-clora=resume]")
            wait_state(page, "Done", timeout=90000)
            seen = page.evaluate("window.__seenSteps")
            # the last step can reach the page in the same frame as Copying/Done: count those states too
            trained = [int(s.split(":")[1].split(" / ")[0]) for s in seen
                       if s.split(":")[0] in ("Training", "Copying", "Done") and re.search(r":\d+ / 96$", s)]
            # the count went on from the steps of the saved epochs, never back to the bar's own 0, to the total
            assert trained and min(trained) >= 16 * saved and max(trained) == 96, seen
            assert page.inner_text("[data-clora=stat-step]") == "96 / 96"
            page.wait_for_selector("[data-clora=use-it]:not([disabled])", timeout=30000)
            done = daemon_json(own, "GET", f"/jobs/{job_id}/status")
            assert done["id"] == job_id and done["progress"]["step"] == done["progress"]["total"] == 96
            assert done["recovery"]["resumes"] == 1 and done["recovery"]["state_bytes"] == 0
            assert (own.lora_dir / f"{done['lora_id']}.safetensors").is_file()
            # the notice of the resume stays with the job, and the saved state's size is gone with the state
            notices = page.locator("[data-clora=notice]").all_inner_texts()
            assert notices == done["recovery"]["notices"] and any(f"epoch {saved} of 6" in n for n in notices)
            page.wait_for_selector("[data-clora=state-size]", state="detached", timeout=10000)
            page.screenshot(path=str(artifacts_dir() / "resume-done.png"), full_page=True)
    finally:
        daemon.stop()


def test_an_out_of_memory_retry_is_shown_while_it_runs_then_done(page: Any, tmp_path: Path) -> None:
    """A daemon on an RTX 4090 (the torch double) whose trainer runs out of memory above batch 4: the tab shows the
    retry's sentence while the retry trains, the settings line the retried run's params, then Done."""
    ed_root, cfg, ed_port, port = _ed_with_own_daemon(tmp_path, "oom")
    path = torch_double_path(tmp_path)  # the daemon's probe finds an RTX 4090
    daemon = DaemonProcess(cfg, f"http://127.0.0.1:{port}", tmp_path / "oom.log",
                           extra_env={"PYTHONPATH": path, "KOHYA_DOUBLE_OOM_ABOVE_BATCH": "4"})
    token = yaml.safe_load(cfg.read_text())["token"]
    own = Env(ed_root, cfg, token, daemon, "", FakeEd(ed_root, listen_port=ed_port), ed_root / "models" / "lora")
    daemon.start()
    try:
        with ServerThread(own.fake.app(), ed_port) as server:
            open_tab(page, server.url)
            page.wait_for_selector("[data-clora=root][data-ready=true]", timeout=30000)
            fit = fit_json(own, base_model="tiny-sd15", preset="balanced", memory_tier="auto", images=8)
            assert (fit["tier"], fit["params"]["batch_size"]) == ("24gb", 8)
            wait_fit_line(page, fit["reason"])
            # the tier's own batch (8): 80 views an epoch are 10 steps at batch 8, 20 at batch 4
            start_short_job(page, "Oom Hero", "00mh3ro", {"epochs": "1", "repeats": "10", "resolution": "256",
                                                          "sample_every_n_epochs": "0"}, start=120)
            message = "Ran out of GPU memory at batch 8; retrying with batch 4 (retry 1 of 2)."
            page.wait_for_selector("[data-clora=oom-retry]", timeout=60000)
            assert page.inner_text("[data-clora=oom-retry]").strip() == message
            assert page.inner_text("[data-clora=job-state]") == "Training"
            # the retried run's params (fetched after the notice), not the ones /train stored first
            page.wait_for_function(
                "document.querySelector('[data-clora=job-settings]')?.textContent"
                ".startsWith('SD 1.x · 256 px · memory tier 16 GB · batch 4')", timeout=15000)
            page.screenshot(path=str(artifacts_dir() / "oom-retry-running.png"), full_page=True)

            wait_state(page, "Done", timeout=90000)
            page.wait_for_selector("[data-clora=use-it]:not([disabled])", timeout=30000)
            job = daemon_json(own, "GET", f"/jobs/{page.evaluate('window.CharacterLoRA.selectedJob().id')}/status")
            assert job["recovery"]["notices"] == [message]
            assert (job["params"]["batch_size"], job["progress"]["step"], job["progress"]["total"]) == (4, 20, 20)
            assert page.inner_text("[data-clora=stat-step]") == "20 / 20"
            # the retry is over: listed with the job's recovery sentences, no longer standing out
            assert page.locator("[data-clora=oom-retry]").count() == 0
            assert page.locator("[data-clora=notice]").all_inner_texts() == [message]

            # after a reload the job JSON brings it back
            open_tab(page, server.url)
            page.locator(f"[data-job-id='{job['id']}']").click()
            page.wait_for_function("(m) => Array.from(document.querySelectorAll('[data-clora=notice]'))"
                                   ".map((n) => n.textContent).join('|') === m", arg=message, timeout=30000)
            assert page.inner_text("[data-clora=job-settings]").startswith("SD 1.x · 256 px · memory tier 16 GB · "
                                                                           "batch 4")
    finally:
        daemon.stop()
