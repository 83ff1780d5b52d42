"""Per-picture captions (issue 10 §3): the cleaning rules, the /train `captions` field and its refusals, and the
caption files a job writes for kohya, on a fresh start and again on a resume after the daemon was killed."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from daemon.config import Config
from daemon.errors import BadInput
from daemon.jobs.fields import parse_captions
from daemon.pipeline import captions
from daemon.pipeline.captions import MAX_CAPTION_CHARS, caption_text, clean_caption, read_captions, write_captions
from daemon.pipeline.dataset import Upload, prepare_images
from tests.conftest import train_form, wait_for_state
from tests.helpers import picture_bytes
from tests.test_crash_recovery import Site
from tests.test_crash_recovery import site as site  # a fixture: pytest finds it by name
from tests.test_oom_retry_daemon import gpu_daemon as gpu_daemon
from tests.test_resume import FAST, SLOW, call, kill_all, wait_job

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


# ------------------------------------------------------------------------------------------------ pure part
@pytest.mark.parametrize(("typed", "kept"), [
    ("smiling, red scarf", "smiling, red scarf"),
    ("  smiling ,,  red   scarf , ", "smiling, red scarf"),
    ("smiling\nred scarf\r\n\tbeach", "smiling red scarf beach"),  # one line: kohya reads only the first
    ("a\u2028b\u202ec\x00d", "a b c d"),  # separators, bidi controls, NUL
    ("OHWX, smiling, ohwx woman, Ohwx", "smiling, woman"),  # the trigger again, in any case
    ("ohwxy, my-ohwx, ohwx's hat", "ohwxy, my-ohwx, ohwx's hat"),  # other words that only contain it
    ("ohwx", ""),
    ("", ""),
    (" , ,", ""),
])
def test_the_users_text_is_cleaned(typed: str, kept: str) -> None:
    assert clean_caption(typed, "ohwx") == kept


def test_a_trigger_with_regex_characters_is_matched_literally() -> None:
    assert clean_caption("a.b, axb, A.B smiling", "a.b") == "axb, smiling"


def test_the_caption_file_text_puts_the_prefix_first() -> None:
    assert caption_text("ohwx woman", "smiling, red scarf") == "ohwx woman, smiling, red scarf"
    assert caption_text("ohwx woman", "") == "ohwx woman"


def test_stored_captions_are_read_back_by_upload_name(tmp_path: Path) -> None:
    names = ["001.upload", "002.upload", "003.upload"]
    assert read_captions(tmp_path, names) == ["", "", ""]  # a job from before captions
    write_captions(tmp_path, names, ["smiling", "", "Ünïcode hat"])
    assert read_captions(tmp_path, names) == ["smiling", "", "Ünïcode hat"]
    assert read_captions(tmp_path, ["002.upload", "004.upload"]) == ["", ""]
    (tmp_path / captions.CAPTIONS_FILE).write_text("[1, 2", encoding="utf-8")
    assert read_captions(tmp_path, names) == ["", "", ""]
    (tmp_path / captions.CAPTIONS_FILE).write_text('{"001.upload": 5}', encoding="utf-8")
    assert read_captions(tmp_path, names) == ["", "", ""]


@pytest.mark.parametrize(("raw", "sentence"), [
    ("[\"a\",", "'captions' is not valid JSON"),
    ("NaN", "'captions' is not valid JSON"),
    ("{\"a\": 1}", "must be a JSON array of strings"),
    ("[\"a\", 2]", "must be a JSON array of strings"),
    ("[\"a\", null]", "must be a JSON array of strings"),
    ("\"smiling\"", "must be a JSON array of strings"),
    (json.dumps(["a", "b" * (MAX_CAPTION_CHARS + 1)]), f"The caption of picture 2 is {MAX_CAPTION_CHARS + 1}"),
    ("[\"a\", \"b\"]", "2 caption(s) were sent for 3 picture(s)"),
])
def test_bad_captions_fields_are_refused_with_a_sentence(raw: str, sentence: str) -> None:
    with pytest.raises(BadInput) as err:
        parse_captions(raw, count=3)
    assert err.value.key == "captions" and err.value.status == 400
    assert sentence in err.value.message


def test_a_good_captions_field_parses() -> None:
    assert parse_captions(None, count=3) is None
    assert parse_captions(json.dumps(["a", "", "x" * MAX_CAPTION_CHARS]), count=3) == ["a", "", "x" * 1000]
    assert parse_captions("[\"a\"]") == ["a"]  # the count is checked once the pictures are in


def test_prep_writes_each_pictures_own_caption(tmp_path: Path) -> None:
    ups = []
    for i in range(3):
        path = tmp_path / f"{i + 1:03d}.upload"
        path.write_bytes(picture_bytes(i))
        ups.append(Upload(path, f"p{i}.png"))
    prepare_images(ups, tmp_path / "img", size=64, text="ohwx woman", captions=["smiling", "", "hat, beach"])
    texts = [(tmp_path / "img" / f"{i:03d}.txt").read_text(encoding="utf-8") for i in (1, 2, 3)]
    assert texts == ["ohwx woman, smiling\n", "ohwx woman\n", "ohwx woman, hat, beach\n"]
    with pytest.raises(ValueError):
        prepare_images(ups, tmp_path / "img2", size=64, text="ohwx", captions=["one"])


# -------------------------------------------------------------------------------------------------- the API
def job_dir(config: Config, job_id: str) -> Path:
    return config.data_dir / "jobs" / job_id


def caption_files(folder: Path) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted((folder / "dataset" / "img").glob("*.txt"))]


async def nothing_stored(client: TestClient, config: Config) -> None:
    assert (await (await client.get("/jobs")).json())["jobs"] == []
    jobs = config.data_dir / "jobs"
    assert not jobs.exists() or list(jobs.iterdir()) == []
    tmp = config.data_dir / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


@pytest.mark.parametrize(("field", "sentence"), [
    ("not json", "'captions' is not valid JSON"),
    (json.dumps({"0": "a"}), "must be a JSON array of strings"),
    (json.dumps(["a"] * 7), "7 caption(s) were sent for 8 picture(s)"),
    (json.dumps(["a"] * 9), "9 caption(s) were sent for 8 picture(s)"),
    (json.dumps(["a"] * 7 + ["b" * 1001]), "The caption of picture 8 is 1001 characters long"),
    (json.dumps(["é" * 1000] * 70), "The field 'captions' is too long."),  # past the field's 256 KiB
])
async def test_train_refuses_bad_captions_with_400_and_stores_nothing(client: TestClient, config: Config,
                                                                      field: str, sentence: str) -> None:
    resp = await client.post("/train", data=train_form(8, captions=field))
    body = await resp.json()
    assert resp.status == 400, body
    assert body["key"] == "captions" and sentence in body["error"], body
    await nothing_stored(client, config)


async def test_captions_sent_before_the_pictures_are_refused_before_any_is_stored(client: TestClient,
                                                                                   config: Config) -> None:
    form = aiohttp.FormData()
    form.add_field("name", "Hero")
    form.add_field("trigger", "ohwx")
    form.add_field("captions", "[1]")
    form.add_field("images", b"x" * 10_000, filename="a.png", content_type="image/png")
    resp = await client.post("/train", data=form)
    assert resp.status == 400 and (await resp.json())["key"] == "captions"
    await nothing_stored(client, config)


TYPED = ["smiling, red scarf", "", "OHWX on a beach", "ohwx", "line one\nline two", "  sitting ,, , indoors ",
         "looking back", "close-up, ohwx woman"]
WRITTEN = ["ohwx woman, smiling, red scarf", "ohwx woman", "ohwx woman, on a beach", "ohwx woman",
           "ohwx woman, line one line two", "ohwx woman, sitting, indoors", "ohwx woman, looking back",
           "ohwx woman, close-up, woman"]


async def test_a_job_writes_each_pictures_caption_with_the_trigger_first(client: TestClient, config: Config,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "argv.json"
    monkeypatch.setenv("KOHYA_DOUBLE_RECORD", str(record))
    resp = await client.post("/train", data=train_form(8, class_token="woman", captions=json.dumps(TYPED)))
    assert resp.status == 202, await resp.json()
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "done", job["error"]
    folder = job_dir(config, job_id)
    assert caption_files(folder) == [w + "\n" for w in WRITTEN]
    stored = json.loads((folder / "uploads" / captions.CAPTIONS_FILE).read_text(encoding="utf-8"))
    assert list(stored.values()) == [w.removeprefix("ohwx woman").removeprefix(", ") for w in WRITTEN]
    # the dataset kohya was given: those files, the first comma item kept in place, the rest shuffled
    argv = json.loads(record.read_text(encoding="utf-8"))
    toml = tomllib.loads(Path(argv[argv.index("--dataset_config") + 1]).read_text(encoding="utf-8"))
    general, subset = toml["general"], toml["datasets"][0]["subsets"][0]
    assert (general["caption_extension"], general["keep_tokens"], general["shuffle_caption"]) == (".txt", 1, True)
    assert Path(subset["image_dir"]) == folder / "dataset" / "img"


async def test_without_captions_every_caption_is_the_prefix(client: TestClient, config: Config) -> None:
    resp = await client.post("/train", data=train_form(8))
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"})
    assert job["state"] == "done", job["error"]
    assert caption_files(job_dir(config, job_id)) == ["ohwx person\n"] * 8
    assert not (job_dir(config, job_id) / "uploads" / captions.CAPTIONS_FILE).exists()


async def test_a_resumed_job_prepares_the_same_captions_again(site: Site) -> None:
    daemon = await site.start(SLOW)
    params = json.dumps({"epochs": 3, "repeats": 2, "save_every_n_epochs": 1})
    job_id = await site.submit(train_form(8, class_token="woman", captions=json.dumps(TYPED), params=params))
    await wait_job(site, job_id, lambda j: j["state"] == "training" and j["progress"]["step"] >= 1)
    kill_all(site, daemon)
    folder = job_dir(site.config, job_id)
    assert caption_files(folder) == [w + "\n" for w in WRITTEN]
    for txt in (folder / "dataset" / "img").glob("*.txt"):  # prep must write them again, not keep these
        txt.write_text("stale\n", encoding="utf-8")
    await site.start(FAST)
    await asyncio.sleep(0.5)
    job: dict[str, Any] = await site.job(job_id)
    if job["state"] == "interrupted":  # no saved state yet: it waits for the user
        status, body = await call(site, "POST", f"/jobs/{job_id}/resume")
        assert status == 202, body
    done = await site.wait_for(job_id, {"done", "error"}, timeout=60)
    assert done["state"] == "done", done["error"]
    assert caption_files(folder) == [w + "\n" for w in WRITTEN]


async def test_an_out_of_memory_retry_trains_on_the_same_captions(gpu_daemon: Callable[..., Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOHYA_DOUBLE_OOM_ABOVE_BATCH", "4")
    client, config = await gpu_daemon()
    resp = await client.post("/train", data=train_form(8, class_token="woman", captions=json.dumps(TYPED),
                                                       params='{"epochs": 1}'))
    assert resp.status == 202, await resp.json()
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=90)
    assert job["state"] == "done", job["error"]
    assert [r["to_batch"] for r in job["recovery"]["retries"]] == [4]
    assert caption_files(job_dir(config, job_id)) == [w + "\n" for w in WRITTEN]
