"""Opt-in: real trainings through the daemon with the real kohya sd-scripts (CPU is fine).

Set, e.g. after `eval "$(bash ../shared/harness/real_kohya.sh env)"`:
    KOHYA_SD=$KH_SD KOHYA_PYTHON=$KH_PY KOHYA_MODEL=$KH_MODEL KOHYA_TOKENIZER_CACHE=$KH_TOK_CACHE
Takes a few minutes on 2 CPU cores (256 px, 6 steps, two aspect-ratio buckets).

SDXL (after `real_kohya.sh setup-sdxl`), also: KOHYA_SDXL_MODEL=$KH_SDXL_MODEL. It needs about 21 GB of free RAM
on a CPU (../shared/kohya-logs/cpu-sdxl) and takes about 5 minutes; run it alone:
    python -m pytest -q tests/test_real_kohya.py -k sdxl_trains
The parser check (KOHYA_SD and KOHYA_PYTHON only) loads no model: about 20 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from safetensors import safe_open

from daemon.pipeline.params import TrainParams, total_steps
from daemon.pipeline.runner import job_paths
from tests.conftest import wait_for_state
from tests.helpers import free_port, make_config, picture_bytes

ENV = ("KOHYA_SD", "KOHYA_PYTHON", "KOHYA_MODEL", "KOHYA_TOKENIZER_CACHE")


def needs(*names: str) -> pytest.MarkDecorator:
    missing = [name for name in names if not os.environ.get(name)]
    return pytest.mark.skipif(bool(missing), reason=f"real kohya not configured: set {', '.join(missing)} "
                              "(see ../shared/harness/README.md)")


pytestmark = [pytest.mark.real_kohya]


@needs(*ENV)
async def test_real_kohya_trains_through_the_daemon(start_daemon, tmp_path: Path) -> None:
    sd = Path(os.environ["KOHYA_SD"])
    gpu = os.environ.get("KOHYA_GPU") == "1"
    cfg = make_config(
        tmp_path,
        port=free_port(),
        base_model=os.environ["KOHYA_MODEL"],
        allow_cpu=not gpu,
        kohya={
            "python": os.environ["KOHYA_PYTHON"],
            "script_path": str(sd / "train_network.py"),
            "workspace": str(sd),
            "tokenizer_cache_dir": os.environ["KOHYA_TOKENIZER_CACHE"],
        },
    )
    client = await start_daemon(cfg)
    ready = await (await client.post("/config/test")).json()
    assert ready["ready"], ready["checks"]
    params = {"resolution": 256, "epochs": 2, "repeats": 1, "batch_size": 4, "network_dim": 4,
              "network_alpha": 2, "save_every_n_epochs": 1, "sample_every_n_epochs": 2}
    # Pictures of two shapes (5 landscape JPEGs, 3 portrait PNGs), so kohya makes two buckets.
    form = aiohttp.FormData()
    form.add_field("name", "Real Run")
    form.add_field("trigger", "sksreal")
    form.add_field("params", json.dumps(params))
    for i in range(8):
        landscape = i < 5
        form.add_field("images", picture_bytes(i, size=(400, 300) if landscape else (300, 400),
                                               fmt="JPEG" if landscape else "PNG"),
                       filename=f"pic{i}.{'jpg' if landscape else 'png'}")
    resp = await client.post("/train", data=form)
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=900)
    assert job["state"] == "done", (job["error"], job["logs"][-30:])
    trainer_log = job_paths(cfg, job_id).trainer_log.read_text(encoding="utf-8")
    buckets = [ln.strip() for ln in trainer_log.splitlines() if ln.strip().startswith("bucket ")]
    assert buckets == ["bucket 0: resolution (192, 256), count: 3", "bucket 1: resolution (256, 192), count: 5"]
    assert "bucket_no_upscale: True" in trainer_log
    # No batch mixes buckets: ceil(5/4) + ceil(3/4) = 3 batches per epoch, not ceil(8/4) = 2.
    steps = total_steps(TrainParams.from_json(job["params"]), [5, 3])
    assert steps == 6
    assert job["progress"]["total"] == steps and job["progress"]["step"] == steps
    assert job["progress"]["epoch"] == 2 and job["progress"]["epochs"] == 2
    events = (await (await client.get(f"/jobs/{job_id}/events")).json())["events"]
    assert [e["data"]["file"] for e in events if e["type"] == "checkpoint"] == [
        "Real_Run-000001.safetensors", "Real_Run.safetensors"]
    # kohya's own preview picture, found by the watcher and served
    assert [s["file"][:17] for s in job["samples"]] == ["Real_Run_e000002_"]
    assert [e["data"]["file"] for e in events if e["type"] == "sample"] == [job["samples"][0]["file"]]
    picture = await client.get(job["samples"][0]["url"])
    assert picture.status == 200 and (await picture.read())[:4] == b"\x89PNG"
    with safe_open(job["artifact"], framework="numpy") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
        sample = fh.get_tensor(next(k for k in keys if k.endswith("lora_down.weight")))
    assert sum(k.endswith(".alpha") for k in keys) == 264  # 72 text-encoder + 192 U-Net modules
    assert str(sample.dtype) == "float16"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta.get("modelspec.trigger_phrase") == "sksreal"


# -------------------------------------------------------------------------------------------- SDXL
# Real sd-scripts code run on the daemon's SDXL argvs and dataset TOMLs: its parser, its argument checks and
# SdxlNetworkTrainer.assert_extra_args on the real dataset group (nothing that loads a model).
REAL_SDXL_CHECK = """
import json, sys
import sdxl_train_network as s
from library import config_util, sdxl_train_util, train_util

