"""Opt-in: the per-picture captions read by the REAL kohya sd-scripts (48d368fa), set up as tests/test_real_kohya.py:
    KOHYA_SD=$KH_SD KOHYA_PYTHON=$KH_PY KOHYA_MODEL=$KH_MODEL KOHYA_TOKENIZER_CACHE=$KH_TOK_CACHE

- kohya's own dataset loader (no model) on the daemon's prepared folder and dataset TOML, for SD 1.x and for SDXL
  with cached text-encoder outputs (no shuffling there): each picture's caption as kohya holds it, and
  SdxlNetworkTrainer.assert_extra_args accepting the dataset (about 30 s);
- a whole training through the daemon with captions sent in POST /train: the LoRA's `ss_tag_frequency`, which
  kohya counts from the caption files it read, per folder (a few minutes on 2 CPU cores).
What these runs printed is recorded in tests/fixtures/captions/.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from safetensors import safe_open

from daemon.pipeline.captions import caption_text, clean_all
from daemon.pipeline.dataset import Upload, prepare_images
from daemon.pipeline.kohya import KohyaLaunch, build_command, dataset_config, write_dataset_config
from daemon.pipeline.params import PRESETS
from daemon.pipeline.runner import job_paths
from tests.conftest import wait_for_state
from tests.helpers import free_port, make_config, picture_bytes
from tests.test_real_kohya import ENV, needs

pytestmark = [pytest.mark.real_kohya]

TRIGGER = "sksreal"
TYPED = ["smiling, red scarf", "", "SKSREAL on a beach", "sksreal", "line one\nline two", "sitting ,, indoors",
         "looking back, red scarf", "close-up, smiling"]

# Real sd-scripts code: the dataset group kohya builds from the argv and the TOML, and the captions it holds.
REAL_DATASET = """
import json, sys
from library import config_util, train_util

for name, (script, argv) in json.loads(sys.argv[1]).items():
    trainer = __import__(script)
    parser = trainer.setup_parser()
    args = train_util.read_config_from_file(parser.parse_args(argv), parser)
    blueprint = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True)).generate(
        config_util.load_user_config(args.dataset_config), args)
    group, val = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    if script == "sdxl_train_network":
        trainer.SdxlNetworkTrainer().assert_extra_args(args, group, val)
    dataset = group.datasets[0]
    subset = dataset.subsets[0]
    print("DATASET", name, json.dumps({
        "captions": {k.rsplit("/", 1)[-1]: v.caption for k, v in sorted(dataset.image_data.items())},
        "keep_tokens": subset.keep_tokens, "shuffle_caption": subset.shuffle_caption,
        "caption_extension": subset.caption_extension, "tag_frequency": dataset.tag_frequency}))
"""


def expected_captions(prefix: str) -> list[str]:
    return [caption_text(prefix, c) for c in clean_all(TYPED, TRIGGER)]


def tag_counts(texts: list[str]) -> dict[str, int]:
    """What kohya's set_tag_frequency counts: comma items, stripped, lower-cased."""
    return dict(Counter(t.strip().lower() for text in texts for t in text.split(",") if t.strip()))


@needs("KOHYA_SD", "KOHYA_PYTHON")
def test_real_kohya_loads_each_pictures_caption_for_sd1_and_sdxl(tmp_path: Path) -> None:
    sd = Path(os.environ["KOHYA_SD"])
    uploads = []
    for i in range(len(TYPED)):
        path = tmp_path / f"{i + 1:03d}.upload"
        path.write_bytes(picture_bytes(i, size=(256, 256)))
        uploads.append(Upload(path, f"p{i}.png"))
    img = tmp_path / "img"
    prepare_images(uploads, img, size=256, text=f"{TRIGGER} woman", captions=clean_all(TYPED, TRIGGER))
    sd1 = replace(PRESETS["balanced"], resolution=256, mixed_precision="no", batch_size=1)
    sdxl = replace(PRESETS["balanced"], arch="sdxl", resolution=256, cache_text_encoder_outputs=True,
                   text_encoder_lr=0.0, mixed_precision="no", batch_size=1)
    argvs = {}
    for name, params, script in (("sd1", sd1, "train_network"), ("sdxl_cached_te", sdxl, "sdxl_train_network")):
        toml = tmp_path / f"{name}.toml"
        write_dataset_config(toml, dataset_config(image_dir=str(img), class_tokens=f"{TRIGGER} woman", params=params))
        launch = KohyaLaunch(script_path=str(sd / f"{script}.py"), workspace=str(sd), accelerate_bin="x",
                             python=os.environ["KOHYA_PYTHON"], base_model="/models/m.safetensors",
                             dataset_config=str(toml), output_dir=str(tmp_path / "out"), output_name="Hero",
                             logging_dir=None, tokenizer_cache_dir=None, extra_args=(), cpu=True, trigger=TRIGGER,
                             job_id="j1")
        argv = build_command(params, launch)
        argvs[name] = (script, argv[argv.index(launch.script_path) + 1:])
    done = subprocess.run([os.environ["KOHYA_PYTHON"], "-c", REAL_DATASET, json.dumps(argvs)], cwd=sd,
                          env={**os.environ, "PYTHONPATH": str(sd)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("DATASET ")]
    record = Path(os.environ.get("CAPTIONS_RECORD", tmp_path))
    (record / "real_dataset_loader.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    found = {ln.split()[1]: json.loads(ln.split(" ", 2)[2]) for ln in lines}
    want = expected_captions(f"{TRIGGER} woman")
    for name, shuffle in (("sd1", True), ("sdxl_cached_te", False)):
        got = found[name]
        assert list(got["captions"].values()) == want, got
        assert list(got["captions"]) == [f"{i:03d}.png" for i in range(1, 9)]
        assert (got["keep_tokens"], got["shuffle_caption"], got["caption_extension"]) == (1, shuffle, ".txt")
        assert got["tag_frequency"] == {"img": tag_counts(want)}
    assert all(c.startswith(f"{TRIGGER} woman") and c.lower().count(TRIGGER) == 1 for c in want)


@needs(*ENV)
async def test_real_kohya_trains_on_the_typed_captions(start_daemon, tmp_path: Path) -> None:
    sd = Path(os.environ["KOHYA_SD"])
    cfg = make_config(tmp_path, port=free_port(), base_model=os.environ["KOHYA_MODEL"], allow_cpu=True,
                      kohya={"python": os.environ["KOHYA_PYTHON"], "script_path": str(sd / "train_network.py"),
                             "workspace": str(sd), "tokenizer_cache_dir": os.environ["KOHYA_TOKENIZER_CACHE"]})
    client = await start_daemon(cfg)
    params = {"resolution": 256, "epochs": 1, "repeats": 1, "batch_size": 4, "network_dim": 4,
              "network_alpha": 2, "sample_every_n_epochs": 0}
    form = aiohttp.FormData()
    form.add_field("name", "Captioned")
    form.add_field("trigger", TRIGGER)
    form.add_field("class_token", "woman")
    form.add_field("params", json.dumps(params))
    form.add_field("captions", json.dumps(TYPED))
    for i in range(len(TYPED)):
        form.add_field("images", picture_bytes(i, size=(256, 256)), filename=f"pic{i}.png")
    resp = await client.post("/train", data=form)
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=1200)
    assert job["state"] == "done", (job["error"], job["logs"][-30:])
    want = expected_captions(f"{TRIGGER} woman")
    written = sorted(job_paths(cfg, job_id).images.glob("*.txt"))
    assert [p.read_text(encoding="utf-8") for p in written] == [c + "\n" for c in want]
    with safe_open(job["artifact"], framework="numpy") as fh:
        meta = fh.metadata()
    frequency = json.loads(meta["ss_tag_frequency"])
    out = Path(os.environ.get("CAPTIONS_RECORD", tmp_path)) / "real_run_metadata.json"
    out.write_text(json.dumps({"captions": want, "ss_tag_frequency": frequency,
                               "ss_num_train_images": meta.get("ss_num_train_images")}, indent=1) + "\n",
                   encoding="utf-8")
    trainer_log = job_paths(cfg, job_id).trainer_log.read_text(encoding="utf-8")
    seen = [ln.rstrip() for ln in trainer_log.splitlines()
            if any(k in ln for k in ("shuffle_caption:", "keep_tokens:", "caption_extension:", "image_dir:",
                                     "class_tokens:", "bucket 0:", "model saved."))]
    (out.parent / "real_run_trainer_log_excerpt.txt").write_text("\n".join(seen) + "\n", encoding="utf-8")
    assert "    shuffle_caption: True" in seen and "    keep_tokens: 1" in seen, seen
    assert frequency == {"img": tag_counts(want)}
    assert frequency["img"][f"{TRIGGER} woman"] == 8 and frequency["img"]["red scarf"] == 2