for name, argv in json.loads(sys.argv[1]).items():
    parser = s.setup_parser()
    args = train_util.read_config_from_file(parser.parse_args(argv), parser)
    train_util.verify_training_args(args)
    sdxl_train_util.verify_sdxl_training_args(args)
    blueprint = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True)).generate(
        config_util.load_user_config(args.dataset_config), args)
    group, val = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    s.SdxlNetworkTrainer().assert_extra_args(args, group, val)
    print("CHECKED", name, json.dumps({"unet_only": args.network_train_unet_only, "fp8": args.fp8_base,
          "cache_te": args.cache_text_encoder_outputs, "no_half_vae": args.no_half_vae}))
"""


@needs("KOHYA_SD", "KOHYA_PYTHON")
def test_real_sdxl_parser_and_asserts_accept_the_argv(tmp_path: Path) -> None:
    from dataclasses import replace

    from PIL import Image

    from daemon.pipeline.kohya import KohyaLaunch, build_command, dataset_config, write_dataset_config
    from daemon.pipeline.params import PRESETS

    sd = Path(os.environ["KOHYA_SD"])
    img = tmp_path / "img"
    img.mkdir()
    for i, size in enumerate([(1024, 1024), (832, 1216), (1216, 832)]):
        Image.new("RGB", size, (i * 60, 90, 120)).save(img / f"{i}.png")
        (img / f"{i}.txt").write_text("ohwx, person\n", encoding="utf-8")
    base = replace(PRESETS["balanced"], arch="sdxl", resolution=1024, cache_text_encoder_outputs=True,
                   text_encoder_lr=0.0, gradient_checkpointing=True)
    cases = {
        "fp16_cached": (base, False),
        "bf16_fp8_adafactor": (replace(base, mixed_precision="bf16", fp8_base=True, optimizer="Adafactor"), False),
        "text_encoders_trained": (replace(base, cache_text_encoder_outputs=False, text_encoder_lr=5e-5), False),
        "cpu_fp32": (replace(base, mixed_precision="no", optimizer="AdamW", batch_size=1, resolution=256), True),
    }
    argvs = {}
    for name, (params, cpu) in cases.items():
        toml = tmp_path / f"{name}.toml"
        write_dataset_config(toml, dataset_config(image_dir=str(img), class_tokens="ohwx person", params=params))
        launch = KohyaLaunch(script_path=str(sd / "sdxl_train_network.py"), workspace=str(sd), accelerate_bin="x",
                             python=os.environ["KOHYA_PYTHON"], base_model="/models/sdxl.safetensors",
                             dataset_config=str(toml), output_dir=str(tmp_path / "out"), output_name="Hero",
                             logging_dir=None, tokenizer_cache_dir=None, extra_args=(), cpu=cpu, trigger="ohwx",
                             job_id="j1")
        argv = build_command(params, launch)
        argvs[name] = argv[argv.index(launch.script_path) + 1:]
    done = subprocess.run([os.environ["KOHYA_PYTHON"], "-c", REAL_SDXL_CHECK, json.dumps(argvs)], cwd=sd,
                          env={**os.environ, "PYTHONPATH": str(sd)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checked = {ln.split()[1]: json.loads(ln.split(" ", 2)[2]) for ln in done.stdout.splitlines()
               if ln.startswith("CHECKED ")}
    assert checked == {
        "fp16_cached": {"unet_only": True, "fp8": False, "cache_te": True, "no_half_vae": True},
        "bf16_fp8_adafactor": {"unet_only": True, "fp8": True, "cache_te": True, "no_half_vae": False},
        "text_encoders_trained": {"unet_only": False, "fp8": False, "cache_te": False, "no_half_vae": True},
        "cpu_fp32": {"unet_only": True, "fp8": False, "cache_te": True, "no_half_vae": False},
    }


@needs(*ENV, "KOHYA_SDXL_MODEL")
async def test_real_kohya_sdxl_trains_through_the_daemon(start_daemon, tmp_path: Path) -> None:
    sd = Path(os.environ["KOHYA_SD"])
    # Only CLIP-L's folder, as an SD 1.x setup has it: the daemon makes SDXL's second tokenizer from it, and the
    # real trainer, run offline, must load it.
    tokenizers = tmp_path / "tokenizers"
    shutil.copytree(Path(os.environ["KOHYA_TOKENIZER_CACHE"]) / "openai_clip-vit-large-patch14",
                    tokenizers / "openai_clip-vit-large-patch14")
    models = tmp_path / "ed" / "models" / "stable-diffusion"
    models.mkdir(parents=True)
    (models / "sdxl-random.safetensors").symlink_to(os.environ["KOHYA_SDXL_MODEL"])
    cfg = make_config(
        tmp_path,
        port=free_port(),
        allow_cpu=True,
        kohya={
            "python": os.environ["KOHYA_PYTHON"],
            "script_path": str(sd / "train_network.py"),
            "workspace": str(sd),
            "tokenizer_cache_dir": str(tokenizers),
        },
    )
    client = await start_daemon(cfg)
    params = {"resolution": 256, "epochs": 2, "repeats": 1, "batch_size": 2, "network_dim": 4, "network_alpha": 1,
              "text_encoder_lr": 0, "save_every_n_epochs": 1, "sample_every_n_epochs": 0}
    form = aiohttp.FormData()
    form.add_field("name", "Real XL")
    form.add_field("trigger", "sksxl")
    form.add_field("base_model", "sdxl-random.safetensors")
    form.add_field("params", json.dumps(params))
    for i in range(8):
        form.add_field("images", picture_bytes(i, size=(256, 256)), filename=f"pic{i}.png")
    resp = await client.post("/train", data=form)
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["job_id"]
    job = await wait_for_state(client, job_id, {"done", "error"}, timeout=1800)
    assert job["state"] == "done", (job["error"], job["logs"][-30:])
    stored = job["params"]
    assert stored["arch"] == "sdxl" and stored["cache_text_encoder_outputs"] is True, stored
    assert (tokenizers / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k" / "vocab.json").is_file()
    lines = (await (await client.get(f"/jobs/{job_id}/logs")).json())["lines"]
    assert any(ln.startswith("training SDXL with sdxl_train_network.py on the CPU") for ln in lines)
    trainer_log = job_paths(cfg, job_id).trainer_log.read_text(encoding="utf-8")
    assert "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k" in trainer_log
    assert "caching Text Encoder outputs..." in trainer_log
    assert job["artifact"].startswith(str(cfg.ed_lora_dir))
    with safe_open(job["artifact"], framework="numpy") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
        sample = fh.get_tensor(next(k for k in keys if k.endswith("lora_down.weight")))
    assert sum(k.endswith(".alpha") for k in keys) == 722  # U-Net only
    assert all(k.startswith("lora_unet_") for k in keys)
    assert str(sample.dtype) == "float16"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta.get("modelspec.trigger_phrase") == "sksxl"


# ------------------------------------------------------------------------------------------------ resume
# What differs between a killed-and-resumed LoRA and an uninterrupted one of the same job, by kohya's design
# (tests/fixtures/kohya_resume/FACTS.md §4.3), plus what names the job (the two jobs have different names/ids).
RESUME_DIFFERS = {"ss_steps", "ss_training_started_at", "ss_session_id", "ss_training_finished_at", "modelspec.date",
                  "sshs_model_hash", "sshs_legacy_hash", "ss_output_name", "modelspec.title", "ss_training_comment"}


@needs(*ENV)
async def test_real_kohya_resumes_after_the_daemon_and_trainer_are_killed(tmp_path: Path) -> None:
    """The issue's proof: a CPU run killed (daemon and trainer, SIGKILL) after its first saved epoch, the daemon
    started again, the job resumed automatically and finished; compared with a run that was never stopped.
    With KOHYA_RESUME_RECORD=<dir> what it saw is written there (tests/fixtures/real_kohya_resume/)."""
    import asyncio
    import contextlib
    import sys

    import psutil
    import yaml

    from tests.conftest import train_form
    from tests.helpers import TOKEN
    from tests.test_crash_recovery import Site

    sd = Path(os.environ["KOHYA_SD"])
    kohya = {"python": os.environ["KOHYA_PYTHON"], "script_path": str(sd / "train_network.py"), "workspace": str(sd),
             "tokenizer_cache_dir": os.environ["KOHYA_TOKENIZER_CACHE"]}
    cfg = make_config(tmp_path, port=free_port(), base_model=os.environ["KOHYA_MODEL"], kohya=kohya)
    raw = {"port": cfg.port, "token": TOKEN, "data_dir": str(cfg.data_dir), "ed_lora_dir": str(cfg.ed_lora_dir),
           "ed_models_dir": str(cfg.ed_models_dir), "base_model": os.environ["KOHYA_MODEL"], "allow_cpu": True,
           "kohya": kohya}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg.ed_lora_dir.mkdir(parents=True, exist_ok=True)
    site = Site(tmp_path, cfg, config_path)
    # one bucket, 2 steps per epoch, 3 epochs: a state after epochs 1 and 2
    params = json.dumps({"resolution": 256, "epochs": 3, "repeats": 1, "batch_size": 4, "network_dim": 4,
                         "network_alpha": 2, "save_every_n_epochs": 1, "sample_every_n_epochs": 0})
    try:
        daemon = await site.start({})
        job_id = await site.submit(train_form(8, name="Resumed Real", params=params))
        end = asyncio.get_running_loop().time() + 900
        while (job := await site.job(job_id))["recovery"]["state_epoch"] is None:
            assert job["state"] in ("queued", "prepping", "training"), (job["error"], job["logs"][-20:])
            assert asyncio.get_running_loop().time() < end, "no state was saved in 15 minutes"
            await asyncio.sleep(0.5)
        killed_at = dict(job)
        tree = site.sigkill(daemon)
        for pid, _ in tree:  # the trainer too: a power cut takes everything
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        output = cfg.data_dir / "jobs" / job_id / "output"
        after_kill = sorted(p.name for p in output.iterdir())

        await site.start({})  # auto_resume (the default) continues the job from its saved state
        resumed = await site.wait_for(job_id, {"done", "error", "interrupted"}, timeout=900)
        assert resumed["state"] == "done", (resumed["error"], resumed["logs"][-30:])
        other_id = await site.submit(train_form(8, name="Never Stopped", params=params))
        other = await site.wait_for(other_id, {"done", "error"}, timeout=900)
        assert other["state"] == "done", (other["error"], other["logs"][-30:])
        argv_lines = [ln for ln in await _all_logs(site, job_id) if ln.startswith("$ ")]
    finally:
        for d in site.daemons:
            if d.proc.poll() is None:
                d.proc.terminate()
                d.proc.wait(30)

    epoch = killed_at["recovery"]["state_epoch"]
    assert epoch == 1 and f"Resumed_Real-{epoch:06d}-state" in after_kill
    total = other["progress"]["total"]
    assert total == 6 and resumed["progress"]["total"] == total
    assert resumed["progress"]["step"] == other["progress"]["step"] == total
    assert resumed["recovery"]["notices"] == [
        "Resumed automatically after the daemon restarted, from the state saved after epoch 1 of 3."]
    assert resumed["recovery"]["step_offset"] == 2 and resumed["recovery"]["state_bytes"] == 0

    def files(job: dict[str, object]) -> list[str]:
        folder = cfg.data_dir / "jobs" / str(job["id"]) / "output"
        return sorted(p.name.split("-", 1)[1] if "-" in p.name else "final" for p in folder.iterdir()
                      if p.name != "sample")

    assert files(resumed) == files(other) == ["000001.safetensors", "000002.safetensors", "final"]
    assert len(argv_lines) == 2 and "--resume" not in argv_lines[0]
    assert f"--resume {job_paths(cfg, job_id).output / 'Resumed_Real-000001-state'} --initial_epoch 2" in argv_lines[1]
    log = job_paths(cfg, job_id).trainer_log.read_text(encoding="utf-8")
    second = log[log.index("resume training from local state"):]
    assert "steps from the state is ignored because initial_step is specified" in second
    assert "epoch 2/3" in second and "epoch 3/3" in second and "epoch 1/3" not in second

    def metadata(path: str) -> dict[str, str]:
        with safe_open(path, framework="numpy") as fh:
            return dict(fh.metadata())

    compared: dict[str, dict[str, dict[str, str]]] = {}
    for stem in ("000002", None):
        a = metadata(str(job_paths(cfg, job_id).output / (f"Resumed_Real-{stem}.safetensors" if stem
                                                         else "Resumed_Real.safetensors")))
        b = metadata(str(job_paths(cfg, other_id).output / (f"Never_Stopped-{stem}.safetensors" if stem
                                                           else "Never_Stopped.safetensors")))
        assert set(a) == set(b)
        differ = {k for k in a if a[k] != b[k]}
        assert differ <= RESUME_DIFFERS, {k: (a[k], b[k]) for k in differ - RESUME_DIFFERS}
        assert a["ss_epoch"] == b["ss_epoch"] and a["ss_max_train_steps"] == b["ss_max_train_steps"] == str(total)
        # kohya's ss_steps counts the resumed launch only (FACTS §4.3); the job's progress has the whole count
        assert int(a["ss_steps"]) == int(b["ss_steps"]) - 2
        compared[stem or "final"] = {k: {"resumed": a[k], "uninterrupted": b[k]} for k in sorted(differ)}

    record = os.environ.get("KOHYA_RESUME_RECORD")
    if record:
        out = Path(record)
        out.mkdir(parents=True, exist_ok=True)
        (out / "argv.txt").write_text("\n\n".join(argv_lines) + "\n", encoding="utf-8")
        (out / "trainer_resumed_job.log").write_text(log, encoding="utf-8")
        (out / "trainer_uninterrupted_job.log").write_text(job_paths(cfg, other_id).trainer_log.read_text(
            encoding="utf-8"), encoding="utf-8")
        (out / "metadata_comparison.json").write_text(json.dumps(compared, indent=1) + "\n", encoding="utf-8")
        summary = {"killed_at": {k: killed_at[k] for k in ("progress", "recovery")}, "output_after_kill": after_kill,
                   "resumed": {k: resumed[k] for k in ("progress", "recovery")},
                   "uninterrupted": {k: other[k] for k in ("progress", "recovery")},
                   "files": files(resumed), "python": sys.version.split()[0]}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


async def _all_logs(site: object, job_id: str) -> list[str]:
    from tests.test_crash_recovery import Site

    assert isinstance(site, Site)
    async with aiohttp.ClientSession(headers=site.headers) as http, \
            http.get(f"{site.config.url}/jobs/{job_id}/logs") as resp:
        return list((await resp.json())["lines"])
